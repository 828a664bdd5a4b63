"""The preview of a benchmark: a grid of test identities x outfits x cameras, and a few images with their
part masks and captions (`save_preview`). No datasets package: this package knows its own file names."""
from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from synthetic.benchmark import load_annotations, load_mask
from synthetic.draw import PARTS
from utils import UserError

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
