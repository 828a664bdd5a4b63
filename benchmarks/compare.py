"""The methods of SCI's field side by side on the synthetic vision-language world, in the ablation's run
style (benchmarks/ablation.py): the same seeds, each with its own pretrained CLIP, the same budget per
method, paired 95 % intervals against the CLIP-ReID baseline, and the seek fractions.

    python benchmarks/compare.py                           # 5 seeds -> runs/compare/
    python benchmarks/compare.py --seeds 2 --rows clipreid ccaf

Rows: clipreid (the baseline), sci, ccaf and csgn (reconstructions, METHOD.md sections 13-14) from
seed s's pretrained tiny CLIP (csgn also fuses seed s's pretrained tiny-vit CLIP, pretrained here the
same way), and, from random weights, clipreid and cssc: the synthetic world has no ImageNet, so CSSC's
ResNet-50 starts at random, and the random-init CLIP-ReID row is its like-for-like reference (a second
paired interval, CSSC against it). Every
row trains the ablation's stage-2 budget (6 epochs at 1e-3, P x K 64, warm-up 1, drop at 4; CAL, CFM
and CSSC's triplet from epoch 2); CSSC at 128 x 32, the least height its eight stripes allow, the
others at 64 x 32. Writes results.json and results.md (also printed); finished runs are reused.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402
import config  # noqa: E402
import datasets  # noqa: E402
import registry  # noqa: E402
from synthetic import pretrain as pretrain_clip  # noqa: E402
import synthetic  # noqa: E402
import train_stage2  # noqa: E402
import utils  # noqa: E402
from metrics import SETTINGS  # noqa: E402

log = logging.getLogger("compare")
CSSC_SIZE = ("128", "32")  # SMR's 8 stripes need 8 rows after layer3 (stride 16); a narrow width keeps it affordable


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    stage1: tuple[str, ...] | None = ()  # flags of train_stage1.py; None: no stage 1
    stage2: tuple[str, ...] = ()         # flags of train_stage2.py beside --method
    pretrained: bool = True              # False: random weights (CSSC has no ImageNet here)
    vss: bool = False                    # csgn: the seed's pretrained tiny-vit CLIP as --vss-weights

    @property
    def flags(self) -> str:
        """The flags that make the row, --method once (stage 1's and stage 2's are the same method)."""
        stage1 = [f for f in (self.stage1 or ()) if f not in ("--method", self.method)]
        return " ".join(("--method", self.method, *stage1, *self.stage2)) + ("" if self.pretrained else " --weights none")


ROWS = (
    Row("clipreid", "clipreid", ("--method", "clipreid")),
    Row("sci", "sci", ("--ortho", "paper")),
    Row("ccaf", "ccaf", ("--method", "ccaf")),
    Row("csgn", "csgn", ("--method", "csgn"), vss=True),
    Row("clipreid-random-init", "clipreid", ("--method", "clipreid"), pretrained=False),
    Row("cssc-random-init", "cssc", None, ("--arch", "resnet50", "--img-size", *CSSC_SIZE), pretrained=False),
)
ROW_NAMES = tuple(r.name for r in ROWS)
BASELINE = "clipreid"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=ablation.FULL["seeds"], help="seeds per row, 1..N (default: %(default)s)")
    p.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES), help="default: all")
    p.add_argument("--root", default=config.DEFAULT_DATA_ROOT,
                   help="folder of the synthetic benchmark and corpus (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/compare", help="default: %(default)s")
    p.add_argument("--first-clip-seed", type=int, default=0, help="as benchmarks/ablation.py's (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="default: %(default)s")
    p.add_argument("--table", metavar="RESULTS.json", default=None,
                   help="train nothing: print the tables of an earlier run's results.json")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    # the ablation's budget and pretraining, unchanged (its functions read these)
    args.stage1_epochs, args.stage2_epochs = ablation.FULL["stage1_epochs"], ablation.FULL["stage2_epochs"]
    args.stage2_lr, args.batch_size = 1e-3, 64
    args.pretrain_epochs, args.pretrain_batch_size = ablation.FULL["pretrain_epochs"], pretrain_clip.PretrainConfig.batch_size
    args.corpus_people = synthetic.CorpusConfig.people
    return args


def run_row(row: Row, seed: int, weights: str, vss_weights: str | None, args: argparse.Namespace, out: Path,
            backbone: dict) -> Path:
    """Stage 1 (unless the method has none) and stage 2 of one row and seed; returns the stage-2 folder."""
    e = args.stage2_epochs
    argv = [*ablation.common(args, seed, weights), "--output-dir", str(out / f"seed{seed}" / row.name),
            "--method", row.method, "--epochs", str(e), "--lr", str(args.stage2_lr), "--batch-size",
            str(args.batch_size), "--warmup-epochs", "1", "--milestones", str(max(1, e * 7 // 10)), "--eval-every", str(e)]
    reads = train_stage2.method_flags(row.method)
    argv += ["--cal-start", str(e // 4)] if "cal_start" in reads else []  # CAL's and CCAF's CFM
    argv += ["--tri-start", str(e // 4)] if row.method == "cssc" else []  # CSSC's 35 of 120, scaled as CAL's start
    argv += ["--vss-weights", vss_weights] if row.vss else []
    if row.stage1 is not None:
        stage1 = ablation.run_stage1(replace(ablation.Row(row.name), stage1=row.stage1, pretrained=row.pretrained),
                                     seed, weights, args, out, backbone)
        argv += ["--stage1", str(stage1)]
    argv += list(row.stage2)
    folder = out / f"seed{seed}" / row.name
    ablation._run(train_stage2.main, folder, argv, "results.json", "stage 2", backbone)
    return folder


def clips_of(arch: str, args: argparse.Namespace, seeds: list[int]) -> dict[int, tuple[Path, dict]]:
    """Each seed's pretrained CLIP of `arch` (pretraining seed first_clip_seed + seed - 1; cached)."""
    corpus = synthetic.CorpusConfig(people=args.corpus_people)
    return {seed: pretrain_clip.pretrained_clip(args.root, corpus, pretrain_clip.PretrainConfig(
        arch=arch, epochs=args.pretrain_epochs, batch_size=args.pretrain_batch_size,
        seed=args.first_clip_seed + seed - 1)) for seed in seeds}


