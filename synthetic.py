"""The synthetic cloth-changing benchmark: people with persistent identity traits wearing
several outfits, seen by cameras that differ in background, light, colour cast, scale, blur and
noise, drawn procedurally and deterministically from a seed and written in the LTCC layout
(`datasets.py` reads it with the LTCC parser: `build_dataset("synthetic", root)`).

Every image also has words and parts: its attributes and a caption (`attributes`, `caption`; in
SYNTH_CC/annotations.json, read by `load_annotations`; `ATTRIBUTE_VALUES` and
`zero_shot_prompts` for zero-shot probes) and a part label map (`PARTS`; in
SYNTH_CC/masks/{split}/, read by `load_mask`). A separate corpus of captioned people, none of
them in the benchmark, is for pretraining a small CLIP (`generate_corpus`, `load_corpus`).

This module does not import datasets.py (which imports it); the colour-histogram check of the
clothes shortcut lives in benchmarks/colour_histogram.py.

    python synthetic.py --make data --preview preview.png          # make the benchmark under data/
    python synthetic.py --preview preview.png --root data          # preview of the benchmark there
    python synthetic.py --corpus data [--corpus-people 3000]       # the pretraining corpus: data/SYNTH_CORPUS
"""
from __future__ import annotations

import argparse
import colorsys
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from utils import STOP_SIGNALS, UserError, run_cli, stop_signals_held

log = logging.getLogger("datasets")  # one logger with datasets.py: its users see the regeneration lines

# -----------------------------------------------------------------------------
# The synthetic cloth-changing benchmark

SYNTH_VERSION = 2  # bump whenever the generator's output changes: cached copies regenerate
SYNTH_FOLDER = "SYNTH_CC"
MASK_FOLDER = "masks"  # SYNTH_CC/masks/{split}/{image name}: part label maps
ANNOTATIONS = "annotations.json"  # image key (as in boxes.json) -> caption and attributes


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    num_train_ids: int = 60
    num_test_ids: int = 40
    outfits: int = 4             # outfits per identity: uniform in [max(2, outfits-1), outfits+1]
    cameras: int = 4
    img_size: tuple[int, int] = (128, 64)  # (height, width)
    shared_outfits: float = 0.15  # chance that an outfit copies another person's outfit

    def __post_init__(self):
        object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
        checks = [(self.seed >= 0, "seed must be >= 0"),
                  (self.num_train_ids >= 2, "num_train_ids (--train-ids) must be >= 2"),
                  (self.num_test_ids >= 2, "num_test_ids (--test-ids) must be >= 2"),
                  (self.outfits >= 2, "outfits must be >= 2 (cloth-changing needs two outfits)"),
                  (self.cameras >= 2, "cameras must be >= 2 (every match comes from another camera)"),
                  (len(self.img_size) == 2 and self.img_size[0] >= 32 and self.img_size[1] >= 16,
                   "img_size must be (height, width) with height >= 32 and width >= 16"),
                  (0.0 <= self.shared_outfits <= 1.0, "shared_outfits must be in [0, 1]")]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"synthetic: {msg} (got {self})")


# Identity traits come from small distinct palettes so that they stay recognisable at 128x64.
SKIN = [(255, 222, 196), (236, 188, 150), (214, 160, 115), (182, 120, 80), (140, 90, 58), (96, 62, 40)]
HAIR = [(22, 18, 18), (72, 44, 24), (128, 84, 44), (222, 190, 110), (180, 70, 30), (150, 150, 150),
        (238, 236, 228), (40, 70, 200), (220, 70, 160), (40, 160, 80)]
HAIR_STYLES = ["short", "long", "bun", "spiky", "ponytail", "afro", "bald"]
SHOES = [(245, 245, 245), (25, 25, 25), (210, 30, 30), (30, 80, 220), (245, 205, 30), (30, 170, 70),
         (245, 120, 20), (140, 50, 180)]
TOP_PATTERNS = ["solid", "solid", "hstripes", "vstripes", "checks", "dots"]
BOTTOM_PATTERNS = ["solid", "solid", "solid", "vstripes", "checks"]


def _colour(rng: np.random.Generator, sat=(0.25, 0.95), val=(0.2, 0.95)) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val))
    return (int(r * 255), int(g * 255), int(b * 255))


