"""SCI's Table II on the synthetic vision-language world, with "see what you seek" measured.

    python benchmarks/ablation.py                      # 3 seeds per row -> runs/ablation/
    python benchmarks/ablation.py --seeds 1 --rows baseline sci

Pretrains the small CLIP on the captioned corpus (synthetic/pretrain.py; cached), then for each seed
trains and evaluates every row on the synthetic benchmark (METHOD.md section 11 lists the rows and
the recipe): general / CC / SC Rank-1 and mAP, the fractions of Grad-CAM heat on identity parts,
clothes and background of the test images (the "seek" fractions), and how much outfit
information the stage-1 text features F_id and F_ort carry. Writes results.json, results.md (the
Markdown table, also printed), t-SNE figures of `baseline` and `sci` and their heatmaps side by
side. Finished runs are reused when the command is run again with the same settings.
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


# Table II's rows (each module added to the CLIP-ReID baseline alone, then all), the orthogonalisation
# variants, the random backbone, and one variant beyond the paper (METHOD.md section 11).
ROWS = (
    Row("zero-shot", trained=False),
    Row("baseline", ("--no-sse",), ("--no-sim", "--no-cal")),
    Row("+sse", ("--ortho", "paper"), ("--no-sim", "--no-cal")),
    Row("+sim", ("--no-sse",), ("--no-cal",)),
    Row("+cal", ("--no-sse",), ("--no-sim",)),
    Row("sci", ("--ortho", "paper")),
    Row("sci-gram-schmidt", ("--ortho", "gram-schmidt")),
    Row("sci-random-init", ("--ortho", "paper"), pretrained=False),
    Row("sci-outfit-prompt", ("--clothes-prompt", "outfit", "--ortho", "gram-schmidt")),
)
ROW_NAMES = tuple(r.name for r in ROWS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per row, 1..N (default: %(default)s)")
    p.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES),
                   help="which rows of the table to run, e.g. baseline sci (default: all)")
    p.add_argument("--root", default=config.DEFAULT_DATA_ROOT,
                   help="folder of the synthetic benchmark and corpus (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/ablation",
                   help="where each row's runs, results and figures go (default: %(default)s)")
    p.add_argument("--stage1-epochs", type=int, default=10, help="stage-1 (prompt) epochs of every row (default: %(default)s)")
    p.add_argument("--stage2-epochs", type=int, default=12,
                   help="stage-2 (image encoder) epochs of every row (default: %(default)s)")
    p.add_argument("--stage2-lr", type=float, default=1e-3,
                   help="stage-2 base rate for every row (default: %(default)s; the paper's 3.5e-4 is for "
                        "fine-tuning a large pretrained CLIP)")
    p.add_argument("--batch-size", type=int, default=64, help="stage-2 P x K batch (default: %(default)s)")
    p.add_argument("--pretrain-epochs", type=int, default=pretrain_clip.PretrainConfig.epochs,
                   help="default: synthetic/pretrain.py's (%(default)s)")
    p.add_argument("--pretrain-batch-size", type=int, default=pretrain_clip.PretrainConfig.batch_size,
                   help="default: synthetic/pretrain.py's (%(default)s)")
    p.add_argument("--corpus-people", type=int, default=synthetic.CorpusConfig.people,
                   help="default: synthetic/pretrain.py's (%(default)s)")
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
    return models.build_model(config, bank, weights).eval(), config


# ----------------------------------------------------------------------------- measurements

def outfit_captions(dataset, annotations: dict) -> tuple[list[str], list[int]]:
    """One caption of each training outfit's clothes only (top and bottom words), and its identity."""
    captions, owners = {}, {}
    for path, pid, _, clothes in dataset.train:
        if clothes not in captions:
            a = annotations[f"train/{os.path.basename(path)}"]["attributes"]
            pattern = "" if a["top pattern"] == "plain" else a["top pattern"] + " "
            captions[clothes] = (f"a person wearing a {pattern}{a['top colour']} top and "
                                 f"{a['bottom colour']} {a['bottom type']}")
            owners[clothes] = pid
    order = sorted(captions)
    return [captions[c] for c in order], [owners[c] for c in order]


