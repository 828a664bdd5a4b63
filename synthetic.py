"""The synthetic cloth-changing benchmark: people with persistent identity traits wearing
several outfits, seen by cameras that differ in background, light, colour cast, scale, blur and
noise, drawn procedurally and deterministically from a seed and written in the LTCC layout
(`datasets.py` reads it with the LTCC parser: `build_dataset("synthetic", root)`).

This module does not import datasets.py (which imports it); the colour-histogram check of the
clothes shortcut lives in benchmarks/colour_histogram.py.

    python synthetic.py --make data --preview preview.png          # make the benchmark under data/
    python synthetic.py --preview preview.png --root data          # preview of the benchmark there
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
from PIL import Image, ImageDraw, ImageFilter

from utils import UserError, run_cli

log = logging.getLogger("datasets")  # one logger with datasets.py: its users see the regeneration lines

# -----------------------------------------------------------------------------
# The synthetic cloth-changing benchmark

SYNTH_VERSION = 1  # bump whenever the generator's output changes: cached copies regenerate
SYNTH_FOLDER = "SYNTH_CC"


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


def _render(person: dict, outfit: dict, cam: dict, bg: np.ndarray, size: tuple[int, int],
            rng: np.random.Generator) -> tuple[Image.Image, list[float]]:
    """Draw one person in one outfit seen by one camera; returns the image and the person box."""
    H, W = size
    S = 2  # draw at twice the size, then downsample: cheap anti-aliasing
    h, w = H * S, W * S
    canvas = Image.fromarray(np.roll(bg, int(rng.integers(-w // 8, w // 8 + 1)), axis=1))
    d = ImageDraw.Draw(canvas)
    hp = cam["scale"] * person["height"] * rng.uniform(0.96, 1.04) * h  # person height in pixels
    feet = (cam["feet"] + rng.uniform(-0.01, 0.01)) * h
    top, cx = feet - hp, (cam["x"] + rng.uniform(-0.03, 0.03)) * w
    face = 1 if rng.random() < 0.5 else -1  # facing direction mirrors bag and ponytail sides
    P = lambda u, v: (cx + face * u * hp, top + v * hp)
    box = lambda u0, v0, u1, v1: [min(P(u0, v0)[0], P(u1, v1)[0]), P(u0, v0)[1], max(P(u0, v0)[0], P(u1, v1)[0]), P(u1, v1)[1]]
    ln = lambda pts, fill, width: d.line([P(*p) for p in pts], fill=fill, width=max(1, int(width * hp)))
    ww, hs, skin, hair = person["width"], person["head"], person["skin"], person["hair"]
    sw, hw = 0.165 * ww, 0.135 * ww  # half widths of shoulders and hips: clothes fill most of the image
    rx, ry = 0.058 * hs, 0.072 * hs  # head radii
    stride, swing = rng.uniform(0.0, 0.06), rng.uniform(-0.03, 0.03)

    # Shadow, backpack and hair behind the body.
    d.ellipse(box(-0.2 * ww, 0.97, 0.2 * ww, 1.02), fill=tuple(int(c * 0.7) for c in cam["floor"]))
    if person["bag"] == "backpack":
        d.rectangle(box(-sw - 0.06, 0.2, sw * 0.5, 0.47), fill=person["bag_colour"])
    if person["style"] == "long":
        d.rounded_rectangle(box(-rx - 0.016, 0.03, rx + 0.016, 0.27), radius=int(0.02 * hp), fill=hair)
    elif person["style"] == "ponytail":
        d.ellipse(box(-rx - 0.035, 0.05, -rx + 0.02, 0.22), fill=hair)
    elif person["style"] == "afro":
        d.ellipse(box(-rx * 1.55, 0.085 - ry * 1.45, rx * 1.55, 0.085 + ry * 1.15), fill=hair)

    # Legs, then bottom garment (skin legs under shorts and skirts).
    legs = [((-hw * 0.5, 0.5), (-hw * 0.5 - stride, 0.93)), ((hw * 0.5, 0.5), (hw * 0.5 + stride, 0.93))]
    for a, b in legs:
        ln([a, b], skin, 0.12 * ww)
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
    for a, b in legs:  # shoes: a persistent colour at the feet
        x, y = b[0] + 0.015, 0.955
        d.ellipse(box(x - 0.07, y - 0.035, x + 0.07, y + 0.035), fill=person["shoes"])

    # Arms (skin), then the top garment: torso and sleeves.
    arms = [((-sw - 0.025, 0.21), (-sw - 0.04 - swing, 0.5)), ((sw + 0.025, 0.21), (sw + 0.04 + swing, 0.5))]
    for a, b in arms:
        ln([a, b], skin, 0.06 * ww)
        d.ellipse(box(b[0] - 0.025, b[1] - 0.02, b[0] + 0.025, b[1] + 0.03), fill=skin)
    d.rectangle(box(-0.022, 0.13, 0.022, 0.2), fill=skin)  # neck
    mask = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask)
    md.polygon([P(-sw, 0.19), P(sw, 0.19), P(hw, 0.52), P(-hw, 0.52)], fill=255)
    for a, b in arms:
        f = 1.0 if outfit["sleeves"] == "long" else 0.4
        md.ellipse(box(a[0] - 0.03, 0.185, a[0] + 0.03, 0.24), fill=255)
        mline([a, (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f)], 0.065 * ww)
    _fill(canvas, mask, outfit["top_pattern"], outfit["top"], outfit["top2"], outfit["top_period"], u, v)
    if person["bag"] == "shoulder":
        ln([(sw * 0.6, 0.19), (-hw - 0.03, 0.48)], person["bag_colour"], 0.02)
        d.rectangle(box(-hw - 0.1, 0.45, -hw + 0.02, 0.6), fill=person["bag_colour"])
    elif person["bag"] == "backpack":
        ln([(sw * 0.55, 0.19), (sw * 0.55, 0.4)], person["bag_colour"], 0.025)

    # Head: face, hair cap, glasses.
    d.ellipse(box(-rx, 0.085 - ry, rx, 0.085 + ry), fill=skin)
    if person["style"] not in ("bald", "afro"):
        d.chord(box(-rx * 1.1, 0.085 - ry * 1.15, rx * 1.1, 0.085 + ry * 0.55), 180, 360, fill=hair)
    if person["style"] == "bun":
        d.ellipse(box(-0.03, -0.035, 0.03, 0.025), fill=hair)
    elif person["style"] == "spiky":
        for k in range(4):
            x = -rx + (k + 0.5) * rx / 2
            d.polygon([P(x - 0.02, 0.03), P(x + 0.02, 0.03), P(x, -0.02)], fill=hair)
    if person["glasses"]:
        d.rectangle(box(-rx * 0.85, 0.088, rx * 0.85, 0.108), fill=(15, 15, 15))

    # Camera: downsample, blur, gain and colour cast, sensor noise.
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
    return img, [round(float(c), 1) for c in pbox]


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


def _render_shots(args) -> dict[str, list]:
    """Draw and save a list of images; every image has its own seed, so any split of the work
    between processes gives the same bytes. Returns the person boxes."""
    cfg, people, outfits, cams, bgs, shots, out_dir = args
    boxes = {}
    for split, pid, o, c, frame in shots:
        rng = np.random.default_rng([cfg.seed, 4, pid, frame])
        img, pbox = _render(people[pid], outfits[pid][o - 1], cams[c], bgs[c], cfg.img_size, rng)
        name = f"{split}/{pid:03d}_{o}_c{c}_{frame:06d}.png"
        img.save(os.path.join(out_dir, name), compress_level=1)
        boxes[name] = pbox
    return boxes


def _parent(root: str) -> str:
    """The folder that holds SYNTH_CC: `root` may name SYNTH_CC itself."""
    if os.path.basename(os.path.normpath(root)) == SYNTH_FOLDER:
        return os.path.dirname(os.path.normpath(root)) or "."
    return root


def _manifest_params(cfg: SyntheticConfig) -> dict:
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


def generate_synthetic(root: str, cfg: SyntheticConfig, workers: int | None = None) -> str:
    """Write the benchmark to `root/SYNTH_CC` (LTCC layout) unless an identical one is there.

    Same parameters give byte-identical files. Generated into a temporary folder and renamed, so
    a crash never leaves a half-written benchmark; `manifest.json` records the parameters and the
    generator version. Calling this with parameters that differ from the manifest's is the
    request to regenerate: it does, and logs what changed. Callers that only want to read a
    benchmark take their config from `config_for`. workers: processes (default: the CPUs).
    """
    root = _parent(root)
    target = os.path.join(root, SYNTH_FOLDER)
    manifest = {"generator": "synthetic.py", "version": SYNTH_VERSION, "params": _manifest_params(cfg)}
    same = lambda m: m is not None and m.get("version") == SYNTH_VERSION and m.get("params") == manifest["params"]
    old = _read_manifest(target)
    if same(old):
        return target
    if os.path.exists(target) and old is None:
        raise UserError(f"synthetic: {target} exists but has no readable manifest.json, so it was not made by this "
                        f"generator; remove it or choose another --root.")
    if old is not None:  # a benchmark is replaced: never silently
        log.warning("regenerating %s: %s", target, _changes(old, manifest))
    t0 = time.time()
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{SYNTH_FOLDER}.tmp-", dir=root)
    except OSError as e:
        raise UserError(f"synthetic: cannot write the benchmark under {root} ({e}); choose a writable --root") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the renamed benchmark should not be
    try:
        people, outfits, cams, shots = _plan(cfg)
        h, w = cfg.img_size
        bgs = {c: _background(cam, 2 * h, 2 * w) for c, cam in cams.items()}
        for split in ("train", "query", "test"):
            os.makedirs(os.path.join(tmp, split))
        # PNG encoding dominates: split the work over processes (fork: no re-import) when it pays.
        if workers is None:
            workers = min(8, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") and len(shots) >= 500 else 1
        if "fork" not in mp.get_all_start_methods():
            workers = 1
        jobs = [(cfg, people, outfits, cams, bgs, shots[i::workers], tmp) for i in range(workers)]
        if workers == 1:
            parts = [_render_shots(jobs[0])]
        else:
            with mp.get_context("fork").Pool(workers, initializer=_default_signals) as pool:
                parts = pool.map(_render_shots, jobs)
        boxes = {k: v for part in parts for k, v in part.items()}
        with open(os.path.join(tmp, "boxes.json"), "w") as f:  # person boxes (x0, y0, x1, y1), for analysis
            json.dump(boxes, f, sort_keys=True)
        manifest["counts"] = {s: sum(1 for sh in shots if sh[0] == s) for s in ("train", "query", "test")}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:  # written last: marks a complete folder
            json.dump(manifest, f, indent=1, sort_keys=True)
        if same(_read_manifest(target)):  # another process (e.g. another rank) finished first
            return target
        if os.path.exists(target):  # parameters changed: swap the old one out, then delete it
            trash = tempfile.mkdtemp(prefix=f".{SYNTH_FOLDER}.old-", dir=root)
            os.rename(target, os.path.join(trash, SYNTH_FOLDER))
            shutil.rmtree(trash)
        try:
            os.rename(tmp, target)
        except OSError:  # lost a race with another process writing the same parameters
            if not same(_read_manifest(target)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic: generated %d images in %s in %.1f s", len(shots), target, time.time() - t0)
    return target


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


def save_preview(target: str, path: str, ids: int = 6, outfits: int = 3, cams: int = 3, scale: int = 2) -> None:
    """A grid of the benchmark in `target` (a SYNTH_CC folder): one row per test identity,
    columns = outfits x cameras (one gallery image each)."""
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
    try:
        grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)
    except (OSError, ValueError) as e:  # unwritable folder, unknown extension
        raise UserError(f"cannot save the preview to {path} ({e})") from None
    print(f"preview: {len(pids)} identities x {outfits} outfits x {cams} cameras -> {path}")


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
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g.add_argument("--train-ids", type=int, help=f"training identities (default {d.num_train_ids})")
    g.add_argument("--test-ids", type=int, help=f"test identities (default {d.num_test_ids})")
    g.add_argument("--outfits", type=int, help=f"outfits per identity, +-1 (default {d.outfits})")
    g.add_argument("--cameras", type=int, help=f"(default {d.cameras})")
    g.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help=f"(default {d.img_size[0]} {d.img_size[1]})")
    g.add_argument("--shared-outfits", type=float, help=f"chance an outfit is another person's (default {d.shared_outfits})")


def given_params(args: argparse.Namespace) -> dict:
    """SyntheticConfig fields of the parameter flags the user gave (and only those)."""
    given = {field: getattr(args, dest) for dest, field in FLAGS.items() if getattr(args, dest) is not None}
    if "img_size" in given:
        given["img_size"] = tuple(given["img_size"])
    return given


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description="Make the synthetic cloth-changing benchmark, or preview it.")
    ap.add_argument("--make", metavar="OUT", help="write the benchmark to OUT/SYNTH_CC (kept if identical)")
    ap.add_argument("--root", help="with --preview alone: the folder holding SYNTH_CC (or SYNTH_CC itself)")
    ap.add_argument("--preview", metavar="FILE.png", help="save a grid of test identities x outfits x cameras")
    add_parameter_flags(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = given_params(args)
    if not (args.make or args.preview):
        if params:  # parameters alone would be silently ignored
            raise UserError(f"parameters ({', '.join(sorted(params))}) are given but nothing uses them: "
                            f"add --make OUT or --preview FILE.png --root DIR")
        raise UserError("nothing to do: give --make OUT and/or --preview FILE.png (with --root DIR when alone)")
    if args.make and args.root:
        raise UserError("--make OUT is the root: drop --root")
    if args.make:
        t0 = time.time()
        target = generate_synthetic(args.make, SyntheticConfig(**params))  # unset flags: the defaults
        print(f"synthetic benchmark at {target} ({time.time() - t0:.1f} s)")
    elif not args.root:
        raise UserError("--preview needs --root DIR (the folder that holds SYNTH_CC) or --make OUT")
    else:  # a reader: the benchmark that is there, unless explicit flags ask for another one
        target = generate_synthetic(args.root, config_for(args.root, params))
    if args.preview:
        save_preview(target, args.preview)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
