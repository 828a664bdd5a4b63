"""Explanations and figures: Grad-CAM heat maps of the test feature (SCI's "see what you seek",
Fig. 5-6), how much of that heat lies on identity parts, clothes and background (the seek
fractions, measured with the synthetic benchmark's part masks), and t-SNE of features (Fig. 4).

    heat = heatmaps(model, images)                  # [B, H, W], each map sums to 1
    seek_fractions(heat, masks)                     # {"identity": f, "clothes": f, "background": f}
    draw_heatmaps(pictures, [heat], ["SCI"], "heatmaps.png", "Grad-CAM")
    tsne_figure(feats, pids, clothes, "tsne.png", "gallery features")
    cmc_figure({"cc": {"cmc": cmc, "mAP": 0.3}}, "cmc_curve.png", "CMC of run X")
    ranked_figure([RankedRow("q.png", "id 3", [Match("g.png", "1. id 3", "right")])], "ranked.png", "title", legend)
    ranked_lists(protocol, 8, "ranked_cc.png")      # an evaluation's protocol dict (evaluate.protocol_features)
    run_label("runs/base/best.pt", ckpt["args"], defaults)  # "base (tiny; --no-sse --no-sim --no-cal)"

tools/figures.py (--heatmaps, --compare, --tsne), evaluate.py --visualize and tools/search.py call these;
this module does not import evaluate.py.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import synthetic
from synthetic import CLOTHES_PARTS, IDENTITY_PARTS, PARTS  # part labels of the masks (label = index)
from utils import UserError, check_stop, write_atomic

if TYPE_CHECKING:
    from rerank import RerankConfig

GROUPS = ("identity", "clothes", "background")
_GROUP_OF_PART = torch.tensor([GROUPS.index("identity") if p in IDENTITY_PARTS else
                               GROUPS.index("clothes") if p in CLOTHES_PARTS else GROUPS.index("background")
                               for p in PARTS])
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")  # one per outfit of an identity
LINE_STYLES = ("-", "--", ":", "-.")  # one per CMC curve


# ----------------------------------------------------------------------------- Grad-CAM

RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _feature_map_layer(visual: nn.Module, layer: str | None = None) -> tuple[nn.Module, str]:
    """(module, backbone family) of the encoder's last feature map: a ResNet's is layer4's output
    [B, C, h, w]; a ViT's is the input of its last block [1 + h*w, B, C] (sequence-first). Not that
    block's output: the class token (the test feature) is read right after it, so its patch tokens
    could reach the feature only through SIM, and a baseline's or a fresh model's map would be
    empty; the last block's attention is where the patches form the class token (pytorch-grad-cam's
    ViT recipe hooks the same tokens after LayerNorm, the last block's norm1)."""
    if hasattr(visual, "layer4"):
        if layer not in (None, *RESNET_LAYERS):
            raise UserError(f"Grad-CAM layer {layer!r}: a ResNet's are {', '.join(RESNET_LAYERS)}")
        return getattr(visual, layer or "layer4"), "resnet"
    if layer is not None:
        raise UserError(f"Grad-CAM layer {layer!r}: a ViT's map is always the tokens entering its last block")
    if hasattr(visual, "transformer"):
        return visual.transformer.resblocks[-1], "vit"
    raise UserError(f"Grad-CAM needs a ModifiedResNet or VisionTransformer encoder, got {type(visual).__name__}")


def _as_map(act: torch.Tensor, kind: str, grid: tuple[int, int]) -> torch.Tensor:
    """The last feature map as [B, C, h, w]; for a ViT the patch tokens on their grid (no class token)."""
    if kind == "resnet":
        return act
    tokens = act[1:]  # [h*w, B, C], row-major over the patch grid like the conv's flatten(2)
    return tokens.permute(1, 2, 0).reshape(act.shape[1], act.shape[2], *grid)


