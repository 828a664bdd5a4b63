"""SCI's Table II on the synthetic vision-language world, with "see what you seek" measured.

    python benchmarks/ablation.py                      # 5 seeds per row, each its own CLIP -> runs/ablation/
    python benchmarks/ablation.py --quick              # a first look: 3 seeds, half the epochs
    python benchmarks/ablation.py --seeds 1 --rows baseline sci

Pretrains one small CLIP per seed on the captioned corpus (synthetic/pretrain.py, pretraining seed =
seed - 1; cached), so that the CLIP's variance is inside every interval, then for each seed trains
and evaluates every row on the synthetic benchmark from that seed's CLIP (METHOD.md section 11 lists
the rows and the recipe): general / CC / SC Rank-1 and mAP, the fractions of Grad-CAM heat on
identity parts, clothes and background of the test images (the "seek" fractions), and how much
outfit information the stage-1 text features F_id, F_clo and F_ort carry (outfit AUC). Each row is
compared with the baseline by the paired difference over seeds with its 95 % t interval. Writes
results.json, results.md (the Markdown tables, also printed), t-SNE figures of `baseline` and `sci`
and their heatmaps side by side. Finished runs are reused when the command is run again with the
same settings.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config  # noqa: E402
import datasets  # noqa: E402
import loaders  # noqa: E402
import masks  # noqa: E402
import evaluate  # noqa: E402
import gradcam  # noqa: E402
import models  # noqa: E402
import registry  # noqa: E402
from synthetic import pretrain as pretrain_clip  # noqa: E402
import synthetic  # noqa: E402
import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
import utils  # noqa: E402
import visualize  # noqa: E402

log = logging.getLogger("ablation")
from metrics import SETTINGS  # noqa: E402
IMG_SIZE = (64, 32)  # the demo's input: identity cues stay visible and an epoch takes seconds
# Grad-CAM on layer1's 16x8 map: at 64x32 the last map (layer4) is 4x2 cells, each a quarter of
# the person plus background, so its heat falls on parts in proportion to their area whatever the
# model does (measured: METHOD.md section 11)
SEEK_LAYER = "layer1"


@dataclass(frozen=True)
class Row:
    name: str
    stage1: tuple[str, ...] = ()   # flags of train_stage1.py
    stage2: tuple[str, ...] = ()   # flags of train_stage2.py
    pretrained: bool = True        # False: the same recipe from a random backbone
    trained: bool = True           # False: the pretrained CLIP's features, no Re-ID training

    @property
    def flags(self) -> str:
        return " ".join(self.stage1 + self.stage2) + ("" if self.pretrained else " --weights none")


# Table II's rows (each module added to the CLIP-ReID baseline alone, then all), the two readings of
# Eq. 4-5 each with its norm-matched control (F_ort rescaled to |F_id|: direction without scale), the
# random backbone, and one variant beyond the paper (METHOD.md section 11).
ROWS = (
    Row("zero-shot", trained=False),
    Row("baseline", ("--no-sse",), ("--no-sim", "--no-cal")),
    Row("+sse", ("--ortho", "paper"), ("--no-sim", "--no-cal")),
    Row("+sim", ("--no-sse",), ("--no-cal",)),
    Row("+cal", ("--no-sse",), ("--no-sim",)),
    Row("sci", ("--ortho", "paper")),
    Row("sci-norm-matched", ("--ortho", "paper", "--match-norm")),
    Row("sci-gram-schmidt", ("--ortho", "gram-schmidt")),
    Row("sci-gram-schmidt-norm-matched", ("--ortho", "gram-schmidt", "--match-norm")),
    Row("sci-random-init", ("--ortho", "paper"), pretrained=False),
    Row("sci-outfit-prompt", ("--clothes-prompt", "outfit", "--ortho", "gram-schmidt")),
)
ROW_NAMES = tuple(r.name for r in ROWS)


# the full run and --quick's first look: what each trades (README, "The synthetic world")
FULL = dict(seeds=5, stage1_epochs=5, stage2_epochs=6, pretrain_epochs=pretrain_clip.PretrainConfig.epochs)
QUICK = dict(seeds=3, stage1_epochs=3, stage2_epochs=4, pretrain_epochs=pretrain_clip.PretrainConfig.epochs // 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"a first look: {QUICK['seeds']} seeds, half the epochs of every stage and of pretraining "
                        f"(flags given beside it still apply)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds per row, 1..N, each with its own pretrained CLIP (default: {FULL['seeds']})")
    p.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES),
                   help="which rows of the table to run, e.g. baseline sci (default: all)")
    p.add_argument("--root", default=config.DEFAULT_DATA_ROOT,
                   help="folder of the synthetic benchmark and corpus (default: %(default)s)")
    p.add_argument("--output-dir", default=None,
                   help="where each row's runs, results and figures go (default: runs/ablation, with --quick "
                        "runs/ablation-quick)")
    p.add_argument("--stage1-epochs", type=int, default=None,
                   help=f"stage-1 (prompt) epochs of every row (default: {FULL['stage1_epochs']})")
    p.add_argument("--stage2-epochs", type=int, default=None,
                   help=f"stage-2 (image encoder) epochs of every row (default: {FULL['stage2_epochs']})")
    p.add_argument("--stage2-lr", type=float, default=1e-3,
                   help="stage-2 base rate for every row (default: %(default)s; the paper's 3.5e-4 is for "
                        "fine-tuning a large pretrained CLIP)")
    p.add_argument("--batch-size", type=int, default=64, help="stage-2 P x K batch (default: %(default)s)")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help=f"default: synthetic/pretrain.py's ({FULL['pretrain_epochs']})")
    p.add_argument("--pretrain-batch-size", type=int, default=pretrain_clip.PretrainConfig.batch_size,
                   help="default: synthetic/pretrain.py's (%(default)s)")
    p.add_argument("--corpus-people", type=int, default=synthetic.CorpusConfig.people,
                   help="default: synthetic/pretrain.py's (%(default)s)")
    p.add_argument("--first-clip-seed", type=int, default=0,
                   help="pretraining seed of seed 1's CLIP; seed N's is this + N - 1 (default: %(default)s). Another "
                        "value gives a run whose pretraining differs, e.g. to see what reproduces across machines")
    p.add_argument("--tsne-ids", type=int, default=20, help="identities in the t-SNE figures (default: %(default)s)")
    p.add_argument("--heatmap-images", type=int, default=8,
                   help="test images in the Grad-CAM figure comparing the rows (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where every row trains and is evaluated; auto picks cuda when visible (default: cpu)")
    p.add_argument("--table", metavar="RESULTS.json", default=None,
                   help="train nothing: print the tables of an earlier run's results.json (with the paired "
                        "differences from the baseline) and write results.md beside it")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.output_dir = args.output_dir or ("runs/ablation-quick" if args.quick else "runs/ablation")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


# ----------------------------------------------------------------------------- one run

def _call(main, argv: list[str], what: str) -> None:
    code = main(argv)
    if code:
        raise utils.TrainingStopped(f"{what} failed with status {code}: {' '.join(argv)}")


def _done(folder: Path, record: dict, product: str) -> bool:
    """A finished run of exactly this record is there: its product, and the arguments and backbone
    it was run with (a retrained CLIP keeps its path, so its parameters are part of the record)."""
    try:
        return (folder / product).is_file() and json.loads((folder / "ablation_run.json").read_text()) == record
    except (OSError, ValueError):
        return False


def _run(main, folder: Path, argv: list[str], product: str, what: str, backbone: dict) -> None:
    record = {"argv": argv, "backbone": backbone}
    if _done(folder, record, product):
        log.info("reusing %s", folder / product)
        return
    _call(main, argv, what)
    utils.write_json(folder / "ablation_run.json", record)


def run_stage1(row: Row, seed: int, weights: str, args: argparse.Namespace, out: Path, backbone: dict) -> Path:
    """Stage 1 of a row (shared by rows with the same stage-1 flags and backbone)."""
    key = "-".join(f.strip("-") for f in row.stage1) or "sse"
    folder = out / f"seed{seed}" / f"stage1-{key}{'' if row.pretrained else '-random'}"
    argv = [*common(args, seed, weights), "--output-dir", str(folder), "--epochs", str(args.stage1_epochs),
            "--warmup-epochs", "1", "--cosine-sim", *row.stage1]
    _run(train_stage1.main, folder, argv, "stage1.pt", "stage 1", backbone)
    return folder / "stage1.pt"


def run_stage2(row: Row, seed: int, weights: str, stage1: Path, args: argparse.Namespace, out: Path,
               backbone: dict) -> Path:
    e = args.stage2_epochs
    folder = out / f"seed{seed}" / row.name
    argv = [*common(args, seed, weights), "--stage1", str(stage1), "--output-dir", str(folder),
            "--epochs", str(e), "--lr", str(args.stage2_lr), "--batch-size", str(args.batch_size),
            "--warmup-epochs", "1", "--milestones", str(max(1, e * 7 // 10)), "--cal-start", str(e // 4),
            "--eval-every", str(e), *row.stage2]
    _run(train_stage2.main, folder, argv, "results.json", "stage 2", backbone)
    return folder


def common(args: argparse.Namespace, seed: int, weights: str) -> list[str]:
    return ["--dataset", "synthetic", "--root", args.root, "--arch", "tiny", "--weights", weights,
            "--img-size", *map(str, IMG_SIZE), "--device", args.device, "--seed", str(seed),
            "--workers", str(args.workers), "--log-every", "1000"]


def zero_shot_model(weights: str, num_ids: int) -> tuple[models.SCIReID, models.ModelConfig]:
    """The pretrained CLIP's image features as a Re-ID model: SIM starts as the identity map (its
    output does not depend on the bank), the test feature is taken before the BN necks; images are
    normalised with CLIP's statistics, as in pretraining."""
    config = models.ModelConfig(arch="tiny", img_size=list(IMG_SIZE), num_classes=num_ids)
    bank = torch.zeros(num_ids, 64)
    return registry.build_model(config, bank, weights).eval(), config


