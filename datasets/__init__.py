"""Datasets for cloth-changing person re-identification: a package, one concern per module.

One class per on-disk layout (METHOD.md section 6), all with the same interface:
`.train`, `.query`, `.gallery` are lists of `(path, pid, camid, clothes_id)`; training pids and
clothes are relabelled 0..n-1 in sorted order of the raw keys; test pids keep their raw ids and
query/gallery share one clothes mapping; `.protocols` lists `(setting, query, gallery, mask)`
for evaluation. `build_dataset(name, root)` picks the class from the registry `DATASETS`.

    datasets/base.py      ReIDDataset (locating, scanning, relabelling, the check of every image:
                          `check_images`, and `check_files` for other per-image files such as part
                          masks), Item, which files are images (image_extensions, list_images),
                          decode_problem, BadEntry
    datasets/layouts.py   the public datasets' layouts (LTCC, PRCC, VC-Clothes, Market-1501, MSMT17,
                          Celeb-reID, DeepChange) and `synthetic` (its generator is the synthetic
                          package, imported only for this dataset; generated on first use)
    datasets/custom.py    your own data (`custom`) and the label-CSV reader that tools/search.py
                          shares (read_label_csv)
    datasets/__init__.py  this: the registry, build_dataset, train_fingerprint, the --stats CLI

How images become batches is loaders.py; part masks are masks.py.

    python -m datasets --stats ltcc --root /data
    python -m datasets --stats synthetic --root data     # the benchmark under data (made by python -m synthetic)
    python -m datasets --stats custom --root mydata      # your own data: mydata/{train,query,gallery}.csv
    python -m datasets --stats ltcc --root /data --masks /data/LTCC_parsing   # + part-mask coverage (masks.py)

Your own labelled data (`--dataset custom --root DIR`): one CSV per split in DIR, `train.csv`,
`query.csv` and `gallery.csv`, one image per row, paths relative to DIR (or absolute); pid and
camid are integers, the optional clothes column is any text (an outfit of that identity):

    path,pid,camid,clothes
    images/0001_c0_a.jpg,1,0,red_coat
    images/0001_c2_b.jpg,1,2,grey_suit
    /data/more/0002_017.jpg,2,3,red_coat

Without the clothes column only the general protocol is evaluated and stage 2 has no clothes-
adversarial loss. A negative pid (Market-1501's -1) marks a gallery distractor: it never matches a
query; train and query rows must not have one. Every row is checked, and every image of every
dataset decoded, before anything trains (class `Custom`, `build_dataset`).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import os

from datasets.base import (BadEntry, Item, ReIDDataset, decode_problem, image_extensions, list_images,
                           log)
from datasets.custom import LABEL_COLUMNS, Custom, LabelRow, parse_int, read_label_csv
from datasets.layouts import (LTCC, MSMT17, PRCC, CelebReID, DeepChange, Market1501, Synthetic, VCClothes,
                              VCClothesCC, VCClothesSC)
from utils import UserError, run_cli

__all__ = ["BadEntry", "Item", "ReIDDataset", "decode_problem", "image_extensions", "list_images", "log",
           "LABEL_COLUMNS", "Custom", "LabelRow", "parse_int", "read_label_csv",
           "LTCC", "MSMT17", "PRCC", "CelebReID", "DeepChange", "Market1501", "Synthetic", "VCClothes",
           "VCClothesCC", "VCClothesSC", "DATASETS", "train_fingerprint", "build_dataset", "main"]


DATASETS = {cls.name: cls for cls in (LTCC, PRCC, VCClothes, VCClothesSC, VCClothesCC, Market1501, MSMT17,
                                      CelebReID, DeepChange, Custom, Synthetic)}


def train_fingerprint(train: list[tuple]) -> str:
    """Identifies a training split (names and labels), so stage 2 can refuse another dataset's banks."""
    digest = hashlib.sha1()
    for path, pid, _, clothes in train:
        digest.update(f"{os.path.basename(path)} {pid} {clothes}\n".encode())
    return digest.hexdigest()


def build_dataset(name: str, root: str, skip_hint: str | None = None, check_images: bool = True,
                  **options) -> ReIDDataset:
    """Parse dataset `name` under `root` and decode every image (ReIDDataset.check_images; off with
    check_images=False). Options: skip_bad (all), SyntheticConfig fields (synthetic). `skip_hint`:
    how the caller's user skips bad entries (e.g. "--skip-bad"); without one the error about a bad
    entry says only to fix or remove it (the training scripts have no such flag)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    cls = DATASETS[name]
    if cls is Synthetic:
        from synthetic import SyntheticConfig  # only for --dataset synthetic

        accepted = set(SyntheticConfig.__dataclass_fields__) | {"skip_bad"}
    else:
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "root"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(f"dataset {name} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(accepted))}")
    try:
        dataset = cls(root, **options)
    except BadEntry as e:
        raise UserError(e.message(skip_hint)) from None
    if check_images:
        dataset.check_images()
    return dataset


# -----------------------------------------------------------------------------
# Command line

def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets", description="Dataset statistics. The synthetic benchmark is made and previewed by "
                                             "python -m synthetic; the colour-histogram check is benchmarks/colour_histogram.py.")
    ap.add_argument("--stats", metavar="NAME", required=True, help=f"print statistics of a dataset: {', '.join(DATASETS)}")
    ap.add_argument("--root", required=True, help="folder holding the dataset's folder (or the dataset's folder itself; "
                                            "custom: the folder of train.csv, query.csv and gallery.csv)")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip files that do not match the naming pattern or list lines and CSV rows that are bad "
                         "or name a missing image (reports how many, and why); images that cannot be decoded are "
                         "always an error")
    ap.add_argument("--masks", metavar="DIR",
                    help="a folder of part masks (human parsing, SCHP's LIP labels) with one label PNG per image at the "
                         "image's path relative to the dataset folder: reports how many images have a usable one and "
                         "the pixels per part; the synthetic benchmark's own masks are reported without it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # synthetic: the benchmark under root as it is (the default one is generated, and said, if none);
    # every image is decoded, as the training scripts' build_dataset does
    dataset = build_dataset(args.stats, args.root, skip_hint="--skip-bad", skip_bad=args.skip_bad)
    print(dataset.statistics())
    if args.masks is not None or args.stats == "synthetic":
        import masks  # here only: the layouts need neither masks.py nor the synthetic package it reads

        source = masks.mask_source(dataset, args.masks, check=False)
        found = dataset.file_problems(source.problem)
        print(masks.coverage(dataset, source, found))
        masks.check_masks(dataset, source, found)  # bad or missing masks: the error line, exit status 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """The --stats CLI (`python -m datasets`, datasets/__main__.py): bad input is one `error:` line and exit status 2."""
    return run_cli(_main, argv)