def _upsample(cam: torch.Tensor, size: tuple[int, int], visual: nn.Module, kind: str) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear. A ViT's patch (i, j) is centred on pixel
    (i * stride + patch / 2, ...), so with overlapping patches the grid covers a shifted sub-area
    of the image: upsample to that area, then extend its edges over the uncovered border."""
    h, w = cam.shape[-2:]
    H, W = size
    cam = cam[:, None]  # [B, 1, h, w]
    if kind == "vit":
        p, s = visual.patch_size, visual.patch_stride
        top = left = (p - s) // 2
        bottom, right = H - h * s - top, W - w * s - left
        if min(top, bottom, right) >= 0:
            cam = F.interpolate(cam, size=(h * s, w * s), mode="bilinear", align_corners=False)
            return F.pad(cam, (left, right, top, bottom), mode="replicate")[:, 0]
    return F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)[:, 0]


def _normalise(heat: torch.Tensor) -> torch.Tensor:
    """Each map of [B, H, W] divided by its sum; a map without heat becomes uniform."""
    total = heat.sum(dim=(1, 2), keepdim=True)
    uniform = torch.full_like(heat, 1.0 / (heat.shape[1] * heat.shape[2]))
    return torch.where(total > 0, heat / total.clamp_min(torch.finfo(heat.dtype).tiny), uniform)


def heatmaps(model: nn.Module, images: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Grad-CAM of the test feature: [B, 3, H, W] -> heat [B, H, W] (float32, on the CPU), each map
    non-negative and summing to 1.

    Re-ID test images have no class to explain, so the target is the test feature f itself (the
    eval-mode output, before any normalisation): target = ||f||^2 / 2, whose gradient is J^T f,
    i.e. the map shows which regions the test feature is made of. The feature map A is the
    encoder's last one (ResNet: layer4's output; ViT: the patch tokens entering the last block,
    on the patch grid; see _feature_map_layer). Weights w_c = spatial mean of dtarget/dA_c,
    CAM = ReLU(sum_c w_c A_c), upsampled bilinearly to the image size. The model's parameters get
    no gradient, and its requires_grad flags and train/eval mode are left as they were.
    `layer` picks an earlier ResNet map ("layer1".."layer3"): at small inputs the last map is a few
    cells (4x2 at 64x32), too coarse to tell a head from a shirt."""
    visual = model.visual
    layer, kind = _feature_map_layer(visual, layer)
    captured: list[torch.Tensor] = []

    def leaf(activation: torch.Tensor) -> torch.Tensor:
        # a leaf in place of the activation: the gradient is taken w.r.t. it alone, and nothing
        # before it (stem, earlier blocks) is kept for backward
        captured.append(activation.detach().requires_grad_(True))
        return captured[-1]

    was_training = model.training
    if kind == "resnet":
        handle = layer.register_forward_hook(lambda module, inputs, output: leaf(output))
    else:  # the block's input: replace its first positional argument
        handle = layer.register_forward_pre_hook(lambda module, args: (leaf(args[0]), *args[1:]))
    try:
        model.eval()
        with torch.enable_grad():
            feats = model(images)                          # [B, F], the test feature
            target = feats.float().pow(2).sum() / 2        # images are independent in eval mode
            (grad,) = torch.autograd.grad(target, captured[0])
    finally:
        handle.remove()
        model.train(was_training)
    grid = None
    if kind == "vit":
        from clip.model import vit_grid
        grid = vit_grid(tuple(images.shape[-2:]), visual.patch_size, visual.patch_stride)
    act, grad = _as_map(captured[0].detach(), kind, grid), _as_map(grad, kind, grid)  # [B, C, h, w]
    weights = grad.float().mean(dim=(2, 3), keepdim=True)                            # [B, C, 1, 1]
    cam = F.relu((weights * act.float()).sum(dim=1))                                 # [B, h, w]
    heat = _upsample(cam, tuple(images.shape[-2:]), visual, kind).clamp_min(0)       # [B, H, W]
    return _normalise(heat.detach().cpu())


# ----------------------------------------------------------------------------- seek fractions

def _image_fractions(heat: torch.Tensor, masks) -> torch.Tensor:
    """Per image, the share of its heat on each of GROUPS: [B, 3], rows summing to 1."""
    heat = torch.as_tensor(heat).detach().float().cpu()
    masks = masks.detach().cpu().long() if isinstance(masks, torch.Tensor) else \
        torch.from_numpy(np.array(masks)).long()  # a copy: masks read from files may be read-only
    if heat.dim() != 3 or masks.dim() != 3 or len(heat) != len(masks):
        raise UserError(f"heat maps {tuple(heat.shape)} and part masks {tuple(masks.shape)} must both be "
                        f"[B, H, W] with the same B")
    if len(masks) and (int(masks.min()) < 0 or int(masks.max()) >= len(PARTS)):
        raise UserError(f"part masks hold labels outside 0..{len(PARTS) - 1} ({', '.join(PARTS)})")
    if masks.shape[-2:] != heat.shape[-2:]:
        # masks come at the image's own size, heat at the model's input size; nearest keeps labels
        # labels (no blend of two parts), "nearest-exact" samples pixel centres as PIL's NEAREST does
        masks = F.interpolate(masks[:, None].float(), size=heat.shape[-2:], mode="nearest-exact")[:, 0].long()
    total = heat.sum(dim=(1, 2))
    if bool((total <= 0).any()):
        raise UserError("a heat map has no heat (its sum is not positive); seek fractions need heat to share out")
    groups = _GROUP_OF_PART[masks].flatten(1)                                      # [B, H*W] in 0..2
    sums = torch.zeros(len(heat), len(GROUPS)).scatter_add_(1, groups, heat.flatten(1))  # [B, 3]
    return sums / total[:, None]


