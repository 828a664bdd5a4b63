"""A pretraining corpus of captioned people (for a small CLIP; synthetic/pretrain.py), none of them in the
benchmark: `generate_corpus`, `load_corpus`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import hsv_to_rgb

from synthetic.benchmark import _manifest_params, _parallel, _parent, _read_manifest, _workers, _write_folder
from synthetic.draw import BOTTOM_RANGE, TOP_RANGE, _background, _camera, _outfit, _person, _render
from synthetic.words import CAPTION_KINDS, attributes, colour_names
from utils import UserError

CORPUS_VERSION = 3  # bump whenever the corpus generator's output changes
CORPUS_FOLDER = "SYNTH_CORPUS"


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 0
    people: int = 3000
    images_per_person: int = 4
    outfits_per_person: int = 2
    cameras: int = 8
    img_size: tuple[int, int] = (64, 64)  # (height, width): square, the person at the scale of a 64x32 benchmark image
    held_out: float = 0.1  # the last people (by pid) are held out

    def __post_init__(self):
        object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
        checks = [(self.seed >= 0, "seed must be >= 0"),
                  (self.people >= 2, "people (--corpus-people) must be >= 2"),
                  (self.images_per_person >= 1, "images_per_person must be >= 1"),
                  (self.outfits_per_person >= 1, "outfits_per_person must be >= 1"),
                  (self.cameras >= 1, "cameras must be >= 1"),
                  (len(self.img_size) == 2 and self.img_size[0] >= 32 and self.img_size[1] >= 16,
                   "img_size must be (height, width) with height >= 32 and width >= 16"),
                  (0.0 <= self.held_out < 1.0 and self.people - _held_out_count(self) >= 1,
                   "held_out must be in [0, 1) and leave at least one training person")]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"synthetic corpus: {msg} (got {self})")


def _held_out_count(cfg: CorpusConfig) -> int:
    return int(round(cfg.people * cfg.held_out))


EVEN_COLOUR_CANDIDATES = 1024  # draws among which a garment's colour word is chosen (_even_colour)


def _even_colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> tuple[int, int, int]:
    """A garment colour of the benchmark's HSV range whose colour word is uniform over the words that
    range gives (those among EVEN_COLOUR_CANDIDATES draws), then a colour of that word. Drawn as the
    benchmark draws them, hues are mostly green and blue (orange 1 %, beige under 1 % of bottoms),
    so the rare words were hardly learnt (METHOD.md section 11)."""
    n = EVEN_COLOUR_CANDIDATES
    hsv = np.stack([rng.uniform(0, 1, n), rng.uniform(*sat, n), rng.uniform(*val, n)], axis=1)
    rgb = (hsv_to_rgb(hsv) * 255).astype(int)  # truncated, as draw._colour does
    names = colour_names(rgb)
    words = np.unique(names)
    word = words[rng.integers(len(words))]
    return tuple(int(c) for c in rgb[np.flatnonzero(names == word)[0]])


def _corpus_outfit(rng: np.random.Generator) -> dict:
    """draw._outfit with its top and bottom colours drawn evenly over the colour words (_even_colour)."""
    outfit = _outfit(rng)
    outfit.update(top=_even_colour(rng, **TOP_RANGE), bottom=_even_colour(rng, **BOTTOM_RANGE))
    return outfit


def _corpus_plan(cfg: CorpusConfig) -> tuple[dict, dict, dict, list[tuple]]:
    """People, outfits, cameras and images (pid, outfit, camera, index within the person), all
    from streams [seed, 100..103, ...]: the benchmark uses [seed, 0..5], so corpus people are
    none of its people."""
    people = {pid: _person(np.random.default_rng([cfg.seed, 100, pid])) for pid in range(cfg.people)}
    outfits = {pid: [_corpus_outfit(np.random.default_rng([cfg.seed, 101, pid, k])) for k in range(cfg.outfits_per_person)]
               for pid in people}
    cams = {c: _camera(np.random.default_rng([cfg.seed, 102, c])) for c in range(cfg.cameras)}
    images = []
    for pid in people:
        rng = np.random.default_rng([cfg.seed, 103, pid])
        worn = rng.integers(cfg.outfits_per_person, size=cfg.images_per_person)
        seen = rng.integers(cfg.cameras, size=cfg.images_per_person)
        images += [(pid, int(o), int(c), i) for i, (o, c) in enumerate(zip(worn, seen))]
    return people, outfits, cams, images


def _render_corpus(args) -> list[tuple[int, dict]]:
    """Draw a list of corpus images into the images.npy memmap; returns (row, record) pairs.
    Every image has its own seeds, so any split of the work gives the same bytes."""
    cfg, people, outfits, cams, bgs, rows, path = args
    images = np.load(path, mmap_mode="r+")
    first_held = cfg.people - _held_out_count(cfg)
    records, words = [], {}
    for row, (pid, o, c, i) in rows:
        img, _, _ = _render(people[pid], outfits[pid][o], cams[c], bgs[c], cfg.img_size,
                            np.random.default_rng([cfg.seed, 104, pid, i]), parts=False)
        images[row] = np.asarray(img)
        if (pid, o) not in words:
            words[pid, o] = attributes(people[pid], outfits[pid][o])
        attrs = words[pid, o]
        records.append((row, {"pid": pid, "outfit": o, "camera": c, "split": "held_out" if pid >= first_held else "train",
                              **_captions(attrs, cfg.seed, pid, i),
                              "attributes": attrs}))
    images.flush()
    return records


def _captions(attrs: dict, seed: int, pid: int, index: int) -> dict:
    """An image's captions: "caption" (the full one, for retrieval) and "captions", one of each
    kind (full, person, clothes), each from its own stream."""
    texts = {kind: make(attrs, np.random.default_rng([seed, 105, pid, index, k]))
             for k, (kind, make) in enumerate(CAPTION_KINDS.items())}
    return {"caption": texts["full"], "captions": texts}


def generate_corpus(root: str, cfg: CorpusConfig, workers: int | None = None) -> str:
    """Write the captioned corpus to `root/SYNTH_CORPUS` unless an identical one is there: images.npy
    (uint8 N x H x W x 3), records.json (one record per image, same order: pid, outfit, camera,
    split, caption, captions, attributes) and manifest.json. Written, reused and replaced like the
    benchmark (see generate_synthetic); byte-identical for any number of workers."""
    manifest = {"generator": "synthetic.py corpus", "version": CORPUS_VERSION, "params": _manifest_params(cfg)}

    def fill(tmp: str, manifest: dict) -> int:
        people, outfits, cams, images = _corpus_plan(cfg)
        h, w = cfg.img_size
        bgs = {c: _background(cam, 2 * h, 2 * w) for c, cam in cams.items()}
        path = os.path.join(tmp, "images.npy")
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(images), h, w, 3)).flush()
        n = _workers(workers, len(images))
        rows = list(enumerate(images))
        parts = _parallel(_render_corpus, [(cfg, people, outfits, cams, bgs, rows[i::n], path) for i in range(n)])
        records = [rec for _, rec in sorted((r for part in parts for r in part), key=lambda r: r[0])]
        with open(os.path.join(tmp, "records.json"), "w") as f:
            f.write(json.dumps(records))
        held = sum(r["split"] == "held_out" for r in records)
        manifest["counts"] = {"train": len(records) - held, "held_out": held}
        manifest.update(images="images.npy", records="records.json")
        return len(records)

    return _write_folder(_parent(root, CORPUS_FOLDER), CORPUS_FOLDER, manifest, fill, "corpus", "--corpus folder")


def load_corpus(folder: str) -> tuple[np.ndarray, list[dict]]:
    """The corpus in `folder` (SYNTH_CORPUS or the folder holding it): images (N x H x W x 3 uint8,
    memory-mapped) and their records."""
    folder = os.path.join(_parent(folder, CORPUS_FOLDER), CORPUS_FOLDER)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise UserError(f"synthetic: no corpus in {folder} (no readable manifest.json); make one with "
                        f"python -m synthetic --corpus {os.path.dirname(folder) or '.'}")
    if manifest.get("version") != CORPUS_VERSION:
        raise UserError(f"synthetic: the corpus in {folder} is of generator version {manifest.get('version')}, this "
                        f"code reads version {CORPUS_VERSION}: make it again with python -m synthetic --corpus")
    try:
        images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        with open(os.path.join(folder, "records.json")) as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"synthetic: the corpus in {folder} is corrupt ({e}); remove it and make it again") from None
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(records):
        raise UserError(f"synthetic: the corpus in {folder} is corrupt ({images.shape} {images.dtype} images, "
                        f"{len(records)} records); remove it and make it again")
    return images, records
