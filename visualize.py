"""Figures: Grad-CAM heat maps drawn over their images (the maps themselves are gradcam.py), t-SNE of
features (SCI's Fig. 4), ranked lists, CMC curves, and the names and captions they show.

    draw_heatmaps(pictures, [heat], ["SCI"], "heatmaps.png", "Grad-CAM")   # heat: gradcam.heatmaps
    tsne_figure(feats, pids, clothes, "tsne.png", "gallery features")
    cmc_figure({"cc": {"cmc": cmc, "mAP": 0.3}}, "cmc_curve.png", "CMC of run X")
    ranked_figure([RankedRow("q.png", "id 3", [Match("g.png", "1. id 3", "right")])], "ranked.png", "title", legend)
    ranked_lists(protocol, 8, "ranked_cc.png")      # an evaluation's protocol dict (evaluate.protocol_features)
    run_label("runs/base/best.pt", ckpt["args"], defaults)  # "base (tiny; --no-sse --no-sim --no-cal)"

tools/figures.py (--heatmaps through gradcam.explain, --tsne), evaluate.py --visualize and tools/search.py
call these; this module imports neither evaluate.py nor gradcam.py.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from utils import UserError, write_atomic

if TYPE_CHECKING:
    import torch

    from rerank import RerankConfig

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")  # one per outfit of an identity
LINE_STYLES = ("-", "--", ":", "-.")  # one per CMC curve


# ----------------------------------------------------------------------------- choosing and naming

def pick_images(items: list[tuple], n: int) -> list[tuple]:
    """n items spread over the identities, deterministically: the first image of identities evenly
    spaced in sorted order (so put queries first); when n exceeds the identities, every identity's
    first image, then second, and so on."""
    by_id: dict = {}
    for item in items:
        by_id.setdefault(item[1], []).append(item)
    ids = sorted(by_id)
    if n <= len(ids):
        return [by_id[ids[j]][0] for j in np.unique(np.linspace(0, len(ids) - 1, n).round().astype(int))]
    rounds = max(len(v) for v in by_id.values())
    order = [by_id[pid][r] for r in range(rounds) for pid in ids if r < len(by_id[pid])]
    return order[:n]


def run_label(path: str | Path, args: dict, defaults: dict | None = None) -> str:
    """A figure's name for a checkpoint: its run folder and architecture, then the flags of its run
    (`args`, the checkpoint's) whose value differs from `defaults` (argument name -> default, e.g.
    evaluate.checkpoint_label's training defaults), as typed: `--ortho gram-schmidt`, `--no-sim`,
    `--no-triplet`. Arguments the run does not record, or records in another form than its flag's
    (a script's resolved value, e.g. --loss-weight's list as a dict), are left out."""
    def form(value):
        return list(value) if isinstance(value, tuple) else value

    flags = []
    for key, default in (defaults or {}).items():
        if key not in args or type(form(args[key])) is not type(form(default)) or form(args[key]) == form(default):
            continue
        name, value = key.replace("_", "-"), args[key]
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            flags.append(f"--{name} {shown}")
    where = Path(path).parent.name or Path(path).stem
    return f"{where} ({args.get('arch', '?')}{'; ' + ' '.join(flags) if flags else ''})"



# ----------------------------------------------------------------------------- figures

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit needed on a server
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, **options) -> Path:
    """Save a matplotlib figure as PNG atomically (a stop never leaves half a picture) and close it."""
    try:
        return write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", **options))
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def distance_text(d: float) -> str:
    """A distance for a caption: 3 significant digits (0.000123, not 0.000), and never negative (a
    self-match's rounding error would print -0.000)."""
    return f"{d if d > 0 else 0.0:.3g}"


def short_text(text: str, width: int) -> str:
    """`text` in at most `width` characters, cut in the middle: the start (a person's id, a folder) and
    the end (a frame number, the extension) both stay readable."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[-(width - 1 - head):]


def _rgb(image) -> np.ndarray:
    """A PIL image or an array as H x W x 3 uint8."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.dtype != np.uint8:  # floats in [0, 1]
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)


def _resized(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if arr.shape[:2] == tuple(size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))


def draw_heatmaps(images: list, heat_rows: list[torch.Tensor], row_titles: list[str], path: str | Path,
                  title: str, captions: list[str] | None = None) -> None:
    """PNG: one column per image; the first row the images, then one row per model (`heat_rows`,
    each [N, H, W], named by `row_titles`) with its heat as a colour map over the image, which is
    resized to the heat's size (the model's input). Each map is shown relative to its own peak."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(images)
    if n == 0 or len(row_titles) != len(heat_rows) or any(len(h) != n for h in heat_rows):
        raise UserError(f"draw_heatmaps: {n} images, {len(heat_rows)} heat rows of lengths "
                        f"{[len(h) for h in heat_rows]} and {len(row_titles)} row titles do not fit")
    if captions is not None and len(captions) != n:
        raise UserError(f"draw_heatmaps: {len(captions)} captions for {n} images")
    rows = 1 + len(heat_rows)
    fig, axes = plt.subplots(rows, n, figsize=(1.25 * n + 1.6, 2.3 * rows + 0.5), squeeze=False)
    for j, image in enumerate(images):
        picture = _rgb(image)
        axes[0, j].imshow(picture)
        if captions is not None:
            axes[0, j].set_title(captions[j], fontsize=8)
        for r, heat in enumerate(heat_rows, start=1):
            h = heat[j].detach().float().cpu().numpy()
            axes[r, j].imshow(_resized(picture, h.shape))
            axes[r, j].imshow(h / max(float(h.max()), 1e-12), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for r, label in enumerate(["image", *row_titles]):
        axes[r, 0].set_ylabel(textwrap.fill(label, 24, break_on_hyphens=False), fontsize=9)
    for ax in axes.flat:  # no ticks, but keep the axes so that the row labels show
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle(title, fontsize=11)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes[1:, :].ravel().tolist(),
                       fraction=0.04, pad=0.02)
    bar.set_label("heat / its peak", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def tsne_figure(features: np.ndarray, pids: np.ndarray, clothes: np.ndarray, path: str | Path, title: str,
                max_ids: int = 20, seed: int = 0) -> None:
    """PNG: t-SNE (2-d, PCA init, seeded) of the L2-normalised features ([N, F]) of up to `max_ids`
    identities spread evenly over the sorted ids; colour = identity, marker = outfit index within
    the identity (its clothes labels in sorted order)."""
    from matplotlib.lines import Line2D
    from sklearn.manifold import TSNE

    feats = np.asarray(features, dtype=np.float32)
    pids, clothes = np.asarray(pids), np.asarray(clothes)
    if feats.ndim != 2 or len(pids) != len(feats) or len(clothes) != len(feats):
        raise UserError(f"tsne_figure: features {feats.shape}, {len(pids)} pids and {len(clothes)} clothes "
                        f"labels do not match (one label each per feature row)")
    ids = np.unique(pids)
    if len(ids) > max_ids:
        ids = ids[np.unique(np.linspace(0, len(ids) - 1, max_ids).round().astype(int))]
    keep = np.isin(pids, ids)
    feats, pids, clothes = feats[keep], pids[keep], clothes[keep]
    if len(feats) < 3:
        raise UserError(f"t-SNE needs at least 3 features, got {len(feats)}")
    # unit length: t-SNE's Euclidean distances then order pairs as the cosine ranking does
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    perplexity = float(min(30.0, max(2.0, (len(feats) - 1) / 3)))  # must stay below the number of points
    xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(feats)

    plt = _pyplot()
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    id_handles, most_outfits = [], 0
    for k, pid in enumerate(ids):
        colour = colours(k % 20)
        mine = pids == pid
        outfits = np.unique(clothes[mine])
        most_outfits = max(most_outfits, len(outfits))
        for o, clo in enumerate(outfits):
            at = mine & (clothes == clo)
            ax.scatter(xy[at, 0], xy[at, 1], color=colour, marker=MARKERS[o % len(MARKERS)], s=30,
                       edgecolors="black", linewidths=0.3)
        id_handles.append(Line2D([], [], color=colour, marker="o", linestyle="", label=f"id {pid}"))
    outfit_handles = [Line2D([], [], color="gray", marker=MARKERS[o % len(MARKERS)], linestyle="",
                             markeredgecolor="black", label=f"outfit {o + 1}") for o in range(most_outfits)]
    first = ax.legend(handles=id_handles, title="colour = identity", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      fontsize=7, title_fontsize=8, ncol=2 if len(ids) > 12 else 1)
    ax.add_artist(first)  # a second legend would otherwise replace the first
    ax.legend(handles=outfit_handles, title="marker = outfit", loc="lower left", bbox_to_anchor=(1.01, 0.0),
              fontsize=7, title_fontsize=8)
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
    save_figure(fig, path, dpi=120, bbox_inches="tight")


# ----------------------------------------------------------------------------- ranked lists and CMC

FRAME_COLOURS = {"query": "#1f5fd6", "right": "#1a9e3a", "junk": "#e69500", "wrong": "#d62728",
                 "plain": "#8c8c8c"}  # frame of a ranked-list tile, by kind (junk: orange, not a traffic light)
TILE = (128, 64)                       # (height, width) of a placeholder tile, pixels; pictures keep their shape
MISSING_GREY = 200                     # grey level of a placeholder tile


class Match(NamedTuple):
    """One gallery tile of a ranked list: its image file (None: not available), the caption under it and
    its frame kind (a key of FRAME_COLOURS)."""
    path: str | None
    caption: str
    kind: str


class RankedRow(NamedTuple):
    """One query of a ranked-list figure: its image file (None: not available), its label (left of the
    row) and its matches, best first."""
    query: str | None
    label: str
    matches: list[Match]


def _thumbnail(path: str | None, longest: int = 256) -> np.ndarray | None:
    """The image as H x W x 3 uint8, its longer side at most `longest`; None when there is no path or
    the file cannot be read (a features file without paths, a moved or corrupt image)."""
    from PIL import Image

    if path is None:
        return None
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((longest, longest))
            return np.asarray(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _tile(ax, picture: np.ndarray | None, colour: str, caption: str) -> None:
    """Draw one framed tile (a _thumbnail, or None: a grey placeholder) with its caption below."""
    if picture is None:
        ax.imshow(np.full((*TILE, 3), MISSING_GREY, dtype=np.uint8))
        ax.text(TILE[1] / 2, TILE[0] / 2, "no\nimage", ha="center", va="center", fontsize=7, color="dimgray")
    else:
        ax.imshow(picture)  # aspect "equal": the frame hugs the picture
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)
    ax.set_xlabel(caption, fontsize=7, labelpad=3)


def ranked_figure(rows: list[RankedRow], path: str | Path, title: str, legend: dict[str, str],
                  always: tuple[str, ...] = ("query",)) -> None:
    """PNG of ranked lists, one row per query: its label, the query (blue frame), a gap, then its
    matches best first, each framed in the colour of its kind (FRAME_COLOURS) with its caption below.
    The legend explains the kinds that occur and those in `always` (`legend`: kind -> text) and, when
    there are any, the grey placeholder tiles of images that are not available."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    kinds = {m.kind for row in rows for m in row.matches} | {"query", *always}
    if not rows or kinds - set(FRAME_COLOURS):
        raise UserError(f"ranked_figure: {len(rows)} rows, frame kinds {sorted(kinds - set(FRAME_COLOURS))} "
                        f"unknown; use {', '.join(FRAME_COLOURS)}")
    cols = max(max(len(row.matches) for row in rows), 1)
    pictures = [[_thumbnail(row.query)] + [_thumbnail(m.path) for m in row.matches] for row in rows]
    handles = [Patch(facecolor="white", edgecolor=FRAME_COLOURS[k], linewidth=3, label=legend.get(k, k))
               for k in FRAME_COLOURS if k in kinds]
    if any(p is None for row in pictures for p in row):
        handles.append(Patch(facecolor=(MISSING_GREY / 255,) * 3, edgecolor="none", label="grey: image not available"))
    # a fixed layout in inches (constrained layout took as long as the drawing): row labels on the left,
    # the title on top, the captions under each row and the legend at the bottom
    left, right, row_h, col_w, caption = 1.5, 0.1, 2.0, 1.0, 0.5
    width = left + right + col_w * (cols + 1.15)
    columns = max(1, min(len(handles), int(width // 3)))  # legend entries per line
    legend_h = 0.13 + 0.22 * -(-len(handles) // columns)
    title = "\n".join(textwrap.fill(line, int(width * 11)) for line in title.splitlines())
    top = 0.2 + 0.19 * len(title.splitlines())
    height = top + row_h * len(rows) + legend_h
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(len(rows), cols + 2, width_ratios=[1, 0.15] + [1] * cols, wspace=0.1,
                            hspace=caption / (row_h - caption), left=left / width, right=1 - right / width,
                            top=1 - top / height, bottom=(legend_h + caption) / height)  # column 1: the gap
    for r, row in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        _tile(ax, pictures[r][0], FRAME_COLOURS["query"], "query")
        ax.set_ylabel(row.label, rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
        for j, match in enumerate(row.matches):
            _tile(fig.add_subplot(grid[r, j + 2]), pictures[r][j + 1], FRAME_COLOURS[match.kind], match.caption)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.02 / height), ncol=columns, fontsize=8,
               frameon=False)
    save_figure(fig, path, dpi=100)


def cmc_figure(results: dict, path: str | Path, title: str) -> None:
    """PNG: the CMC curve of each protocol in `results` (name -> {"cmc": fractions for ranks 1..n,
    "mAP": fraction}, as evaluate.py's metrics), matching rate in % against rank, one line each; the
    legend gives each protocol's Rank-1 and mAP."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    if not results:
        raise UserError("cmc_figure: no results to draw")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lowest, longest = 100.0, 1
    for k, (name, m) in enumerate(results.items()):
        cmc = 100 * np.asarray(m["cmc"], dtype=np.float64)
        lowest, longest = min(lowest, float(cmc[0])), max(longest, len(cmc))
        # each curve its own dash and marker (markers at different ranks): equal curves stay visible
        ax.plot(np.arange(1, len(cmc) + 1), cmc, linewidth=1.8, linestyle=LINE_STYLES[k % len(LINE_STYLES)],
                marker=MARKERS[k % len(MARKERS)], markersize=5, markevery=(k % 3, max(1, len(cmc) // 8)),
                label=f"{name}: Rank-1 {cmc[0]:.1f}%, mAP {100 * float(m['mAP']):.1f}%")
    ax.set_xlim(1, max(longest, 2))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ranks are whole numbers
    ax.set_ylim(10 * int(lowest // 10), 101)  # from below the lowest Rank-1; 101: a curve at 100% stays visible
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", title="protocol", fontsize=8, title_fontsize=8)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path, dpi=120, bbox_inches="tight")


# ----------------------------------------------------------------------------- an evaluation's ranked lists and CMC

RANKED_TOP = 10                 # gallery images shown per query in ranked lists
RIGHT_TEXT = {"general": "correct: same identity, other camera",
              "cc": "correct: same identity, other camera, other clothes",
              "sc": "correct: same identity, other camera, same clothes"}
JUNK_TEXT = {"general": "same camera", "cc": "same camera or same clothes", "sc": "same camera or other clothes"}


def who_text(labels: dict, i: int, sep: str = "\n", width: int = 24) -> str:
    """Camera and clothes (where known: the dataset's own label, cut to `width` characters, else the
    clothes id) of row i of a split's labels. On a tile (sep ", ") 'id P, cam C' then the clothes line;
    beside a query 'id P', 'cam C', 'clothes ...' each on its own line."""
    clothes = labels.get("clothes_names")
    clothes = clothes if clothes is not None else labels.get("clothes")
    head = f"id {labels['pids'][i]}{sep}cam {labels['camids'][i]}"
    return head + (f"\nclothes {short_text(str(clothes[i]), width)}" if clothes is not None else "")


def _path_of(labels: dict, j: int) -> str | None:
    return None if labels.get("paths") is None else str(labels["paths"][j])


def ranked_lists(protocol: dict, num_queries: int, path: str | Path, top: int = RANKED_TOP,
                 rerank: RerankConfig | None = None, source: str = "") -> None:
    """PNG with one row per query, labelled with its row in the features (from 1, as search_*.png) and its
    id, camera and clothes: the query, then its top gallery images after junk removal, framed green where correct and
    red where wrong under the protocol's masks, with their labels and distances (gray tiles where a
    features file has no image paths); the legend explains the colours. Queries are spread evenly
    over those with a correct match. With `rerank`, the lists are ranked by the re-ranked distances.
    `source` (the checkpoint or features file) goes into the title."""
    from metrics import DEFAULT_CHUNK, _cosine_distance, _unit_features, protocol_masks
    from rerank import _Reranked

    q, g, mask = protocol["query"], protocol["gallery"], protocol["mask"]
    qf, gf = _unit_features(q["feats"], g["feats"])
    ql, gl = ({k: None if v is None else np.asarray(v) for k, v in d.items() if k != "feats"} for d in (q, g))

    def good_and_junk(i: int) -> tuple[np.ndarray, np.ndarray]:
        q_clo = None if ql.get("clothes") is None else ql["clothes"][i]  # load_features made sure cc/sc have both
        return protocol_masks(ql["pids"][i], ql["camids"][i], q_clo, gl["pids"], gl["camids"], gl.get("clothes"), mask)

    valid = [i for i in range(len(qf)) if good_and_junk(i)[0].any()]
    if not valid:
        return
    spread = np.linspace(0, len(valid) - 1, min(num_queries, len(valid))).round().astype(int)
    reranked = _Reranked(qf, gf, rerank, DEFAULT_CHUNK) if rerank is not None else None
    rows = []
    for i in (valid[j] for j in np.unique(spread)):
        good, junk = good_and_junk(i)
        dist = _cosine_distance(qf[i:i + 1], gf) if reranked is None else reranked.block(i, i + 1)
        dist = dist[0].cpu().numpy()
        order = np.argsort(dist, kind="stable")
        order = order[~junk[order]][:top]
        matches = [Match(_path_of(gl, j), f"{r}. {who_text(gl, j, ', ', width=16)}\nd {distance_text(dist[j])}",
                         "right" if good[j] else "wrong") for r, j in enumerate(order, 1)]
        rows.append(RankedRow(_path_of(ql, i), f"query {i + 1}\n{who_text(ql, i)}", matches))
    title = (f"ranked lists, {protocol['name']} protocol{' (re-ranked)' if rerank is not None else ''}: top {top} "
             f"after junk removal (same identity, {JUNK_TEXT[mask]}), d = distance\n{source}")
    ranked_figure(rows, path, title, {"query": "query", "right": RIGHT_TEXT[mask], "wrong": "wrong: another identity"},
                  always=("query", "right", "wrong"))


def cmc_curve(results: dict, path: str | Path, source: str = "", reranked: bool = False) -> None:
    """PNG: the CMC curve of every setting in `results` (matching rate in % against rank), titled with
    `source` (the checkpoint or features file)."""
    cmc_figure(results, path, f"CMC curve{' (re-ranked)' if reranked else ''}\n{source}")