def seek_fractions(heat: torch.Tensor, masks) -> dict[str, float]:
    """The share of the heat ([B, H, W]) on identity parts, clothes and background, by the part masks
    ([B, H', W'] integer labels, index into PARTS; resized with nearest to the heat's size when they
    differ), averaged over the images; the three fractions of one image sum to 1."""
    fractions = _image_fractions(heat, masks).mean(dim=0)
    return {g: float(fractions[i]) for i, g in enumerate(GROUPS)}


def part_masks_available(items: list[tuple], load_mask: Callable[[str], np.ndarray] | None = None) -> bool:
    """Whether the part mask of the first item can be read (the synthetic benchmark's masks/ folder)."""
    try:
        (load_mask or synthetic.load_mask)(str(items[0][0]))
    except (UserError, OSError, ValueError, IndexError):
        return False
    return True


def _load_batch(items: list[tuple], img_size: tuple[int, int], normalize) -> torch.Tensor:
    from loaders import build_transforms, open_rgb

    transform = build_transforms(tuple(img_size), train=False, normalize=normalize)
    return torch.stack([transform(open_rgb(str(item[0]))) for item in items])  # [B, 3, H, W]


def heatmaps_of_items(model: nn.Module, items: list[tuple], img_size: tuple[int, int], normalize,
                      device: torch.device | str, batch_size: int = 64, layer: str | None = None) -> torch.Tensor:
    """heatmaps() of dataset items (path, pid, camid, clothes), read with the test transform: [N, H, W]."""
    out = []
    for start in range(0, len(items), batch_size):
        check_stop()
        out.append(heatmaps(model, _load_batch(items[start:start + batch_size], img_size, normalize).to(device),
                            layer))
    return torch.cat(out) if out else torch.zeros(0, *img_size)


def seek_on_dataset(model: nn.Module, items: list[tuple], img_size: tuple[int, int], normalize,
                    device: torch.device | str, batch_size: int = 64,
                    load_mask: Callable[[str], np.ndarray] | None = None, layer: str | None = None) -> dict[str, float]:
    """Seek fractions averaged over dataset items (path, pid, camid, clothes), each image read with
    the test transform and its part mask with `load_mask(path)` (default: synthetic.load_mask);
    returns {"identity", "clothes", "background", "images": number of images}."""
    if not items:
        raise UserError("seek fractions: no images given")
    load_mask = load_mask or synthetic.load_mask
    sums = torch.zeros(len(GROUPS), dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        heat = heatmaps_of_items(model, chunk, img_size, normalize, device, batch_size, layer)  # [b, H, W]
        for i, item in enumerate(chunk):  # one at a time: masks of one batch may differ in size
            mask = torch.from_numpy(np.array(load_mask(str(item[0]))))[None]              # [1, H', W']
            sums += _image_fractions(heat[i:i + 1], mask)[0].double()
    return {**{g: float(sums[i] / len(items)) for i, g in enumerate(GROUPS)}, "images": len(items)}


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


def explain(runs: list[tuple], protocols: list[tuple], num_images: int, path: str | Path,
            device: torch.device | str, batch_size: int = 64, dataset_name: str | None = None,
            layer: str | None = None, clothes_names: list[str] | None = None) -> dict:
    """tools/figures.py --heatmaps: the Grad-CAM figure of `num_images` test images for each run (checkpoint
    path, model, ModelConfig, its label: run_label), one row each, and, on the synthetic benchmark when its
    part masks can be read, each run's seek fractions over all query and gallery images of
    `protocols` [(name, query, gallery, mask)]: {"seek": {...}, "seek_compare": {...}} for results.json.
    `clothes_names`: the dataset's label of each test clothes id (captions show the id without)."""
    from loaders import open_rgb

    picks = pick_images(protocols[0][1] + protocols[0][2], num_images)  # queries first
    rows = [heatmaps_of_items(model, picks, config.img_size, (config.pixel_mean, config.pixel_std), device, batch_size,
                              layer) for _, model, config, _ in runs]
    labels = [label for _, _, _, label in runs]
    draw_heatmaps([open_rgb(str(item[0])) for item in picks], rows, labels, path,
                  "Grad-CAM of the test feature: the regions it is made of",
                  [f"id {pid} cam {cam}\nclothes {clothes_names[clo] if clothes_names else clo}"
                   for _, pid, cam, clo in picks])
    print(f"wrote {path}")
    items = list({item[0]: item for _, query, gallery, _ in protocols for item in query + gallery}.values())
    if dataset_name != "synthetic" or not part_masks_available(items):
        print("seek fractions need part masks (the synthetic benchmark's masks/ folder); not computed")
        return {}
    seek = {}
    for key, (ckpt, model, config, _), label in zip(("seek", "seek_compare"), runs, labels):
        fractions = seek_on_dataset(model, items, config.img_size, (config.pixel_mean, config.pixel_std), device,
                                    batch_size, layer=layer)
        print(f"seek fractions of {label}: " + "  ".join(f"{g} {fractions[g]:.3f}" for g in GROUPS)
              + f"  ({fractions['images']} images)")
        seek[key] = {"source": str(ckpt), **fractions}
    return seek


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
