"""The synthetic world's drawing: identity palettes, people, outfits and cameras drawn from seeded
generators, one image rendered with its part label map (`PARTS`)."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from masks import CLOTHES_PARTS, IDENTITY_PARTS, PARTS  # noqa: F401  (the one part set; re-exported by synthetic)

# Identity traits come from small distinct palettes so that they stay recognisable at 128x64.
SKIN = [(255, 222, 196), (236, 188, 150), (214, 160, 115), (182, 120, 80), (140, 90, 58), (96, 62, 40)]
HAIR = [(22, 18, 18), (72, 44, 24), (128, 84, 44), (222, 190, 110), (180, 70, 30), (150, 150, 150),
        (238, 236, 228), (40, 70, 200), (220, 70, 160), (40, 160, 80)]
HAIR_STYLES = ["short", "long", "bun", "spiky", "ponytail", "afro", "bald"]
SHOES = [(245, 245, 245), (25, 25, 25), (210, 30, 30), (30, 80, 220), (245, 205, 30), (30, 170, 70),
         (245, 120, 20), (140, 50, 180)]
TOP_PATTERNS = ["solid", "solid", "hstripes", "vstripes", "checks", "dots"]
BOTTOM_PATTERNS = ["solid", "solid", "solid", "vstripes", "checks"]


# the HSV ranges of garment colours (hue uniform over the circle): tops, and bottoms a little darker
TOP_RANGE = dict(sat=(0.25, 0.95), val=(0.2, 0.95))
BOTTOM_RANGE = dict(sat=(0.25, 0.95), val=(0.15, 0.8))


def _colour(rng: np.random.Generator, sat=TOP_RANGE["sat"], val=TOP_RANGE["val"]) -> tuple[int, int, int]:
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
                bottom=_colour(rng, **BOTTOM_RANGE), bottom2=_colour(rng),
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
    # the pattern covers about a quarter of the garment (dots a fifth), so that c1 is the colour one
    # sees and names (METHOD.md section 11: half-and-half stripes made "the top colour" a coin toss)
    if kind == "hstripes":
        m = np.broadcast_to(sv[:, None] < 0.25, (len(sv), len(su)))
    elif kind == "vstripes":
        m = np.broadcast_to(su[None, :] < 0.25, (len(sv), len(su)))
    elif kind == "checks":
        m = (sv[:, None] < 0.5) & (su[None, :] < 0.5)
    else:  # dots
        m = ((su[None, :] - 0.5) ** 2 + (sv[:, None] - 0.5) ** 2) < 0.06
    canvas.paste(c2, box, Image.fromarray(np.asarray(crop) & np.where(m, np.uint8(255), np.uint8(0))))


# Part labels: the label map of an image holds the index of the part that is visible at each pixel.
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
