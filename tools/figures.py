"""Figures that explain a checkpoint (SCI's Fig. 4-6): Grad-CAM heat maps of the test feature with the
seek fractions (the share of the heat on identity parts, clothes and background), and a t-SNE of the
gallery features. evaluate.py evaluates (its --visualize draws the ranked lists and CMC curve of the
ranking it computes); this tool explains.

    python tools/figures.py --checkpoint runs/sci/best.pt --heatmaps 8 --tsne
    python tools/figures.py --checkpoint runs/ablation/seed1/sci/last.pt --compare runs/ablation/seed1/baseline/last.pt \\
        --heatmaps 8 --heatmap-layer layer1 --tsne
    python tools/figures.py --features feats.npz --tsne            # saved features, no model needed

writes heatmaps.png and tsne.png to --out-dir (default: the folder of the checkpoint or features file).
With part masks (the synthetic benchmark's own, or a human parser's with --masks DIR, as for
python -m datasets --stats) --heatmaps also prints the seek fractions (gradcam.py) of every query and
gallery image and adds them to results.json there under "seek" (and "seek_compare"), keeping its other keys.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# run as `python tools/figures.py`: import the project's modules, not this folder's
ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[0] = str(ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
from metrics import SETTINGS  # noqa: E402
from utils import UserError  # noqa: E402

HEATMAP_BATCH = 64              # images per Grad-CAM pass at most (it keeps activations and gradients)


def gallery_tsne(protocol: dict, path: Path, source: str) -> None:
    """tsne.png: the gallery features of a protocol dict, colour = identity, marker = outfit."""
    import visualize

    g = protocol["gallery"]
    if g.get("pids") is None:
        raise UserError(f"--tsne colours the gallery by identity, and protocol {protocol['name']!r} has no identity "
                        f"labels; search with --labels CSV, or use a dataset's features")
    clothes = g["clothes"] if g.get("clothes") is not None else np.zeros(len(g["pids"]), dtype=np.int64)
    visualize.tsne_figure(torch.as_tensor(g["feats"]).float().cpu().numpy(), np.asarray(g["pids"]),
                          np.asarray(clothes), path, f"t-SNE of the gallery features\n{source}")
    print(f"wrote {path}")


def write_seek(out_dir: Path, seek: dict) -> None:
    """results.json's "seek" and "seek_compare" become this run's (none where masks were missing); its
    other keys (the training run's record, evaluate.py's) stay."""
    import utils

    path = out_dir / "results.json"
    record = evaluate.read_results(path)
    kept = {k: v for k, v in record.items() if k not in ("seek", "seek_compare")}
    if seek or kept != record:  # no seek fractions and none to drop: nothing to write
        utils.write_json(path, kept | seek)
        print(f"wrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="FILE.pt",
                     help="stage-2 checkpoint to explain (default: runs/sci/best.pt, where train_stage2.py writes)")
    src.add_argument("--features", metavar="FILE.npz",
                     help="features file of evaluate.py --save-features (or tools/search.py's, with labels): "
                          "--tsne without a model")
    p.add_argument("--heatmaps", type=int, default=0, metavar="N",
                   help="with --checkpoint: Grad-CAM of the test feature for N test images (queries first, spread "
                        "over identities) as heatmaps.png; with part masks (synthetic, or --masks) also the seek fractions (share "
                        "of the heat on identity parts, clothes, background) of all query and gallery images, "
                        "printed and saved in results.json under \"seek\"")
    p.add_argument("--compare", metavar="CKPT",
                   help="with --heatmaps: a second checkpoint (e.g. the baseline) whose row is added to "
                        "heatmaps.png and whose seek fractions go under \"seek_compare\"")
    p.add_argument("--heatmap-layer", choices=("layer1", "layer2", "layer3", "layer4"), default=None,
                   help="ResNet feature map for --heatmaps (default: layer4, the last); at small inputs an earlier "
                        "one resolves parts (benchmarks/ablation.py uses layer1 at 64x32, where layer4 is 4x2)")
    p.add_argument("--masks", metavar="DIR",
                   help="with --heatmaps on a real dataset: its part masks for the seek fractions, one label PNG of "
                        "a human parser (SCHP's LIP labels) per image at the image's path relative to the dataset "
                        "folder (masks.py); the synthetic benchmark's own masks are used without it")
    p.add_argument("--tsne", action="store_true",
                   help="save a t-SNE of the gallery features (colour = identity, marker = outfit) as tsne.png")
    p.add_argument("--dataset", help="dataset name (default: the one stored in the checkpoint)")
    p.add_argument("--root", help="folder holding the dataset's own folder (default: the checkpoint's)")
    p.add_argument("--setting", choices=("all", *SETTINGS), default="all",
                   help="the protocol whose test images are drawn (default: all: the first one's for the figures, "
                        "every protocol's images for the seek fractions)")
    p.add_argument("--out-dir", help="where the figures and results.json go (default: the folder of the checkpoint "
                                     "or features file)")
    evaluate.add_extraction_args(p)
    args = p.parse_args(argv)
    if args.heatmaps < 0 or args.batch_size < 1 or (args.workers or 0) < 0:
        p.error("--heatmaps and --workers must be >= 0, --batch-size >= 1")
    return args


def check_flags(args: argparse.Namespace) -> None:
    """What is asked for and what it needs, refused before any work starts."""
    if args.compare and not args.heatmaps:
        raise UserError("--compare adds a row to the --heatmaps figure; pass --heatmaps N too")
    if args.masks and not args.heatmaps:
        raise UserError("--masks gives the part masks of the --heatmaps seek fractions; pass --heatmaps N too")
    if not (args.heatmaps or args.tsne):
        raise UserError("nothing to draw: pass --heatmaps N (Grad-CAM and seek fractions) and/or --tsne")
    if args.flip and not args.tsne:  # Grad-CAM explains the unflipped image's feature
        raise UserError("--flip sets the feature extraction of --tsne, which is not asked for; drop it")
    if args.features and (args.heatmaps or args.dataset or args.root or args.flip):
        raise UserError("--heatmaps, --compare, --dataset, --root and --flip need --checkpoint: Grad-CAM explains "
                        "a model, and a features file has none (it is already extracted)")


def _run(argv: list[str] | None) -> int:
    import config
    import utils

    args = parse_args(argv)
    check_flags(args)
    device = utils.select_device(args.device)
    args.workers = utils.default_workers(device.type) if args.workers is None else args.workers
    if args.features:
        protocols, _ = evaluate.load_features(args.features)
        protocol = evaluate.select(protocols, args.setting, lambda p: p["name"])[0]
        gallery_tsne(protocol, Path(args.out_dir or Path(args.features).parent) / "tsne.png",
                     f"features file {Path(args.features).name}")
        return 0

    import masks
    from datasets import build_dataset
    from gradcam import explain
    from registry import load_checkpoint_model

    args.checkpoint = args.checkpoint or f"{config.DEFAULT_OUTPUT_DIR}/best.pt"
    model, ckpt_args, model_config = load_checkpoint_model(args.checkpoint, device)
    args.flip = evaluate.resolve_flip(args.flip, ckpt_args)
    data = build_dataset(args.dataset or ckpt_args["dataset"], args.root or ckpt_args["root"])
    chosen = evaluate.select(data.protocols, args.setting, lambda p: p[0])
    out_dir = Path(args.out_dir or Path(args.checkpoint).parent)
    label = evaluate.checkpoint_label(args.checkpoint, ckpt_args)
    if args.heatmaps:
        runs = [(args.checkpoint, model, model_config, label)]
        if args.compare:
            other, other_args, other_config = load_checkpoint_model(args.compare, device)
            runs.append((args.compare, other, other_config, evaluate.checkpoint_label(args.compare, other_args)))
        out_dir.mkdir(parents=True, exist_ok=True)
        # the seek fractions' part masks: --masks DIR (every mask checked now), else the synthetic benchmark's own
        source = masks.mask_source(data, args.masks, check=args.masks is not None)
        seek = explain(runs, chosen, args.heatmaps, out_dir / "heatmaps.png", device,
                       min(args.batch_size, HEATMAP_BATCH), masks=source, layer=args.heatmap_layer,
                       clothes_names=data.clothes_names())
        write_seek(out_dir, seek)
    if args.tsne:  # the first protocol's features alone
        (protocol,) = evaluate.protocol_features(model, chosen[:1], tuple(model_config.img_size), args.batch_size,
                                                 args.workers, device, flip=args.flip,
                                                 normalize=(model_config.pixel_mean, model_config.pixel_std))
        gallery_tsne(protocol, out_dir / "tsne.png", label)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input becomes one `error: ...` line on stderr and exit status 2, a stop exit status 130."""
    import utils

    return utils.run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
