"""How far a pure clothes-colour matcher gets on a benchmark: the clothes shortcut, measured.

    python -m synthetic --make /tmp/syn
    python benchmarks/colour_histogram.py --root /tmp/syn                     # synthetic: whole image + head
    python benchmarks/colour_histogram.py --root /data --dataset ltcc         # any dataset: whole image

Features: grey-world normalised per-channel colour histograms (square-rooted, L2-normalised), of
the whole image and, on the synthetic benchmark (which records person boxes), of the head region.
Distances are cosine; the metrics are metrics.rank_metrics, the project's one implementation of
the protocols. Prints mAP % per protocol.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets  # noqa: E402
import loaders  # noqa: E402
import metrics  # noqa: E402
from utils import UserError, run_cli  # noqa: E402


def colour_histogram(path: str, bins: int = 8, box: list[float] | None = None) -> np.ndarray:
    """Per-channel colour histogram of an image (or of `box` in it), square-rooted, L2-normalised.

    Grey-world normalisation first (each channel scaled to mean 128) cancels a camera's gain and
    colour cast, and the square root (Hellinger) stops the flat background's one big peak from
    dominating the cosine: without both, a histogram matches cameras, not clothes.
    """
    img = np.asarray(loaders.open_rgb(path), np.float32)
    img = img * (128.0 / (img.reshape(-1, 3).mean(0) + 1e-6))  # over the whole image, before any crop
    if box is not None:
        x0, y0, x1, y1 = (int(round(c)) for c in box)
        img = img[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)]
    q = np.clip(img, 0, 255).astype(np.int64) * bins // 256
    hist = np.sqrt(np.concatenate([np.bincount(q[..., c].ravel(), minlength=bins) for c in range(3)]))
    return hist / (np.linalg.norm(hist) + 1e-12)


def head_box(pbox: list[float]) -> list[float]:
    """Top 20% of the person box, middle half of its width: hair, face, glasses."""
    x0, y0, x1, y1 = pbox
    return [x0 + 0.25 * (x1 - x0), y0, x1 - 0.25 * (x1 - x0), y0 + 0.2 * (y1 - y0)]


def histograms(dataset: datasets.ReIDDataset, region: str = "whole", bins: int = 8) -> dict[str, np.ndarray]:
    """path -> histogram, for every image in the dataset's protocols (each computed once)."""
    if region == "head" and not hasattr(dataset, "boxes"):
        raise UserError(f"the head region needs person boxes, which only the synthetic benchmark has (got {dataset.name})")
    feats: dict[str, np.ndarray] = {}
    for _, q, g, _ in dataset.protocols:
        for path, *_ in q + g:
            if path not in feats:
                key = os.path.relpath(path, dataset.dir).replace(os.sep, "/")
                feats[path] = colour_histogram(path, bins, head_box(dataset.boxes[key]) if region == "head" else None)
    return feats


def protocol_map(feats: dict[str, np.ndarray], query: list, gallery: list, mask: str) -> float:
    """mAP (percent) of cosine distance between histograms, by metrics.rank_metrics."""
    qf = np.stack([feats[it[0]] for it in query])
    gf = np.stack([feats[it[0]] for it in gallery])
    # labels as contiguous columns (pid, camera, clothes): rank_metrics searches them
    (qp, qc, qo), (gp, gc, go) = (np.ascontiguousarray(np.array([it[1:] for it in items]).reshape(-1, 3).T)
                                  for items in (query, gallery))
    return 100.0 * metrics.rank_metrics(1.0 - qf @ gf.T, qp, gp, qc, gc, qo, go, setting=mask)["mAP"]


def colour_histogram_baseline(dataset: datasets.ReIDDataset, region: str = "whole", bins: int = 8) -> dict[str, float]:
    """Protocol name -> mAP (percent). region "whole": clothes dominate, so CC should be far below SC;
    region "head" (synthetic only): identity cues."""
    feats = histograms(dataset, region, bins)
    return {name: protocol_map(feats, q, g, mask) for name, q, g, mask in dataset.protocols}


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder holding the dataset's folder (or the dataset's folder itself)")
    ap.add_argument("--dataset", default="synthetic", help=f"one of {', '.join(datasets.DATASETS)} (default synthetic)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # e.g. 'generating the default one'
    ds = datasets.build_dataset(args.dataset, args.root)  # synthetic: the benchmark that is there
    for region in ["whole"] + (["head"] if hasattr(ds, "boxes") else []):
        res = colour_histogram_baseline(ds, region)
        print(f"colour-histogram ({region}) mAP %: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