def _jitter(rng: np.random.Generator, rgb, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _person(rng: np.random.Generator) -> dict:
    """Traits that never change: what a cloth-changing model has to learn."""
    return dict(skin=_jitter(rng, SKIN[rng.integers(len(SKIN))], 8),
                hair=_jitter(rng, HAIR[rng.integers(len(HAIR))], 10),
                style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
                shoes=_jitter(rng, SHOES[rng.integers(len(SHOES))], 10),
                height=rng.uniform(0.86, 1.0), width=rng.uniform(0.85, 1.15), head=rng.uniform(0.92, 1.12),
                glasses=bool(rng.random() < 0.35),
                bag=[None, "shoulder", "backpack"][rng.choice(3, p=[0.45, 0.3, 0.25])],
                bag_colour=_colour(rng, sat=(0.5, 1.0), val=(0.3, 0.9)))


def _outfit(rng: np.random.Generator) -> dict:
    """Clothes of one recording day: large areas, the easy shortcut."""
    return dict(top=_colour(rng), top2=_colour(rng), top_pattern=TOP_PATTERNS[rng.integers(len(TOP_PATTERNS))],
                top_period=rng.uniform(0.03, 0.06), sleeves=["long", "short"][rng.integers(2)],
                bottom=_colour(rng, val=(0.15, 0.8)), bottom2=_colour(rng),
                bottom_pattern=BOTTOM_PATTERNS[rng.integers(len(BOTTOM_PATTERNS))],
                bottom_period=rng.uniform(0.03, 0.06), bottom_type=["trousers", "trousers", "shorts", "skirt"][rng.integers(4)])


def _camera(rng: np.random.Generator) -> dict:
    """What a camera changes: background layout, light and colour cast, scale, position, blur, noise.

    Backgrounds are muted greys with a slight tint and the light changes are mild, as in real
    re-id crops: the people, not the scenes, should dominate colour statistics.
    """
    return dict(wall=_colour(rng, sat=(0.0, 0.1), val=(0.5, 0.65)), floor=_colour(rng, sat=(0.0, 0.1), val=(0.4, 0.55)),
                horizon=rng.uniform(0.5, 0.75), texture=int(rng.integers(4)), texture_seed=int(rng.integers(2**31)),
                gain=rng.uniform(0.9, 1.1), cast=tuple(rng.uniform(0.95, 1.05, 3)), scale=rng.uniform(0.84, 0.94),
                x=rng.uniform(0.47, 0.53), feet=rng.uniform(0.975, 0.995), blur=rng.uniform(0.0, 0.8),
                noise=rng.uniform(1.0, 5.0))


def _background(cam: dict, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(cam["texture_seed"])
    img = Image.new("RGB", (w, h), cam["wall"])
    d = ImageDraw.Draw(img)
    hy = int(cam["horizon"] * h)
    d.rectangle([0, hy, w, h], fill=cam["floor"])
    shade = lambda c, f: tuple(int(min(255, v * f)) for v in c)
    if cam["texture"] == 0:  # panels
        for x in range(0, w, max(4, w // 5)):
            d.rectangle([x, 0, x + w // 12, hy], fill=shade(cam["wall"], 0.85))
    elif cam["texture"] == 1:  # windows
        for _ in range(4):
            x, y = rng.integers(0, w), rng.integers(0, max(1, hy - h // 6))
            d.rectangle([x, y, x + w // 4, y + h // 8], fill=shade(cam["wall"], rng.uniform(0.75, 1.2)))
    elif cam["texture"] == 2:  # floor tiles
        for y in range(hy, h, max(3, h // 16)):
            d.line([0, y, w, y], fill=shade(cam["floor"], 0.85), width=max(1, h // 100))
    else:  # bushes
        for _ in range(6):
            x, y, r = rng.integers(0, w), rng.integers(0, hy), rng.integers(w // 10, w // 4)
            d.ellipse([x - r, y - r, x + r, y + r], fill=_colour(rng, sat=(0.1, 0.3), val=(0.35, 0.55)))
    return np.asarray(img)


def _fill(canvas: Image.Image, mask: Image.Image, kind: str, c1, c2, period: float, u: np.ndarray, v: np.ndarray) -> None:
    """Paint a garment: colour c1 under `mask`, pattern `kind` in colour c2 on top.

    u (columns) and v (rows) are person units, so stripes scale with the person; the pattern is
    separable, which keeps it cheap.
    """
    box = mask.getbbox()  # work on the garment's bounding box only: pasting is the hot spot
    if box is None:
        return
    x0, y0, x1, y1 = box
    crop = mask.crop(box)
    canvas.paste(c1, box, crop)
    if kind == "solid":
        return
    su, sv = (u[x0:x1] / period) % 1, (v[y0:y1] / period) % 1
    if kind == "hstripes":
        m = np.broadcast_to(sv[:, None] < 0.5, (len(sv), len(su)))
    elif kind == "vstripes":
        m = np.broadcast_to(su[None, :] < 0.5, (len(sv), len(su)))
    elif kind == "checks":
        m = (sv[:, None] < 0.5) ^ (su[None, :] < 0.5)
    else:  # dots
        m = ((su[None, :] - 0.5) ** 2 + (sv[:, None] - 0.5) ** 2) < 0.06
    canvas.paste(c2, box, Image.fromarray(np.asarray(crop) & np.where(m, np.uint8(255), np.uint8(0))))


# Part labels: the label map of an image holds the index of the part that is visible at each pixel.
PARTS = ("background", "skin", "hair", "glasses", "bag", "shoes", "top", "bottom")
IDENTITY_PARTS = ("skin", "hair", "glasses", "bag", "shoes")  # what a person keeps across outfits
CLOTHES_PARTS = ("top", "bottom")
_PART = {p: i for i, p in enumerate(PARTS)}


def _label_garment(labels: Image.Image, mask: Image.Image, part: str) -> None:
    """The whole garment, pattern included, gets the garment's label."""
    box = mask.getbbox()
    if box is not None:
        labels.paste(_PART[part], box, mask.crop(box))


# Ties in a 2x2 block go to the thinner part: glasses and straps are about one output pixel wide
# and would vanish otherwise; background last, so outlines belong to the person.
_TIE_RANK = np.array([("background", "top", "bottom", "skin", "hair", "shoes", "bag", "glasses").index(p) for p in PARTS],
                     np.uint8)


def _downsample_labels(labels: Image.Image, H: int, W: int) -> np.ndarray:
    """Each output pixel takes the most frequent label of its 2x2 block (ties: _TIE_RANK), so a
    pixel carries a part's label only where the part covers at least half of it and its colour
    (the block's mean) is mostly that part's."""
    a = np.asarray(labels).reshape(H, 2, W, 2)
    corners = [a[:, i, :, j] for i in (0, 1) for j in (0, 1)]
    out = corners[0].copy()
    mixed = np.nonzero((out != corners[1]) | (out != corners[2]) | (out != corners[3]))  # edges only: cheap
    corners = [c[mixed] for c in corners]
    best, best_n = corners[0], sum(c == corners[0] for c in corners)
    for x in corners[1:]:
        n = sum(c == x for c in corners)
        better = (n > best_n) | ((n == best_n) & (_TIE_RANK[x] > _TIE_RANK[best]))
        best, best_n = np.where(better, x, best), np.where(better, n, best_n)
    out[mixed] = best
    return out


def _render(person: dict, outfit: dict, cam: dict, bg: np.ndarray, size: tuple[int, int],
            rng: np.random.Generator, parts: bool = True) -> tuple[Image.Image, np.ndarray | None, list[float]]:
    """Draw one person in one outfit seen by one camera; returns the image, its part label map
    (H x W uint8, indices into PARTS; None without `parts`) and the person box.

    Every shape is drawn twice, in colour on the image and with its part label on a label canvas:
    same geometry and order, so later shapes cover earlier ones on both. The labels take no
    random draws, and camera effects (blur, noise) do not touch them.
    """
    H, W = size
    S = 2  # draw at twice the size, then downsample: cheap anti-aliasing
    h, w = H * S, W * S
    canvas = Image.fromarray(np.roll(bg, int(rng.integers(-w // 8, w // 8 + 1)), axis=1))
    d = ImageDraw.Draw(canvas)
    labels = Image.new("L", (w, h), _PART["background"]) if parts else None
    ld = ImageDraw.Draw(labels) if parts else None

    def draw(op: str, part: str, xy, *args, fill, **kw) -> None:
        getattr(d, op)(xy, *args, fill=fill, **kw)
        if ld is not None:
            getattr(ld, op)(xy, *args, fill=_PART[part], **kw)

    hp = cam["scale"] * person["height"] * rng.uniform(0.96, 1.04) * h  # person height in pixels
    feet = (cam["feet"] + rng.uniform(-0.01, 0.01)) * h
    top, cx = feet - hp, (cam["x"] + rng.uniform(-0.03, 0.03)) * w
    face = 1 if rng.random() < 0.5 else -1  # facing direction mirrors bag and ponytail sides
    P = lambda u, v: (cx + face * u * hp, top + v * hp)
    box = lambda u0, v0, u1, v1: [min(P(u0, v0)[0], P(u1, v1)[0]), P(u0, v0)[1], max(P(u0, v0)[0], P(u1, v1)[0]), P(u1, v1)[1]]
    ln = lambda part, pts, fill, width: draw("line", part, [P(*p) for p in pts], fill=fill, width=max(1, int(width * hp)))
    ww, hs, skin, hair = person["width"], person["head"], person["skin"], person["hair"]
    sw, hw = 0.165 * ww, 0.135 * ww  # half widths of shoulders and hips: clothes fill most of the image
    rx, ry = 0.058 * hs, 0.072 * hs  # head radii
    stride, swing = rng.uniform(0.0, 0.06), rng.uniform(-0.03, 0.03)

    # Shadow (background in the labels), backpack and hair behind the body.
    d.ellipse(box(-0.2 * ww, 0.97, 0.2 * ww, 1.02), fill=tuple(int(c * 0.7) for c in cam["floor"]))
    if person["bag"] == "backpack":
        draw("rectangle", "bag", box(-sw - 0.06, 0.2, sw * 0.5, 0.47), fill=person["bag_colour"])
    if person["style"] == "long":
        draw("rounded_rectangle", "hair", box(-rx - 0.016, 0.03, rx + 0.016, 0.27), radius=int(0.02 * hp), fill=hair)
    elif person["style"] == "ponytail":
        draw("ellipse", "hair", box(-rx - 0.035, 0.05, -rx + 0.02, 0.22), fill=hair)
    elif person["style"] == "afro":
        draw("ellipse", "hair", box(-rx * 1.55, 0.085 - ry * 1.45, rx * 1.55, 0.085 + ry * 1.15), fill=hair)

    # Legs, then bottom garment (skin legs under shorts and skirts).
    legs = [((-hw * 0.5, 0.5), (-hw * 0.5 - stride, 0.93)), ((hw * 0.5, 0.5), (hw * 0.5 + stride, 0.93))]
    for a, b in legs:
        ln("skin", [a, b], skin, 0.12 * ww)
    v, u = (np.arange(h) - top) / hp, face * (np.arange(w) - cx) / hp
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    mline = lambda pts, width: md.line([P(*p) for p in pts], fill=255, width=max(1, int(width * hp)))
    if outfit["bottom_type"] == "skirt":
        md.polygon([P(-hw, 0.49), P(hw, 0.49), P(hw * 1.5, 0.74), P(-hw * 1.5, 0.74)], fill=255)
    else:
        end = 0.93 if outfit["bottom_type"] == "trousers" else 0.68
        md.rectangle(box(-hw, 0.49, hw, 0.6), fill=255)
        for a, b in legs:
            f = (end - 0.5) / 0.43
            mline([a, (a[0] + (b[0] - a[0]) * f, end)], 0.125 * ww)
    _fill(canvas, mask, outfit["bottom_pattern"], outfit["bottom"], outfit["bottom2"], outfit["bottom_period"], u, v)
    if parts:
        _label_garment(labels, mask, "bottom")
    for a, b in legs:  # shoes: a persistent colour at the feet
        x, y = b[0] + 0.015, 0.955
        draw("ellipse", "shoes", box(x - 0.07, y - 0.035, x + 0.07, y + 0.035), fill=person["shoes"])

    # Arms (skin), then the top garment: torso and sleeves.
    arms = [((-sw - 0.025, 0.21), (-sw - 0.04 - swing, 0.5)), ((sw + 0.025, 0.21), (sw + 0.04 + swing, 0.5))]
    for a, b in arms:
        ln("skin", [a, b], skin, 0.06 * ww)
        draw("ellipse", "skin", box(b[0] - 0.025, b[1] - 0.02, b[0] + 0.025, b[1] + 0.03), fill=skin)
    draw("rectangle", "skin", box(-0.022, 0.13, 0.022, 0.2), fill=skin)  # neck
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    md.polygon([P(-sw, 0.19), P(sw, 0.19), P(hw, 0.52), P(-hw, 0.52)], fill=255)
    for a, b in arms:
        f = 1.0 if outfit["sleeves"] == "long" else 0.4
        md.ellipse(box(a[0] - 0.03, 0.185, a[0] + 0.03, 0.24), fill=255)
        mline([a, (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f)], 0.065 * ww)
    _fill(canvas, mask, outfit["top_pattern"], outfit["top"], outfit["top2"], outfit["top_period"], u, v)
    if parts:
        _label_garment(labels, mask, "top")
    if person["bag"] == "shoulder":
        ln("bag", [(sw * 0.6, 0.19), (-hw - 0.03, 0.48)], person["bag_colour"], 0.02)
        draw("rectangle", "bag", box(-hw - 0.1, 0.45, -hw + 0.02, 0.6), fill=person["bag_colour"])
    elif person["bag"] == "backpack":
        ln("bag", [(sw * 0.55, 0.19), (sw * 0.55, 0.4)], person["bag_colour"], 0.025)

    # Head: face, hair cap, glasses.
    draw("ellipse", "skin", box(-rx, 0.085 - ry, rx, 0.085 + ry), fill=skin)
    if person["style"] not in ("bald", "afro"):
        draw("chord", "hair", box(-rx * 1.1, 0.085 - ry * 1.15, rx * 1.1, 0.085 + ry * 0.55), 180, 360, fill=hair)
    if person["style"] == "bun":
        draw("ellipse", "hair", box(-0.03, -0.035, 0.03, 0.025), fill=hair)
    elif person["style"] == "spiky":
        for k in range(4):
            x = -rx + (k + 0.5) * rx / 2
            draw("polygon", "hair", [P(x - 0.02, 0.03), P(x + 0.02, 0.03), P(x, -0.02)], fill=hair)
    if person["glasses"]:
        draw("rectangle", "glasses", box(-rx * 0.85, 0.088, rx * 0.85, 0.108), fill=(15, 15, 15))

    # Camera: downsample, blur, gain and colour cast, sensor noise (the image only).
    img = canvas.resize((W, H), Image.Resampling.BOX)
    blur = cam["blur"] * rng.uniform(0.8, 1.2)
    if blur > 0.25:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    gain = cam["gain"] * rng.uniform(0.95, 1.05) * np.array(cam["cast"], np.float32)
    arr = np.asarray(img, np.float32) * gain + cam["noise"] * rng.standard_normal((H, W, 3), dtype=np.float32)
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    x0, y0 = P(-sw - 0.07, 0.085 - ry)
    x1, y1 = P(sw + 0.07, 1.0)
    pbox = [min(x0, x1) / S, y0 / S, max(x0, x1) / S, y1 / S]
    return img, _downsample_labels(labels, H, W) if parts else None, [round(float(c), 1) for c in pbox]


def _plan(cfg: SyntheticConfig) -> tuple[dict, dict, dict, list[tuple]]:
    """Who wears what where: identities, outfits, cameras and the list of images to draw.

    Train: each outfit is seen by 2-3 cameras, 3-4 frames each. Test: each outfit is seen by
    every camera (2-3 gallery frames each) plus one query frame in each of 2 cameras, so every
    query has a same-clothes and a different-clothes match in other cameras.
    """
    rng = np.random.default_rng([cfg.seed, 0])
    n_ids = cfg.num_train_ids + cfg.num_test_ids
    people = {pid: _person(np.random.default_rng([cfg.seed, 1, pid])) for pid in range(1, n_ids + 1)}
    cams = {c: _camera(np.random.default_rng([cfg.seed, 2, c])) for c in range(1, cfg.cameras + 1)}
    outfits, pool = {}, []  # pool: outfits of the people drawn so far
    for pid in people:
        outfits[pid] = []
        for k in range(int(rng.integers(max(2, cfg.outfits - 1), cfg.outfits + 2))):
            # Some outfits are worn by several people: clothes alone cannot tell them apart.
            shared = pool and rng.random() < cfg.shared_outfits
            outfits[pid].append(pool[rng.integers(len(pool))] if shared else _outfit(np.random.default_rng([cfg.seed, 3, pid, k])))
        pool += outfits[pid]
    images = []  # (split, pid, outfit 1-based, camera, frame)
    for pid in people:
        frame = 0
        test = pid > cfg.num_train_ids
        for o in range(1, len(outfits[pid]) + 1):
            if not test:
                seen = rng.choice(np.arange(1, cfg.cameras + 1), min(cfg.cameras, int(rng.integers(2, 4))), replace=False)
                shots = [("train", int(c)) for c in sorted(seen) for _ in range(int(rng.integers(3, 5)))]
            else:
                qcams = rng.choice(np.arange(1, cfg.cameras + 1), 2, replace=False)
                shots = [("query", int(c)) for c in sorted(qcams)]
                shots += [("test", c) for c in range(1, cfg.cameras + 1) for _ in range(int(rng.integers(2, 4)))]
            for split, c in shots:
                images.append((split, pid, o, c, frame))
                frame += 1
    return people, outfits, cams, images


def _render_shots(args) -> dict[str, tuple[list, dict]]:
    """Draw and save a list of images with their part masks and captions; every image has its own
    seeds, so any split of the work between processes gives the same bytes. Returns, per image,
    the person box and the annotation (caption and attributes)."""
    cfg, people, outfits, cams, bgs, shots, out_dir = args
    out, words = {}, {}  # words: (pid, outfit) -> attributes
    for split, pid, o, c, frame in shots:
        rng = np.random.default_rng([cfg.seed, 4, pid, frame])
        img, labels, pbox = _render(people[pid], outfits[pid][o - 1], cams[c], bgs[c], cfg.img_size, rng)
        name = f"{split}/{pid:03d}_{o}_c{c}_{frame:06d}.png"
        img.save(os.path.join(out_dir, name), compress_level=1)
        Image.fromarray(labels, "L").save(os.path.join(out_dir, MASK_FOLDER, name), compress_level=1)
        if (pid, o) not in words:
            words[pid, o] = attributes(people[pid], outfits[pid][o - 1])
        attrs = words[pid, o]
        text = caption(attrs, np.random.default_rng([cfg.seed, 5, pid, frame]))  # its own stream: images unchanged
        out[name] = (pbox, {"caption": text, "attributes": attrs})
    return out


def _parent(root: str, folder: str = SYNTH_FOLDER) -> str:
    """The folder that holds `folder` (SYNTH_CC): `root` may name it itself."""
    if os.path.basename(os.path.normpath(root)) == folder:
        return os.path.dirname(os.path.normpath(root)) or "."
    return root


def _manifest_params(cfg) -> dict:
    return {**asdict(cfg), "img_size": list(cfg.img_size)}  # as JSON reads it back


def _changes(old: dict, new: dict) -> str:
    """What differs between an old manifest and a new one, e.g. 'num_train_ids 6 -> 60'."""
    diff = [f"generator version {old.get('version')} -> {new['version']}"] if old.get("version") != new["version"] else []
    old_params = old.get("params") if isinstance(old.get("params"), dict) else {}
    diff += [f"{k} {old_params.get(k, 'unset')} -> {v}" for k, v in new["params"].items() if old_params.get(k) != v]
    return ", ".join(diff)


def _default_signals() -> None:
    """Pool workers end on the pool's SIGTERM as usual, whatever handler the parent installed."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held while the pool started (_parallel)


def _parallel(fn, jobs: list) -> list:
    """fn over jobs, in forked processes when there are several (fork: no re-import)."""
    if len(jobs) == 1:
        return [fn(jobs[0])]
    # held: a signal while the pool forks must not run the parent's raising handler in a worker (a traceback)
    pool = None
    try:
        with stop_signals_held():
            pool = mp.get_context("fork").Pool(len(jobs), initializer=_default_signals)
        return pool.map(fn, jobs)
    finally:
        if pool is not None:
            pool.terminate()  # as `with Pool` does, also when the held signal stops us at the line above


def _workers(workers: int | None, n_images: int) -> int:
    """PNG encoding and drawing dominate: split the work over processes when it pays."""
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") and n_images >= 500 else 1
    return workers if "fork" in mp.get_all_start_methods() else 1


def _write_folder(root: str, folder: str, manifest: dict, fill, what: str, flag: str) -> str:
    """Write root/folder atomically unless one with the same version and parameters is there.

    fill(tmp, manifest) writes the contents into a temporary folder, adds its entries to the
    manifest and returns the number of images; manifest.json is written last (it marks a
    complete folder), then the folder is renamed into place. A folder of other parameters or
    another version is replaced, with a log line naming the changes; one without a manifest is
    refused (it was not made here).
    """
    target = os.path.join(root, folder)
    same = lambda m: m is not None and m.get("version") == manifest["version"] and m.get("params") == manifest["params"]
    old = _read_manifest(target)
    if same(old):
        return target
    if os.path.exists(target) and old is None:
        raise UserError(f"synthetic: {target} exists but has no readable manifest.json, so it was not made by this "
                        f"generator; remove it or choose another {flag}.")
    if old is not None:  # never replaced silently
        log.warning("regenerating %s: %s", target, _changes(old, manifest))
    t0 = time.time()
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{folder}.tmp-", dir=root)
    except OSError as e:
        raise UserError(f"synthetic: cannot write the {what} under {root} ({e}); choose a writable {flag}") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the renamed folder should not be
    try:
        n_images = fill(tmp, manifest)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:  # written last: marks a complete folder
            json.dump(manifest, f, indent=1, sort_keys=True)
        if same(_read_manifest(target)):  # another process (e.g. another rank) finished first
            return target
        if os.path.exists(target):  # parameters changed: swap the old one out, then delete it
            trash = tempfile.mkdtemp(prefix=f".{folder}.old-", dir=root)
            os.rename(target, os.path.join(trash, folder))
            shutil.rmtree(trash)
        try:
            os.rename(tmp, target)
        except OSError:  # lost a race with another process writing the same parameters
            if not same(_read_manifest(target)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic: generated %d images in %s in %.1f s", n_images, target, time.time() - t0)
    return target


def generate_synthetic(root: str, cfg: SyntheticConfig, workers: int | None = None) -> str:
    """Write the benchmark to `root/SYNTH_CC` (LTCC layout) unless an identical one is there.

    Besides the images: part masks in masks/{split}/ (same file names), captions and attributes
    in annotations.json, person boxes in boxes.json. Same parameters give byte-identical files.
    Generated into a temporary folder and renamed, so a crash never leaves a half-written
    benchmark; `manifest.json` records the parameters and the generator version. Calling this
    with parameters that differ from the manifest's is the request to regenerate: it does, and
    logs what changed. Callers that only want to read a benchmark take their config from
    `config_for`. workers: processes (default: the CPUs).
    """
    manifest = {"generator": "synthetic.py", "version": SYNTH_VERSION, "params": _manifest_params(cfg)}

    def fill(tmp: str, manifest: dict) -> int:
        people, outfits, cams, shots = _plan(cfg)
        h, w = cfg.img_size
        bgs = {c: _background(cam, 2 * h, 2 * w) for c, cam in cams.items()}
        for split in ("train", "query", "test"):
            os.makedirs(os.path.join(tmp, split))
            os.makedirs(os.path.join(tmp, MASK_FOLDER, split))  # a parallel tree: the LTCC parser reads all of train/
        n = _workers(workers, len(shots))
        parts = _parallel(_render_shots, [(cfg, people, outfits, cams, bgs, shots[i::n], tmp) for i in range(n)])
        done = {k: v for part in parts for k, v in part.items()}
        with open(os.path.join(tmp, "boxes.json"), "w") as f:  # person boxes (x0, y0, x1, y1), for analysis
            json.dump({k: box for k, (box, _) in done.items()}, f, sort_keys=True)
        with open(os.path.join(tmp, ANNOTATIONS), "w") as f:
            f.write(json.dumps({k: note for k, (_, note) in done.items()}, sort_keys=True))  # dumps: the C encoder
        manifest["counts"] = {s: sum(1 for sh in shots if sh[0] == s) for s in ("train", "query", "test")}
        manifest.update(parts=list(PARTS), annotations=ANNOTATIONS, masks=MASK_FOLDER)
        return len(shots)

    return _write_folder(_parent(root), SYNTH_FOLDER, manifest, fill, "benchmark", "--root")


def _read_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def existing_params(root: str) -> dict:
    """Parameters of a benchmark of this generator version already under root ({} when there is none)."""
    manifest = _read_manifest(os.path.join(_parent(root), SYNTH_FOLDER))
    if manifest is None or manifest.get("version") != SYNTH_VERSION:
        return {}
    return {k: tuple(v) if k == "img_size" else v for k, v in manifest["params"].items()}


def config_for(root: str, params: dict) -> SyntheticConfig:
    """The benchmark a reader of `root` means.

    Explicit parameters mean that benchmark (generate_synthetic regenerates a different one and
    says so). Without them: the benchmark already under root, with its own parameters even when an
    older generator made it (it is then remade as it was meant); the default one only when there is
    none, which is said, since a mistyped root also lands here.
    """
    if params:
        return SyntheticConfig(**params)
    folder = os.path.join(_parent(root), SYNTH_FOLDER)
    manifest = _read_manifest(folder)
    if manifest is None:
        cfg = SyntheticConfig()
        if not os.path.exists(folder):  # a folder without a manifest: generate_synthetic refuses it
            log.warning("no synthetic benchmark under %s: generating the default one (%s)", root,
                        ", ".join(f"{k} {v}" for k, v in _manifest_params(cfg).items()))
        return cfg
    saved = manifest.get("params") if isinstance(manifest.get("params"), dict) else {}
    return SyntheticConfig(**{k: v for k, v in saved.items() if k in SyntheticConfig.__dataclass_fields__})


def mask_path(image_path: str) -> str:
    """The part mask of a benchmark image: SYNTH_CC/test/x.png -> SYNTH_CC/masks/test/x.png."""
    split_dir, name = os.path.split(image_path)
    folder, split = os.path.split(split_dir)
    if split not in ("train", "query", "test"):
        raise UserError(f"synthetic: {image_path} is not a benchmark image (expected SYNTH_CC/{{train,query,test}}/NAME)")
    return os.path.join(folder, MASK_FOLDER, split, name)


def load_mask(image_path: str) -> np.ndarray:
    """The part label map (H x W uint8, indices into PARTS) of a benchmark image."""
    path = mask_path(image_path)
    try:
        with Image.open(path) as m:
            return np.asarray(m.convert("L"))
    except (OSError, ValueError) as e:
        raise UserError(f"synthetic: cannot read the part mask {path} ({e}); benchmarks of generator version < 2 "
                        f"have none: regenerate with synthetic.py --make") from None


def load_annotations(target: str) -> dict:
    """Captions and attributes of a benchmark: {"test/NAME.png": {"caption": str, "attributes": {...}}}.
    target: SYNTH_CC or the folder holding it."""
    path = os.path.join(_parent(target), SYNTH_FOLDER, ANNOTATIONS)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"synthetic: cannot read {path} ({e}); benchmarks of generator version < 2 have no "
                        f"captions: regenerate with synthetic.py --make") from None


# -----------------------------------------------------------------------------
# Words: what the generator drew, as attributes and captions (for text encoders and zero-shot probes)

# Basic colour terms, each with a few reference colours: one prototype per term leaves dark blues
# named purple and steel blues named grey (CIELAB is least uniform there), hence navy, steel and
# light blue prototypes. A colour is named by its nearest prototype in CIELAB.
COLOUR_PROTOTYPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "black": ((20, 20, 20),),
    "white": ((245, 245, 245),),
    "grey": ((128, 128, 128), (85, 85, 85), (180, 180, 180)),
    "red": ((210, 30, 30), (140, 20, 30)),
    "orange": ((240, 130, 30), (200, 100, 40)),
    "yellow": ((240, 220, 40), (210, 190, 90)),
    "green": ((40, 160, 60), (30, 90, 40), (130, 180, 80), (100, 120, 50)),
    "turquoise": ((40, 190, 190), (20, 110, 110)),
    "blue": ((40, 80, 210), (30, 40, 120), (20, 35, 80), (110, 160, 220), (70, 110, 160), (170, 215, 240)),
    "purple": ((130, 50, 180), (70, 30, 90), (170, 130, 210)),
    "pink": ((240, 130, 180), (220, 50, 150), (230, 180, 190)),
    "brown": ((120, 70, 30), (80, 50, 30), (160, 120, 80)),
    "beige": ((225, 200, 160),),
}
COLOUR_TERMS = tuple(COLOUR_PROTOTYPES)
SKIN_TONES = ("pale", "fair", "olive", "tan", "brown", "dark")  # one word per SKIN entry
PATTERN_WORDS = {"solid": "plain", "hstripes": "striped", "vstripes": "vertically striped", "checks": "checked",
                 "dots": "dotted"}
BAG_WORDS = {None: "no bag", "shoulder": "shoulder bag", "backpack": "backpack"}

_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb) -> np.ndarray:
    """CIELAB (D65) of 8-bit sRGB colours, shape (..., 3)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = (linear @ _SRGB_TO_XYZ.T) / _WHITE_D65
    d = 6 / 29
    f = np.where(t > d ** 3, np.cbrt(t), t / (3 * d * d) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_PROTOTYPE_TERMS = [term for term, refs in COLOUR_PROTOTYPES.items() for _ in refs]
_PROTOTYPE_LAB = srgb_to_lab([rgb for refs in COLOUR_PROTOTYPES.values() for rgb in refs])
_SKIN_LAB = srgb_to_lab(SKIN)


def colour_name(rgb) -> str:
    """The basic colour term nearest to an 8-bit RGB colour (CIELAB distance to the prototypes)."""
    return _PROTOTYPE_TERMS[int(np.argmin(((_PROTOTYPE_LAB - srgb_to_lab(rgb)) ** 2).sum(-1)))]


def _skin_tone(rgb) -> str:
    """The word of the SKIN entry the jittered colour came from (the entries are far apart)."""
    return SKIN_TONES[int(np.argmin(((_SKIN_LAB - srgb_to_lab(rgb)) ** 2).sum(-1)))]


ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "hair colour": COLOUR_TERMS,
    "hair style": tuple(dict.fromkeys(HAIR_STYLES)),
    "skin tone": SKIN_TONES,
    "glasses": ("glasses", "no glasses"),
    "bag": ("backpack", "shoulder bag", "no bag"),
    "bag colour": COLOUR_TERMS,
    "shoe colour": COLOUR_TERMS,
    "top colour": COLOUR_TERMS,
    "top pattern": tuple(dict.fromkeys(PATTERN_WORDS[p] for p in TOP_PATTERNS)),
    "sleeves": ("long", "short"),
    "bottom colour": COLOUR_TERMS,
    "bottom type": ("trousers", "shorts", "skirt"),
    "bottom pattern": tuple(dict.fromkeys(PATTERN_WORDS[p] for p in BOTTOM_PATTERNS)),
}


def attributes(person: dict, outfit: dict) -> dict[str, str]:
    """What the generator drew, in words, keys in ATTRIBUTE_VALUES order.

    Two keys can be absent, as their part is not drawn: "bag colour" without a bag and
    "hair colour" for bald people.
    """
    a = {"hair colour": colour_name(person["hair"]), "hair style": person["style"],
         "skin tone": _skin_tone(person["skin"]), "glasses": "glasses" if person["glasses"] else "no glasses",
         "bag": BAG_WORDS[person["bag"]], "bag colour": colour_name(person["bag_colour"]),
         "shoe colour": colour_name(person["shoes"]), "top colour": colour_name(outfit["top"]),
         "top pattern": PATTERN_WORDS[outfit["top_pattern"]], "sleeves": outfit["sleeves"],
         "bottom colour": colour_name(outfit["bottom"]), "bottom type": outfit["bottom_type"],
         "bottom pattern": PATTERN_WORDS[outfit["bottom_pattern"]]}
    if person["bag"] is None:
        del a["bag colour"]
    if person["style"] == "bald":
        del a["hair colour"]
    return a


# Phrases shared by captions and zero-shot prompts, so that both use the same words. Each takes
# the attributes and the set of keys to mention; None means there is nothing to say.
_HAIR = {"short": "short {c}hair", "long": "long {c}hair", "bun": "{c}hair in a bun", "spiky": "spiky {c}hair",
         "ponytail": "a {c}ponytail", "afro": "a {c}afro", "bald": "a bald head"}


def _a(phrase: str) -> str:
    """Fix the article in front of a vowel: 'a orange top' -> 'an orange top'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", phrase)


def _words(attrs: dict, keep: set, *keys: str) -> str:
    """The kept values of keys, each followed by a space ('' when none is kept)."""
    return "".join(f"{attrs[k]} " for k in keys if k in keep and k in attrs)


def _hair_phrase(attrs: dict, keep: set) -> str | None:
    colour = _words(attrs, keep, "hair colour")
    if "hair style" in keep:
        return _a(_HAIR[attrs["hair style"]].format(c=colour))
    return f"{colour}hair" if colour else None


def _bag_phrase(attrs: dict, keep: set) -> str | None:
    colour = _words(attrs, keep, "bag colour")
    if "bag" in keep:
        return "no bag" if attrs["bag"] == "no bag" else _a(f"a {colour}{attrs['bag']}")
    return _a(f"a {colour}bag") if colour else None  # a colour without the kind: a generic bag


def _top_phrase(attrs: dict, keep: set, noun: str, sleeves_after: bool) -> str | None:
    words = _words(attrs, keep, "top pattern", "top colour")
    if not (words or "sleeves" in keep):
        return None  # "a shirt" says nothing
    sleeves = attrs["sleeves"] if "sleeves" in keep else None
    if sleeves and sleeves_after:
        return _a(f"a {words}{noun} with {sleeves} sleeves")
    return _a(f"a {sleeves + '-sleeved ' if sleeves else ''}{words}{noun}")


def _bottom_phrase(attrs: dict, keep: set, trousers: str) -> str | None:
    """Trousers, shorts, a skirt; 'bottoms' (the shop word for all three) when the type is left out."""
    words = _words(attrs, keep, "bottom pattern", "bottom colour")
    if "bottom type" not in keep:
        return f"{words}bottoms" if words else None
    kind = attrs["bottom type"]
    return _a(f"a {words}skirt") if kind == "skirt" else f"{words}{trousers if kind == 'trousers' else kind}"


def _shoes_phrase(attrs: dict, keep: set) -> str | None:
    return f"{attrs['shoe colour']} shoes" if "shoe colour" in keep else None


def _skin_phrase(attrs: dict, keep: set) -> str | None:
    return f"{attrs['skin tone']} skin" if "skin tone" in keep else None


def _glasses_phrase(attrs: dict, keep: set) -> str | None:
    return attrs["glasses"] if "glasses" in keep else None


_PROMPT = {  # attribute -> (template, phrase of that attribute alone)
    "hair colour": ("with {}", _hair_phrase), "hair style": ("with {}", _hair_phrase),
    "skin tone": ("with {}", _skin_phrase), "glasses": ("with {}", _glasses_phrase),
    "bag": ("with {}", _bag_phrase), "bag colour": ("with {}", _bag_phrase),
    "shoe colour": ("wearing {}", _shoes_phrase),
    "top colour": ("wearing {}", lambda a, k: _top_phrase(a, k, "top", False)),
    "top pattern": ("wearing {}", lambda a, k: _top_phrase(a, k, "top", False)),
    "sleeves": ("wearing {}", lambda a, k: _top_phrase(a, k, "top", False)),
    "bottom colour": ("wearing {}", lambda a, k: _bottom_phrase(a, k, "trousers")),
    "bottom type": ("wearing {}", lambda a, k: _bottom_phrase(a, k, "trousers")),
    "bottom pattern": ("wearing {}", lambda a, k: _bottom_phrase(a, k, "trousers")),
}


def zero_shot_prompts(attribute: str) -> dict[str, str]:
    """One caption-like prompt per value of `attribute`, e.g. top colour red -> 'a photo of a person
    wearing a red top'; the prompts of one attribute differ only in the value's words."""
    if attribute not in ATTRIBUTE_VALUES:
        raise UserError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTE_VALUES)}")
    template, phrase = _PROMPT[attribute]
    return {v: "a photo of a person " + template.format(phrase({attribute: v}, {attribute}))
            for v in ATTRIBUTE_VALUES[attribute]}


_SUBJECTS = ("a person", "someone", "a pedestrian")
_WEAR = ("wearing", "in", "dressed in")
# {s} subject, {w} wear verb, {i} identity traits (with ...), {o} clothes and what else is worn
_TEMPLATES = ("{s} with {i}, {w} {o}.", "{s} {w} {o}, with {i}.", "{s} {w} {o}. this person has {i}.",
              "a photo of {s} with {i} {w} {o}.", "{o} on {s} with {i}.")


def _mention_chance(key: str, value: str) -> float:
    """Clothes colours nearly always, absences and plainness seldom (people rarely say them), the rest often."""
    if key in ("top colour", "bottom colour"):
        return 0.9
    return 0.35 if value in ("plain", "no bag", "no glasses") else 0.7


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A sentence describing `attrs`: template, subject, verb, synonyms, clause order and the
    attributes it leaves out all vary, so that a text encoder has to learn the words rather than
    their positions. Changing a colour leaves the random draws, so the sentence, as they were."""
    draws = rng.random(len(ATTRIBUTE_VALUES))  # one per attribute, present or not: the same draws for any values
    keep = {k for k, u in zip(ATTRIBUTE_VALUES, draws) if k in attrs and u < _mention_chance(k, attrs[k])}
    if not keep:  # never say nothing
        keep = {"top colour"}
    template, subject, wear = (_TEMPLATES[rng.integers(len(_TEMPLATES))], _SUBJECTS[rng.integers(len(_SUBJECTS))],
                               _WEAR[rng.integers(len(_WEAR))])
    noun = ("top", "shirt", "sweater" if attrs["sleeves"] == "long" else "t-shirt")[rng.integers(3)]  # only true ones
    sleeves_after, trousers = bool(rng.random() < 0.5), ("trousers", "pants")[rng.integers(2)]
    identity = [_hair_phrase(attrs, keep), _skin_phrase(attrs, keep), _bag_phrase(attrs, keep)]
    worn = [_top_phrase(attrs, keep, noun, sleeves_after), _bottom_phrase(attrs, keep, trousers),
            _shoes_phrase(attrs, keep)]
    glasses = _glasses_phrase(attrs, keep)  # "glasses" are worn, "no glasses" is a trait
    (worn if attrs["glasses"] == "glasses" else identity).append(glasses)
    identity, worn = [p for p in identity if p], [p for p in worn if p]
    identity = [identity[i] for i in rng.permutation(len(identity))]
    worn = [worn[i] for i in rng.permutation(len(worn))]
    if not identity:
        template = "{s} {w} {o}."
    elif not worn:
        template = "{s} with {i}."
    return template.format(s=subject, w=wear, i=_join(identity) if identity else "", o=_join(worn) if worn else "")


# -----------------------------------------------------------------------------
# A pretraining corpus of captioned people (for a small CLIP)

CORPUS_VERSION = 1  # bump whenever the corpus generator's output changes
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


def _corpus_plan(cfg: CorpusConfig) -> tuple[dict, dict, dict, list[tuple]]:
    """People, outfits, cameras and images (pid, outfit, camera, index within the person), all
    from streams [seed, 100..103, ...]: the benchmark uses [seed, 0..5], so corpus people are
    none of its people."""
    people = {pid: _person(np.random.default_rng([cfg.seed, 100, pid])) for pid in range(cfg.people)}
    outfits = {pid: [_outfit(np.random.default_rng([cfg.seed, 101, pid, k])) for k in range(cfg.outfits_per_person)]
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
                              "caption": caption(attrs, np.random.default_rng([cfg.seed, 105, pid, i])),
                              "attributes": attrs}))
    images.flush()
    return records


def generate_corpus(root: str, cfg: CorpusConfig, workers: int | None = None) -> str:
    """Write the captioned corpus to `root/SYNTH_CORPUS` unless an identical one is there: images.npy
    (uint8 N x H x W x 3), records.json (one record per image, same order: pid, outfit, camera,
    split, caption, attributes) and manifest.json. Written, reused and replaced like the
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
                        f"python synthetic.py --corpus {os.path.dirname(folder) or '.'}")
    if manifest.get("version") != CORPUS_VERSION:
        raise UserError(f"synthetic: the corpus in {folder} is of generator version {manifest.get('version')}, this "
                        f"code reads version {CORPUS_VERSION}: make it again with python synthetic.py --corpus")
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


# -----------------------------------------------------------------------------
# Preview and command line (no datasets.py: this module knows its own file names)

# test/{pid:03d}_{outfit}_c{cam}_{frame:06d}.png, as _render_shots writes them
NAME = re.compile(r"^(\d{3})_(\d+)_c(\d+)_(\d{6})\.png$")


def gallery_shots(target: str) -> dict[tuple[int, int, int], str]:
    """(pid, outfit, camera) -> the first gallery image of it (lowest frame) in target/test."""
    pick: dict[tuple[int, int, int], str] = {}
    for name in sorted(os.listdir(os.path.join(target, "test"))):
        m = NAME.match(name)
        if m:
            pick.setdefault((int(m[1]), int(m[2]), int(m[3])), os.path.join(target, "test", name))
    return pick


PART_COLOURS = ((0, 0, 0), (250, 200, 150), (130, 70, 20), (0, 230, 230), (230, 0, 230), (250, 250, 0),
                (230, 40, 40), (40, 90, 230))  # per PARTS entry, for looking at masks
_CAPTION_LINES, _LINE, _PAD = 10, 13, 6  # the caption panel: lines kept per caption, line height, margins


def coloured_mask(mask: np.ndarray) -> Image.Image:
    """A part label map in PART_COLOURS."""
    return Image.fromarray(np.array(PART_COLOURS, np.uint8)[mask])


def _font():
    try:
        return ImageFont.load_default(size=11)
    except (ImportError, OSError, ValueError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap to `width` pixels, at most _CAPTION_LINES lines."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > _CAPTION_LINES:
        lines = lines[:_CAPTION_LINES - 1] + [lines[_CAPTION_LINES - 1] + " ..."]
    return lines


def _panel_height(h: int, scale: int) -> int:
    """Height of the caption panel under the grid: title, images, caption lines, legend."""
    return _PAD + _LINE + _PAD + h * scale + _PAD + _CAPTION_LINES * _LINE + _PAD + _LINE + _PAD


def _caption_panel(target: str, images: list[str], width: int, scale: int) -> Image.Image:
    """Image | coloured part mask, with the caption under them, for each of `images`; a legend below."""
    notes, font = load_annotations(target), _font()
    w, h = Image.open(images[0]).size
    cell = 2 * w * scale + 2
    width = max(width, len(images) * (cell + 3 * _PAD) - 3 * _PAD + 2 * _PAD)
    panel = Image.new("RGB", (width, _panel_height(h, scale)), (255, 255, 255))
    d = ImageDraw.Draw(panel)
    d.text((_PAD, _PAD), "part masks and captions (annotations.json, masks/)", fill=(0, 0, 0), font=font)
    y = _PAD + _LINE + _PAD
    for k, path in enumerate(images):
        x = _PAD + k * (cell + 3 * _PAD)
        up = lambda im: im.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        panel.paste(up(Image.open(path).convert("RGB")), (x, y))
        panel.paste(up(coloured_mask(load_mask(path))), (x + w * scale + 2, y))
        text = notes.get(os.path.relpath(path, target), {}).get("caption", "(no caption)")
        for i, line in enumerate(_wrap(text, font, cell, d)):
            d.text((x, y + h * scale + _PAD + i * _LINE), line, fill=(0, 0, 0), font=font)
    x, y = _PAD, y + h * scale + _PAD + _CAPTION_LINES * _LINE + _PAD
    for part, colour in zip(PARTS, PART_COLOURS):  # legend
        d.rectangle([x, y + 1, x + 9, y + 10], fill=colour, outline=(128, 128, 128))
        d.text((x + 13, y), part, fill=(0, 0, 0), font=font)
        x += 13 + int(d.textlength(part, font=font)) + 2 * _PAD
    return panel


def save_preview(target: str, path: str, ids: int = 6, outfits: int = 3, cams: int = 3, scale: int = 2) -> None:
    """A grid of the benchmark in `target` (a SYNTH_CC folder): one row per test identity,
    columns = outfits x cameras (one gallery image each); below it, four of these people with
    their part masks and captions."""
    pick = gallery_shots(target)
    if not pick:
        raise UserError(f"synthetic: no gallery images in {os.path.join(target, 'test')}")
    pids = sorted({k[0] for k in pick})[:ids]
    cam_ids = sorted({k[2] for k in pick})[:cams]
    w, h = Image.open(next(iter(pick.values()))).size
    gap = 4
    grid = Image.new("RGB", ((w * cams + gap) * outfits, h * len(pids)), (255, 255, 255))
    for r, pid in enumerate(pids):
        for o in range(outfits):
            for c, cam in enumerate(cam_ids):
                if (pid, o + 1, cam) in pick:
                    grid.paste(Image.open(pick[pid, o + 1, cam]).convert("RGB"), (o * (w * cams + gap) + c * w, r * h))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    shown = [min((k for k in pick if k[0] == pid), key=lambda k: (k[1], k[2])) for pid in pids[:4]]
    panel = _caption_panel(target, [pick[k] for k in shown], grid.width, scale)
    out = Image.new("RGB", (max(grid.width, panel.width), grid.height + panel.height), (255, 255, 255))
    out.paste(grid, (0, 0))
    out.paste(panel, (0, grid.height))
    try:
        out.save(path)
    except (OSError, ValueError) as e:  # unwritable folder, unknown extension
        raise UserError(f"cannot save the preview to {path} ({e})") from None
    print(f"preview: {len(pids)} identities x {outfits} outfits x {cams} cameras, {len(shown)} with masks and "
          f"captions -> {path}")


# flag dest -> SyntheticConfig field
FLAGS = {"seed": "seed", "train_ids": "num_train_ids", "test_ids": "num_test_ids", "outfits": "outfits",
         "cameras": "cameras", "img_size": "img_size", "shared_outfits": "shared_outfits"}


def add_parameter_flags(ap: argparse.ArgumentParser) -> None:
    """The flags default to None, so that a flag the user did not give is not a request to regenerate."""
    g = ap.add_argument_group("benchmark parameters",
                              "--make OUT makes the benchmark with these (unset ones take the defaults). "
                              "--preview --root DIR without them shows the benchmark under DIR as it is (the "
                              "default one is generated when there is none); given ones that differ from it "
                              "regenerate it, with a line naming each changed parameter")
    d = SyntheticConfig()
    g.add_argument("--seed", type=int, help=f"seed of everything generated: same seed, same images (default {d.seed})")
    g.add_argument("--train-ids", type=int, help=f"training identities (default {d.num_train_ids})")
    g.add_argument("--test-ids", type=int, help=f"test identities (default {d.num_test_ids})")
    g.add_argument("--outfits", type=int, help=f"outfits per identity, +-1 (default {d.outfits})")
    g.add_argument("--cameras", type=int, help=f"cameras, each with its own background and lighting (default {d.cameras})")
    g.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help=f"height and width of every image (default {d.img_size[0]} {d.img_size[1]})")
    g.add_argument("--shared-outfits", type=float, help=f"chance an outfit is another person's (default {d.shared_outfits})")


def given_params(args: argparse.Namespace) -> dict:
    """SyntheticConfig fields of the parameter flags the user gave (and only those)."""
    given = {field: getattr(args, dest) for dest, field in FLAGS.items() if getattr(args, dest) is not None}
    if "img_size" in given:
        given["img_size"] = tuple(given["img_size"])
    return given


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description="Make the synthetic cloth-changing benchmark, or preview it; make the "
                                             "captioned pretraining corpus.")
    ap.add_argument("--make", metavar="OUT", help="write the benchmark to OUT/SYNTH_CC (kept if identical)")
    ap.add_argument("--root", help="with --preview alone: the folder holding SYNTH_CC (or SYNTH_CC itself)")
    ap.add_argument("--preview", metavar="FILE.png", help="save a grid of test identities x outfits x cameras, "
                                                         "and a few images with their part masks and captions")
    ap.add_argument("--corpus", metavar="OUT", help="write the captioned pretraining corpus to OUT/SYNTH_CORPUS "
                                                    "(kept if identical; the benchmark flags do not apply to it)")
    ap.add_argument("--corpus-people", type=int, metavar="N", help=f"people in the corpus (default {CorpusConfig.people})")
    add_parameter_flags(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = given_params(args)
    if args.corpus_people is not None and not args.corpus:
        raise UserError("--corpus-people is given but no --corpus OUT")
    if not (args.make or args.preview):
        if params:  # parameters alone would be silently ignored
            raise UserError(f"parameters ({', '.join(sorted(params))}) are given but nothing uses them: "
                            f"add --make OUT or --preview FILE.png --root DIR")
        if not args.corpus:
            raise UserError("nothing to do: give --make OUT and/or --preview FILE.png (with --root DIR when alone), "
                            "or --corpus OUT")
    elif args.make and args.root:
        raise UserError("--make OUT is the root: drop --root")
    elif args.make:
        t0 = time.time()
        target = generate_synthetic(args.make, SyntheticConfig(**params))  # unset flags: the defaults
        print(f"synthetic benchmark at {target} ({time.time() - t0:.1f} s)")
    elif not args.root:
        raise UserError("--preview needs --root DIR (the folder that holds SYNTH_CC) or --make OUT")
    else:  # a reader: the benchmark that is there, unless explicit flags ask for another one
        target = generate_synthetic(args.root, config_for(args.root, params))
    if args.preview:
        save_preview(target, args.preview)
    if args.corpus:
        t0 = time.time()
        people = {} if args.corpus_people is None else {"people": args.corpus_people}
        folder = generate_corpus(args.corpus, CorpusConfig(**people))
        print(f"pretraining corpus at {folder} ({time.time() - t0:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