# ----------------------------------------------------------------------------- measurements

def outfit_captions(dataset, annotations: dict) -> tuple[list[str], list[int]]:
    """One caption per training outfit in the clothes prompt's shape ("A photo of the red top and
    blue trousers clothes.", synthetic.template_prompts), and the identity that wears it."""
    captions, owners = {}, {}
    for path, pid, _, clothes in dataset.train:
        if clothes not in captions:
            attrs = annotations[f"train/{os.path.basename(path)}"]["attributes"]
            captions[clothes], owners[clothes] = synthetic.template_prompts(attrs)["clothes"], pid
    order = sorted(captions)
    return [captions[c] for c in order], [owners[c] for c in order]


PROBE_FEATURES = ("F_id", "F_clo", "F_ort")


def outfit_auc(bank: torch.Tensor, outfit_text: torch.Tensor, owners: list[int]) -> float:
    """How much outfit information a bank of text features (one row per training identity) carries:
    for each identity, the AUC of its own outfits' captions against all other identities' outfit
    captions, ranked by cosine to its row (the chance that an own outfit ranks above another's; ties
    count half), averaged over identities. 0.5: none; 1: every own outfit ranks first."""
    sims = F.normalize(bank.float(), dim=-1) @ F.normalize(outfit_text.float(), dim=-1).t()  # [C, outfits]
    owner = torch.tensor(owners)
    aucs = []
    for i in range(len(sims)):
        own = owner == i
        pos, neg = sims[i, own], sims[i, ~own]
        if len(pos) and len(neg):
            aucs.append(((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean())
    return round(float(torch.stack(aucs).mean()), 4)


def text_probe(stage1_path: Path, captions: list[str], owners: list[int]) -> dict[str, float | None]:
    """outfit_auc of F_id, F_clo and F_ort of a stage-1 run, with the outfit captions in the text
    space of the CLIP that run was trained from (its --weights and --seed: the random backbone's
    own text encoder for sci-random-init); None for F_clo without SSE: there is no clothes prompt."""
    stage1 = torch.load(stage1_path, map_location="cpu", weights_only=True)
    a = stage1["args"]
    clip_model = models.build_clip(a["arch"], a["weights"], IMG_SIZE, seed=a["seed"])
    text = pretrain_clip.text_features(clip_model, captions)  # [outfits, D]
    no_sse = stage1["args"].get("no_sse", False)
    return {k: None if k == "F_clo" and no_sse else outfit_auc(stage1["banks"][k], text, owners) for k in PROBE_FEATURES}


def measure(model: models.SCIReID, model_config: models.ModelConfig, dataset, args: argparse.Namespace,
            device: torch.device, features: bool) -> dict:
    """Seek fractions of a model on the test images and, if asked, its features of every protocol."""
    model, size = model.to(device).eval(), tuple(model_config.img_size)  # the model's own input (CSSC: 128 rows)
    normalize = (model_config.pixel_mean, model_config.pixel_std)
    test_items = list(dict.fromkeys(dataset.query + dataset.gallery))
    seek = gradcam.seek_on_dataset(model, test_items, size, normalize, device,
                                   load_mask=masks.mask_source(dataset, None, check=False).read, layer=SEEK_LAYER)
    out = {"seek": {k: seek[k] for k in ("identity", "clothes", "background")}}
    if features:
        protocols = evaluate.protocol_features(model, dataset.protocols, size, config.EVAL_BATCH_SIZE, args.workers, device,
                                               normalize=normalize)
        out["protocols"] = protocols
    return out


def metrics_of(protocols: list) -> dict:
    return evaluate.metrics_to_json(evaluate.evaluate_features(protocols))


# ----------------------------------------------------------------------------- the table

def _mean_std(values: list[float]) -> str:
    """mean ± the sample standard deviation (ddof 1) over seeds."""
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


CONFIDENCE = 0.95  # of the paired intervals
EFFECTS = {"cc_mAP": ("cc", "mAP"), "cc_R1": ("cc", "rank1")}  # what each row is compared with the baseline on


def t_interval(values: list[float]) -> dict:
    """Mean of `values` with its CONFIDENCE interval from Student's t (sample std, ddof 1), and the
    verdict: "helps" or "hurts" only where the interval excludes 0, else "no detectable effect"."""
    from scipy import stats  # scikit-learn's dependency

    d = np.asarray(values, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": round(mean, 4), "lo": None, "hi": None, "verdict": "one seed: no interval"}
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    lo, hi = mean - half, mean + half
    verdict = "helps" if lo > 0 else "hurts" if hi < 0 else "no detectable effect"
    return {"mean": round(mean, 4), "lo": round(lo, 4), "hi": round(hi, 4), "verdict": verdict}


def paired_difference(values: list[float], reference: list[float]) -> dict:
    """The per-seed differences values - reference (paired by seed, which removes what a seed's CLIP
    and draws give both rows) as a t_interval."""
    return t_interval(list(np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)))


def add_paired(rows: list[dict], baseline: str = "baseline") -> None:
    """Each row but the baseline gets `paired`: its EFFECTS differences from the baseline (same seeds)."""
    base = next((r for r in rows if r["name"] == baseline), None)
    for r in rows:
        if base is not None and r is not base and r["seeds"] == base["seeds"]:
            r["paired"] = {key: paired_difference(r[s][k], base[s][k]) for key, (s, k) in EFFECTS.items()}


def _interval_cell(e: dict, digits: int = 1, sign: str = "+") -> str:
    if e["lo"] is None:
        return f"{e['mean']:{sign}.{digits}f} ({e['verdict']})"
    return f"{e['mean']:{sign}.{digits}f} [{e['lo']:{sign}.{digits}f}, {e['hi']:{sign}.{digits}f}]"


def effects_markdown(rows: list[dict], baseline: str = "baseline") -> str:
    lines = ["| row | " + " | ".join(f"{k.replace('cc_', 'CC ')} − {baseline} ({CONFIDENCE:.0%} CI)" for k in EFFECTS)
             + " | verdict (CC mAP) |", "|---|" + "---|" * (len(EFFECTS) + 1)]
    for r in rows:
        if "paired" in r:
            cells = [_interval_cell(r["paired"][k]) for k in EFFECTS]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['paired']['cc_mAP']['verdict']} |")
    return "\n".join(lines)


def probe_markdown(rows: list[dict]) -> str:
    """Each row's outfit AUC per text feature: mean over seeds with its CONFIDENCE interval (chance 0.5)."""
    lines = ["| row | " + " | ".join(f"{k} outfit AUC ({CONFIDENCE:.0%} CI)" for k in PROBE_FEATURES) + " |",
             "|---|" + "---|" * len(PROBE_FEATURES)]
    for r in rows:
        if "probe" in r:
            cells = []
            for k in PROBE_FEATURES:
                values = [v for v in r["probe"][k] if v is not None]
                if not values:
                    cells.append("–")
                    continue
                cells.append(_interval_cell(t_interval(values), digits=3, sign=""))  # the interval of the mean AUC
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def area_fractions(dataset) -> dict[str, float]:
    """The seek fractions of a heat map spread evenly over the image: each group's share of the
    pixels, the reference a model's fractions are read against."""
    items = list(dict.fromkeys(dataset.query + dataset.gallery))
    source = masks.mask_source(dataset, None, check=False)
    labels = torch.stack([torch.from_numpy(source.read(str(it[0]))) for it in items])  # one benchmark: one size
    heat = torch.full((len(items), *IMG_SIZE), 1.0 / (IMG_SIZE[0] * IMG_SIZE[1]))
    return {k: round(v, 4) for k, v in gradcam.seek_fractions(heat, labels).items()}


def markdown(rows: list[dict], area: dict[str, float]) -> str:
    head = ("| row | flags | general R1 | general mAP | CC R1 | CC mAP | SC R1 | SC mAP | heat on identity "
            "| clothes | background |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        cells = [r["name"], f"`{r['flags']}`" if r["flags"] else ""]
        for s in SETTINGS:
            cells += [_mean_std(r[s]["rank1"]), _mean_std(r[s]["mAP"])]
        cells += [f"{np.mean(r['seek'][k]):.2f}" for k in ("identity", "clothes", "background")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| *pixel share (heat spread evenly)* | | | | | | | | " +
                 " | ".join(f"{area[k]:.2f}" for k in ("identity", "clothes", "background")) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def print_tables(summary: dict, path: Path) -> None:
    """Table II and the paired differences of the run in results.json `path`, printed and written
    to results.md beside it."""
    out = path.parent
    rows, seeds = summary["rows"], summary["rows"][0]["seeds"]
    if not any("paired" in r for r in rows):  # a results.json written before rows carried their intervals
        add_paired(rows)
    tables = "\n\n".join((markdown(rows, summary["pixel_share"]), effects_markdown(rows), probe_markdown(rows)))
    utils.write_atomic(out / "results.md", lambda tmp: Path(tmp).write_text(tables + "\n"))
    print(f"\nSCI's Table II on the synthetic world ({len(seeds)} seed(s) per row, mean ± sample std, %; heat "
          f"fractions 0-1), each row's paired difference from the baseline, and the outfit information of the stage-1 text features\n\n{tables}\n\n"
          f"{summary['seconds']:.0f} s in all; {path}")


def read_summary(path: Path, script: str) -> dict:
    """--table's results.json of benchmarks/{script}.py, or one error line."""
    try:
        summary = json.loads(path.read_text())
        summary["rows"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise utils.UserError(f"--table {path}: not a results.json of benchmarks/{script}.py ({exc}); give the "
                              f"file a run wrote, e.g. runs/{script}/results.json") from None
    return summary


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.table:
        path = Path(args.table)
        print_tables(read_summary(path, "ablation"), path)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    out = Path(args.output_dir)
    device = utils.select_device(args.device)
    seeds = list(range(1, args.seeds + 1))
    rows = [r for r in ROWS if r.name in args.rows]

    clips = pretrain_clips(args, seeds)  # seed -> (checkpoint, its record)
    dataset = datasets.build_dataset("synthetic", args.root)
    annotations = synthetic.load_annotations(synthetic.generate_synthetic(
        args.root, synthetic.config_for(args.root, {})))
    captions, owners = outfit_captions(dataset, annotations)

    results = []
    draw = {"baseline", "sci"}
    figures: dict[str, list] = {}
    for row in rows:
        record = {"name": row.name, "flags": row.flags, "seeds": seeds,
                  "clip_seeds": [clips[seed][1]["params"]["train"]["seed"] for seed in seeds],
                  "seek": {k: [] for k in ("identity", "clothes", "background")},
                  **{s: {"rank1": [], "mAP": []} for s in SETTINGS}}
        for seed in seeds:
            ckpt, clip_meta = clips[seed]
            weights = str(ckpt) if row.pretrained else "none"
            backbone = clip_meta["params"] if row.pretrained else {}
            if row.trained:
                stage1 = run_stage1(row, seed, weights, args, out, backbone)
                folder = run_stage2(row, seed, weights, stage1, args, out, backbone)
                model, _, config = registry.load_checkpoint_model(folder / "last.pt")
                metrics = json.loads((folder / "results.json").read_text())["metrics"]
                probe = text_probe(stage1, captions, owners)
                for k, v in probe.items():
                    record.setdefault("probe", {f: [] for f in PROBE_FEATURES})[k].append(v)
            else:
                (model, config), metrics = zero_shot_model(str(ckpt), dataset.num_train_pids), None
            wanted = row.name in draw and seed == seeds[0]
            m = measure(model, config, dataset, args, device, features=wanted or metrics is None)
            if metrics is None:
                metrics = metrics_of(m["protocols"])
            if wanted:
                figures[row.name] = [model.cpu(), config, m["protocols"]]
            for s in SETTINGS:
                for k in ("rank1", "mAP"):
                    record[s][k].append(metrics[s][k])
            for k, v in m["seek"].items():
                record["seek"][k].append(round(v, 4))
            log.info("%s seed %d: CC R1 %.1f mAP %.1f, heat on identity %.2f", row.name, seed,
                     metrics["cc"]["rank1"], metrics["cc"]["mAP"], m["seek"]["identity"])
        results.append(record)
    add_paired(results)

    draw_figures(figures, dataset, out, args)
    summary = {"clip": [clip_report(*clips[seed]) for seed in seeds],
               "units": "metrics, accuracy, chance and r1 in %; kappa, AUC and heat fractions as fractions",
               "rows": results, "pixel_share": area_fractions(dataset),
               "seconds": round(time.perf_counter() - t0, 1),
               "settings": {k: v for k, v in vars(args).items() if k != "rows"}}
    utils.write_json(out / "results.json", summary)
    print_tables(summary, out / "results.json")
    return 0


def pretrain_clips(args: argparse.Namespace, seeds: list[int]) -> dict[int, tuple[Path, dict]]:
    """Every seed's own pretrained CLIP (pretraining seed first_clip_seed + seed - 1; cached), so that
    the CLIP's variance is inside every interval: a row is compared with the baseline on the same
    CLIPs, and each CLIP is one more draw of the world's pretraining."""
    corpus = synthetic.CorpusConfig(people=args.corpus_people)
    clips = {}
    for seed in seeds:
        cfg = pretrain_clip.PretrainConfig(epochs=args.pretrain_epochs, batch_size=args.pretrain_batch_size,
                                           seed=args.first_clip_seed + seed - 1)
        clips[seed] = pretrain_clip.pretrained_clip(args.root, corpus, cfg)
        log.info("pretrained CLIP of seed %d: %s\n%s", seed, clips[seed][0], pretrain_clip.format_report(clips[seed][1]))
    return clips


def clip_report(ckpt: Path, meta: dict) -> dict:
    """results.json's report of one pretrained CLIP."""
    return {"seed": meta["params"]["train"]["seed"], "checkpoint": str(ckpt), "pretrain_seconds": meta["pretrain_seconds"],
            **{k: meta[k] for k in ("zero_shot", "retrieval", "templates")}}


def draw_figures(figures: dict, dataset, out: Path, args: argparse.Namespace) -> None:
    """t-SNE of the gallery features of baseline and sci (Fig. 4) and their heatmaps (Fig. 5-6)."""
    for name, (_, _, protocols) in figures.items():
        gallery = protocols[0]["gallery"]
        visualize.tsne_figure(gallery["feats"].numpy(), gallery["pids"], gallery["clothes"],
                              out / f"tsne_{name}.png", f"t-SNE of {name}'s test features (synthetic world)",
                              max_ids=args.tsne_ids)
    if {"baseline", "sci"} <= set(figures):
        items = dataset.query[:: max(1, len(dataset.query) // args.heatmap_images)][:args.heatmap_images]
        heats = []
        for name in ("baseline", "sci"):
            model, config = figures[name][:2]
            transform = loaders.build_transforms(IMG_SIZE, train=False, normalize=(config.pixel_mean, config.pixel_std))
            images = torch.stack([transform(loaders.open_rgb(it[0])) for it in items])
            heats.append(gradcam.heatmaps(model, images, layer=SEEK_LAYER))
        visualize.draw_heatmaps([loaders.open_rgb(it[0]) for it in items], heats, ["baseline", "sci"],
                                out / "heatmaps.png", "Grad-CAM: baseline vs SCI (synthetic world)")


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