def text_outfit_information(stage1_path: Path, weights: str, captions: list[str], owners: list[int]) -> dict:
    """How much of its outfits a stage-1 text feature names: for each training identity's feature
    (F_id, F_ort), the outfit captions of all training identities are ranked by cosine similarity
    in the CLIP text space. outfit_r1: % of identities whose nearest outfit caption is one of their
    own; own_minus_other: mean cosine to own outfits minus mean cosine to the others'."""
    banks = torch.load(stage1_path, map_location="cpu", weights_only=True)["banks"]
    clip_model = models.build_clip("tiny", weights, IMG_SIZE, seed=0)
    text = pretrain_clip.text_features(clip_model, captions)  # [outfits, D], normalised
    owners_t = torch.tensor(owners)
    out = {}
    for name in ("F_id", "F_ort"):
        sims = F.normalize(banks[name].float(), dim=-1) @ text.t()  # [C, outfits]
        own = owners_t[None, :] == torch.arange(len(sims))[:, None]
        r1 = own[torch.arange(len(sims)), sims.argmax(dim=1)].float().mean().item()
        gap = ((sims * own).sum(1) / own.sum(1).clamp(min=1) - (sims * ~own).sum(1) / (~own).sum(1)).mean().item()
        out[name] = {"outfit_r1": round(100 * r1, 2), "own_minus_other": round(gap, 4)}
    out["chance_r1"] = round(100 * float(np.mean([owners.count(y) for y in set(owners)])) / len(owners), 2)
    return out