def print_tables(summary: dict, path: Path) -> None:
    rows = summary["rows"]
    budget = "\n".join(f"| {r['name']} | {np.mean(r['stage2_seconds']):.0f} |" for r in rows)
    paired = rows + [{"name": f"{r['name']} − clipreid-random-init (the same random start)", "paired": r["paired_random"]}
                     for r in rows if "paired_random" in r]
    tables = "\n\n".join((ablation.markdown(rows, summary["pixel_share"]), ablation.effects_markdown(paired, BASELINE),
                          "| row | stage-2 seconds per seed (mean) |\n|---|---|\n" + budget))
    utils.write_atomic(path.parent / "results.md", lambda tmp: Path(tmp).write_text(tables + "\n"))
    print(f"\nThe methods of SCI's field on the synthetic world ({len(rows[0]['seeds'])} seed(s) per row, mean ± "
          f"sample std, %; heat fractions 0-1), each row's paired difference from {BASELINE}\n\n{tables}\n\n"
          f"{summary['seconds']:.0f} s in all; {path}")


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.table:
        path = Path(args.table)
        print_tables(ablation.read_summary(path, "compare"), path)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0, out = time.perf_counter(), Path(args.output_dir)
    device = utils.select_device(args.device)
    seeds = list(range(1, args.seeds + 1))
    rows = [r for r in ROWS if r.name in args.rows]
    clips = clips_of("tiny", args, seeds)
    vits = clips_of("tiny-vit", args, seeds) if any(r.vss for r in rows) else {}
    dataset = datasets.build_dataset("synthetic", args.root)
    results = []
    for row in rows:
        record = {"name": row.name, "flags": row.flags, "seeds": seeds, "stage2_seconds": [],
                  "clip_seeds": [clips[s][1]["params"]["train"]["seed"] for s in seeds],
                  "seek": {k: [] for k in ("identity", "clothes", "background")},
                  **{s: {"rank1": [], "mAP": []} for s in SETTINGS}}
        for seed in seeds:
            weights = str(clips[seed][0]) if row.pretrained else "none"
            backbone = {"clip": clips[seed][1]["params"] if row.pretrained else {},
                        "vss": vits[seed][1]["params"] if row.vss else {}}
            folder = run_row(row, seed, weights, str(vits[seed][0]) if row.vss else None, args, out, backbone)
            model, _, model_config = registry.load_checkpoint_model(folder / "last.pt")
            results_json = json.loads((folder / "results.json").read_text())
            metrics = results_json["metrics"]
            seek = ablation.measure(model, model_config, dataset, args, device, features=False)["seek"]
            for s in SETTINGS:
                for k in ("rank1", "mAP"):
                    record[s][k].append(metrics[s][k])
            for k, v in seek.items():
                record["seek"][k].append(round(v, 4))
            record["stage2_seconds"].append(results_json["train_seconds"])
            log.info("%s seed %d: CC R1 %.1f mAP %.1f, heat on identity %.2f", row.name, seed, metrics["cc"]["rank1"],
                     metrics["cc"]["mAP"], seek["identity"])
        results.append(record)
    ablation.add_paired(results, BASELINE)
    names = {r["name"]: r for r in results}
    if {"cssc-random-init", "clipreid-random-init"} <= set(names):  # CSSC against the CLIP-ReID of the same start
        cssc, clipreid = names["cssc-random-init"], names["clipreid-random-init"]
        cssc["paired_random"] = {key: ablation.paired_difference(cssc[s][k], clipreid[s][k])
                                 for key, (s, k) in ablation.EFFECTS.items()}
    summary = {"clip": [ablation.clip_report(*clips[s]) for s in seeds],
               "vss_clip": [ablation.clip_report(*vits[s]) for s in seeds] if vits else [],
               "units": "metrics in %; heat fractions as fractions; seconds of stage-2 training",
               "rows": results, "pixel_share": ablation.area_fractions(dataset),
               "seconds": round(time.perf_counter() - t0, 1),
               "settings": {k: v for k, v in vars(args).items() if k != "rows"}}
    utils.write_json(out / "results.json", summary)
    print_tables(summary, out / "results.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
