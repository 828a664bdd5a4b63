"""Part masks: one label map per image, in one part set (`PARTS`: background, skin, hair, glasses, bag,
shoes, top, bottom; METHOD.md section 6.1), which the synthetic world draws its masks in.

Two sources (`MaskSource`): the synthetic benchmark's own masks (SYNTH_CC/masks/, already in PARTS), and
a human parser's label PNGs for real datasets (`--masks DIR`), as the public SCHP releases for LTCC, PRCC
and VC-Clothes give them: one PNG per image at the image's path relative to the dataset folder, with the
extension .png, holding LIP's 20 labels, which `SCHP_PARTS` maps to PARTS. `mask_source(dataset, masks_dir)`
finds a dataset's masks and reads every one up front, as build_dataset decodes every image;
`loaders.ImageDataset(items, transform, masks)` then carries each mask with its image.

    python -m datasets --stats ltcc --root /data --masks /data/LTCC_parsing   # coverage and pixels per part
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from utils import UserError

PARTS = ("background", "skin", "hair", "glasses", "bag", "shoes", "top", "bottom")  # label = index
IDENTITY_PARTS = ("skin", "hair", "glasses", "bag", "shoes")  # what a person keeps across outfits
CLOTHES_PARTS = ("top", "bottom")                             # what changes with an outfit
SYNTHETIC_MASKS = "masks"  # the synthetic benchmark's masks: SYNTH_CC/masks/{split}/{image name}

# LIP's labels as SCHP writes them (label = position), each with the part of PARTS it counts as. Clothes
# (top, bottom) are what changes with an outfit; the rest of the person (skin, hair, glasses, shoes) is kept
# across outfits, as in the synthetic world, whose people keep their shoes. One-piece garments count as top:
# SCHP does not split them at the waist (the clothes / person split, which the seek fractions use, is exact).
SCHP_PARTS: tuple[tuple[str, str], ...] = (
    ("background", "background"),  # 0
    ("hat", "top"),                # 1  worn with an outfit
    ("hair", "hair"),              # 2
    ("glove", "top"),              # 3  worn with an outfit
    ("sunglasses", "glasses"),     # 4
    ("upper-clothes", "top"),      # 5
    ("dress", "top"),              # 6  one piece
    ("coat", "top"),               # 7
    ("socks", "bottom"),           # 8  worn with an outfit
    ("pants", "bottom"),           # 9
    ("jumpsuits", "top"),          # 10 one piece
    ("scarf", "top"),              # 11 worn with an outfit
    ("skirt", "bottom"),           # 12
    ("face", "skin"),              # 13
    ("left-arm", "skin"),          # 14
    ("right-arm", "skin"),         # 15
    ("left-leg", "skin"),          # 16
    ("right-leg", "skin"),         # 17
    ("left-shoe", "shoes"),        # 18
    ("right-shoe", "shoes"),       # 19
)
_SCHP_TO_PART = np.array([PARTS.index(part) for _, part in SCHP_PARTS], dtype=np.uint8)  # label -> PARTS index
PERSON_PARTS = IDENTITY_PARTS  # what a person keeps across outfits (synthetic: bag too; SCHP has no bag label)
assert set(CLOTHES_PARTS) | set(PERSON_PARTS) | {"background"} == set(PARTS)


class _Bad(Exception):
    """Why a mask file cannot serve (the message names the file)."""


class MaskSource:
    """Where the part mask of each image of one dataset is, and how its labels become PARTS indices.

    kind "synthetic": the benchmark's masks/ tree (SYNTHETIC_MASKS), labels already in PARTS; kind
    "schp": `masks_dir`/<the image's path relative to `dataset_dir`, extension .png>, LIP labels 0-19
    mapped by SCHP_PARTS. Plain attributes only, so DataLoader workers receive it pickled.
    """

    def __init__(self, kind: str, dataset_dir: str, masks_dir: str | None = None):
        if kind not in ("synthetic", "schp") or (kind == "schp") != (masks_dir is not None):
            raise ValueError(f"MaskSource({kind!r}, masks_dir={masks_dir!r}): a synthetic source has no masks_dir, "
                             f"an schp source needs one")
        self.kind, self.dataset_dir, self.masks_dir = kind, dataset_dir, masks_dir

    def __repr__(self) -> str:
        return f"MaskSource({self.describe()})"

    def describe(self) -> str:
        return ("the synthetic benchmark's masks" if self.kind == "synthetic"
                else f"SCHP label PNGs (LIP labels) under {self.masks_dir}")

    @property
    def fix(self) -> str:
        """What the user does about a missing or bad mask."""
        if self.kind == "synthetic":
            return "Regenerate the benchmark with python -m synthetic --make (generator version 2 writes masks)"
        return (f"Give every image a label PNG of LIP's labels 0-19 (as SCHP writes them), at the image's size and at "
                f"its path relative to {self.dataset_dir} under {self.masks_dir}, or leave out --masks")

    def path(self, image_path: str) -> str:
        """The mask file of an image (UserError for an image outside the dataset folder)."""
        rel = os.path.relpath(os.path.abspath(image_path), os.path.abspath(self.dataset_dir))
        if rel.split(os.sep)[0] == os.pardir:  # e.g. a custom CSV's absolute path elsewhere
            where = "--masks " + self.masks_dir if self.kind == "schp" else "the synthetic benchmark's masks"
            raise UserError(f"image {image_path} is outside the dataset folder {self.dataset_dir}, so {where} "
                            f"has no place for its part mask; move the image under {self.dataset_dir}")
        if self.kind == "synthetic":  # SYNTH_CC/test/x.png -> SYNTH_CC/masks/test/x.png
            return os.path.join(self.dataset_dir, SYNTHETIC_MASKS, rel)
        return os.path.join(self.masks_dir, os.path.splitext(rel)[0] + ".png")

    def read(self, image_path: str) -> np.ndarray:
        """The part mask of an image: H x W uint8, indices into PARTS. UserError naming the file when it is
        missing, cannot be read or holds a label outside its set (mask_source checked them all up front)."""
        try:
            return self._load(image_path)
        except _Bad as e:
            raise UserError(f"{e}. {self.fix}") from None

    def problem(self, image_path: str) -> str | None:
        """Why the image's mask cannot serve (missing, unreadable, a label outside the set, another size than
        the image), or None: the check of every mask (datasets.base.ReIDDataset.check_files)."""
        try:
            labels = self._load(image_path)
            with Image.open(image_path) as img:  # the header only: build_dataset has decoded the image
                width, height = img.size
        except (_Bad, UserError) as e:
            return str(e)
        except (OSError, ValueError) as e:
            return f"image {image_path} cannot be read ({e})"
        if labels.shape != (height, width):
            return (f"part mask {self.path(image_path)} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                    f"{width}x{height}")
        return None

    def _load(self, image_path: str) -> np.ndarray:
        path = self.path(image_path)
        if not os.path.isfile(path):
            raise _Bad(f"part mask {path} does not exist")
        try:
            with Image.open(path) as m:
                if m.mode not in ("L", "P"):  # P: SCHP's palette PNGs, whose palette index is the label
                    raise _Bad(f"part mask {path} holds {m.mode} pixels, not labels (a coloured rendering?)")
                labels = np.asarray(m)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise _Bad(f"part mask {path} cannot be read ({e})") from None
        table = _SCHP_TO_PART if self.kind == "schp" else np.arange(len(PARTS), dtype=np.uint8)
        top = int(labels.max()) if labels.size else 0
        if top >= len(table):
            names = "LIP/SCHP's labels" if self.kind == "schp" else ", ".join(PARTS)
            raise _Bad(f"part mask {path} holds label {top}, outside 0-{len(table) - 1} ({names})")
        return table[labels]  # a new, writable array


def mask_source(dataset, masks_dir: str | None, check: bool = True) -> MaskSource | None:
    """The part masks of `dataset` (a datasets.ReIDDataset): with `masks_dir` (--masks) SCHP label PNGs there
    (DIR may also be the folder that holds one named like the dataset's folder, as --root); without it the
    synthetic benchmark's own masks, and None for any other dataset. check: read every mask of train, query
    and gallery now, in threads; one UserError lists all that are missing or bad (check_masks)."""
    if masks_dir is None:
        if dataset.name != "synthetic":
            return None
        source = MaskSource("synthetic", dataset.dir)
    else:
        if not os.path.isdir(masks_dir):
            raise UserError(f"--masks {masks_dir} is not a folder; give the folder of the part masks (one label PNG "
                            f"per image at its path relative to {dataset.dir})")
        nested = os.path.join(masks_dir, dataset.folder) if dataset.folder else masks_dir
        source = MaskSource("schp", dataset.dir, nested if os.path.isdir(nested) else masks_dir)
    if check:
        check_masks(dataset, source)
    return source


def check_masks(dataset, source: MaskSource, found: dict[str, str | None] | None = None) -> None:
    """One UserError listing every image whose mask is missing or bad, with what to do (`found`: the result
    of dataset.file_problems(source.problem), if already known)."""
    dataset.check_files(source.problem, "part masks are missing or bad", source.fix + ".", found=found)


def coverage(dataset, source: MaskSource, found: dict[str, str | None]) -> str:
    """Lines for `python -m datasets --stats`: per split how many images have a usable mask, and the share of the
    pixels of each part over those masks (a wrong label mapping shows here first)."""
    counts = []
    for split, items in (("train", dataset.train), ("query", dataset.query), ("gallery", dataset.gallery)):
        usable = sum(found.get(it[0]) is None for it in items)
        counts.append(f"{split} {usable} of {len(items)}")
    good = [p for p, why in found.items() if why is None]
    pixels = np.zeros(len(PARTS), dtype=np.int64)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for labels in pool.map(source.read, good):
            pixels += np.bincount(labels.ravel(), minlength=len(PARTS))
    shares = ", ".join(f"{part} {100 * n / max(1, pixels.sum()):.1f} %" for part, n in zip(PARTS, pixels))
    return f"  part masks ({source.describe()}): images with a usable one: {', '.join(counts)}\n  pixels per part: {shares}"