def measure(model: models.SCIReID, model_config: models.ModelConfig, dataset, args: argparse.Namespace,
            device: torch.device, features: bool) -> dict:
    """Seek fractions of a model on the test images and, if asked, its features of every protocol."""
    model = model.to(device).eval()
    normalize = (model_config.pixel_mean, model_config.pixel_std)
    test_items = list(dict.fromkeys(dataset.query + dataset.gallery))
    seek = gradcam.seek_on_dataset(model, test_items, IMG_SIZE, normalize, device,
                                   load_mask=masks.mask_source(dataset, None, check=False).read, layer=SEEK_LAYER)
    out = {"seek": {k: seek[k] for k in ("identity", "clothes", "background")}}
    if features:
        protocols = evaluate.protocol_features(model, dataset.protocols, IMG_SIZE, config.EVAL_BATCH_SIZE, args.workers, device,
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
EFFECTS = (("cc", "mAP"), ("cc", "rank1"))  # what each row is compared with the baseline on


def paired_difference(values: list[float], reference: list[float]) -> dict:
    """Mean of the per-seed differences values - reference, with its CONFIDENCE interval from
    Student's t over the seeds (pairing by seed removes what the seeds share), and the verdict:
    "helps" or "hurts" only where the interval excludes 0, else "no detectable effect"."""
    from scipy import stats  # scikit-learn's dependency

    d = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": round(mean, 2), "low": None, "high": None, "verdict": "one seed: no interval"}
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    low, high = mean - half, mean + half
    verdict = "helps" if low > 0 else "hurts" if high < 0 else "no detectable effect"
    return {"mean": round(mean, 2), "low": round(low, 2), "high": round(high, 2), "verdict": verdict}


def paired_effects(rows: list[dict], baseline: str = "baseline") -> dict[str, dict]:
    """Every row's paired differences from the baseline row (same seeds), per EFFECTS entry."""
    base = next((r for r in rows if r["name"] == baseline), None)
    if base is None:
        return {}
    return {r["name"]: {f"{s} {k}": paired_difference(r[s][k], base[s][k]) for s, k in EFFECTS}
            for r in rows if r["name"] != baseline and r["seeds"] == base["seeds"]}


def effects_markdown(effects: dict[str, dict]) -> str:
    keys = [f"{s} {k}" for s, k in EFFECTS]
    lines = ["| row | " + " | ".join(f"{k.replace('rank1', 'R1').replace('cc', 'CC')} − baseline "
                                    f"({CONFIDENCE:.0%} CI)" for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for name, e in effects.items():
        cells = [f"{e[k]['mean']:+.1f} [{e[k]['low']:+.1f}, {e[k]['high']:+.1f}] {e[k]['verdict']}"
                 if e[k]["low"] is not None else f"{e[k]['mean']:+.1f} ({e[k]['verdict']})" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
            "| clothes | background | outfit R@1 of F_id / F_ort |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        cells = [r["name"], f"`{r['flags']}`" if r["flags"] else ""]
        for s in SETTINGS:
            cells += [_mean_std(r[s]["rank1"]), _mean_std(r[s]["mAP"])]
        cells += [f"{np.mean(r['seek'][k]):.2f}" for k in ("identity", "clothes", "background")]
        text = r.get("text")
        cells.append(f"{np.mean([t['F_id']['outfit_r1'] for t in text]):.0f} / "
                     f"{np.mean([t['F_ort']['outfit_r1'] for t in text]):.0f}" if text else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| *pixel share (heat spread evenly)* | | | | | | | | " +
                 " | ".join(f"{area[k]:.2f}" for k in ("identity", "clothes", "background")) + " | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def print_tables(summary: dict, path: Path) -> None:
    """Table II and the paired differences of the run in results.json `path`, printed and written
    to results.md beside it."""
    out = path.parent
    rows, seeds = summary["rows"], summary["rows"][0]["seeds"]
    tables = markdown(rows, summary["pixel_share"]) + "\n\n" + effects_markdown(paired_effects(rows))
    utils.write_atomic(out / "results.md", lambda tmp: Path(tmp).write_text(tables + "\n"))
    print(f"\nSCI's Table II on the synthetic world ({len(seeds)} seed(s) per row, mean ± sample std, %; heat "
          f"fractions 0-1), then each row's paired difference from the baseline\n\n{tables}\n\n"
          f"{summary['seconds']:.0f} s in all; {path}")


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.table:
        path = Path(args.table)
        try:
            summary = json.loads(path.read_text())
            summary["rows"]
        except (OSError, ValueError, KeyError) as exc:
            raise utils.UserError(f"--table {path}: not a results.json of benchmarks/ablation.py ({exc}); give the "
                                  f"file a run wrote, e.g. runs/ablation/results.json") from None
        print_tables(summary, path)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    out = Path(args.output_dir)
    device = utils.select_device(args.device)
    seeds = list(range(1, args.seeds + 1))
    rows = [r for r in ROWS if r.name in args.rows]

    corpus = synthetic.CorpusConfig(people=args.corpus_people)
    ckpt, clip_meta = pretrain_clip.pretrained_clip(args.root, corpus,
                                                    pretrain_clip.PretrainConfig(
        epochs=args.pretrain_epochs, batch_size=args.pretrain_batch_size))
    log.info("pretrained CLIP: %s\n%s", ckpt, pretrain_clip.format_report(clip_meta))
    dataset = datasets.build_dataset("synthetic", args.root)
    annotations = synthetic.load_annotations(synthetic.generate_synthetic(
        args.root, synthetic.config_for(args.root, {})))
    captions, owners = outfit_captions(dataset, annotations)

    results = []
    draw = {"baseline", "sci"}
    figures: dict[str, list] = {}
    for row in rows:
        record = {"name": row.name, "flags": row.flags, "seeds": seeds, "seek": {k: [] for k in
                                                                                ("identity", "clothes", "background")},
                  **{s: {"rank1": [], "mAP": []} for s in SETTINGS}}
        for seed in seeds:
            weights = str(ckpt) if row.pretrained else "none"
            backbone = clip_meta["params"] if row.pretrained else {}
            if row.trained:
                stage1 = run_stage1(row, seed, weights, args, out, backbone)
                folder = run_stage2(row, seed, weights, stage1, args, out, backbone)
                model, _, config = models.load_checkpoint_model(folder / "last.pt")
                metrics = json.loads((folder / "results.json").read_text())["metrics"]
                record.setdefault("text", []).append(text_outfit_information(stage1, weights, captions, owners))
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

    draw_figures(figures, dataset, out, args)
    area = area_fractions(dataset)
    summary = {"clip": {"checkpoint": str(ckpt), "pretrain_seconds": clip_meta["pretrain_seconds"],
                        "zero_shot": clip_meta["zero_shot"], "retrieval": clip_meta["retrieval"],
                        "templates": clip_meta["templates"]},
               "rows": results, "pixel_share": area, "effects": paired_effects(results),
               "seconds": round(time.perf_counter() - t0, 1),
               "settings": {k: v for k, v in vars(args).items() if k != "rows"}}
    utils.write_json(out / "results.json", summary)
    print_tables(summary, out / "results.json")
    return 0


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
