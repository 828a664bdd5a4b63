"""Images per second of stage 2's training input pipeline: JPEG decoding, the training transforms
(bicubic resize, flip, pad + crop, normalise, random erasing) and P x K sampling, exactly as
train_stage2.py builds it (loaders.build_train_loader), per worker and for N workers. A GPU
needs as many workers as its training rate divided by the per-worker rate.

    python benchmarks/bench_loader.py                             # 0, 1, 2 workers at 384x192 (this machine)
    python benchmarks/bench_loader.py --workers 0 1 2 4 8 16       # on a GPU machine
    python benchmarks/bench_loader.py --img-size 256 128 --source-size 128 64   # Market-1501-sized JPEGs

The images are written by the script itself (person-sized JPEGs with smooth colour fields and
noise, so they compress like photographs) into a temporary folder, removed at the end. The first
batch (worker start-up) is not timed. The last lines are a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config  # noqa: E402
import utils  # noqa: E402
from loaders import build_train_loader  # noqa: E402

CLIPREID_WORKERS = 8  # CLIP-ReID configs/person/*.yml: DATALOADER.NUM_WORKERS


def write_images(folder: Path, num_ids: int, per_id: int, size: tuple[int, int], seed: int) -> list[tuple]:
    """num_ids x per_id JPEGs of `size` (H, W) at quality 95; items in the datasets' (path, pid, cam, clothes) form."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    items = []
    for pid in range(num_ids):
        for j in range(per_id):
            # a few smooth colour gradients (body, background) plus sensor-like noise
            a, b, c = (rng.uniform(0, 255, 3) for _ in range(3))
            img = a * yy[..., None] + b * xx[..., None] + c * (1 - yy[..., None]) * 0.5
            img = np.clip(img / 2 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{pid:04d}_{j:02d}.jpg"
            Image.fromarray(img).save(path, quality=95)
            items.append((str(path), pid, j % 4, pid))
    return items


def measure(items: list[tuple], args: argparse.Namespace, workers: int) -> float:
    """Images per second over args.batches batches after the first."""
    loader = build_train_loader(items, tuple(args.img_size), args.batch_size, args.num_instances, workers, seed=0,
                                persistent_workers=False, normalize=(config.IMAGENET_MEAN, config.IMAGENET_STD))
    batches = iter(loader)
    next(batches)  # worker start-up and the first decode
    t0, images = time.perf_counter(), 0
    for _ in range(args.batches):
        try:
            images += len(next(batches)[0])
        except StopIteration:
            break
    seconds = time.perf_counter() - t0
    del batches
    return images / seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="worker counts to measure; 0 decodes in the main process (default: 0 1 2)")
    p.add_argument("--img-size", type=int, nargs=2, default=[384, 192], metavar=("H", "W"),
                   help="training input size the transforms produce (default: 384 192, SCI's)")
    p.add_argument("--source-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"),
                   help="size of the JPEGs written, before resizing; LTCC's and PRCC's crops are about this size "
                        "(default: 256 128)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch, P x K (default: 64, the recipe's)")
    p.add_argument("--num-instances", type=int, default=4, help="K images per identity in a batch (default: 4)")
    p.add_argument("--batches", type=int, default=12, help="timed batches per worker count (default: 12)")
    p.add_argument("--ids", type=int, default=64, help="identities written (default: 64)")
    p.add_argument("--per-id", type=int, default=16, help="images per identity written (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the written images (default: 0)")
    args = p.parse_args(argv)
    if min(args.workers) < 0 or args.batches < 1 or args.batch_size % args.num_instances:
        p.error("--workers must be >= 0, --batches >= 1, and --batch-size a multiple of --num-instances")
    if args.ids * args.per_id < (args.batches + 1) * args.batch_size:
        p.error(f"--ids x --per-id ({args.ids * args.per_id} images) is less than (--batches + 1) x --batch-size; "
                f"write more images or time fewer batches")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as a worker has; the main process's own decoding (0 workers) gets one core too
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        items = write_images(Path(tmp), args.ids, args.per_id, tuple(args.source_size), args.seed)
        print(f"wrote {len(items)} JPEGs of {args.source_size[0]}x{args.source_size[1]} in "
              f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs; input {args.img_size[0]}x{args.img_size[1]}, "
              f"batch {args.batch_size}", flush=True)
        rates = {}
        for workers in args.workers:
            rates[workers] = measure(items, args, workers)
            print(f"{workers} workers: {rates[workers]:.0f} images/s", flush=True)
    single = rates.get(1) or rates.get(0)
    print("\n| workers | images/s | per worker |")
    print("|---|---|---|")
    for workers, rate in rates.items():
        print(f"| {workers} | {rate:.0f} | {rate / workers:.0f} |" if workers else f"| 0 (main process) | {rate:.0f} | - |")
    print(f"\nCLIP-ReID's configuration uses {CLIPREID_WORKERS} workers. A GPU training at R images/s needs about "
          f"R / {single:.0f} workers on CPUs like these.")
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
