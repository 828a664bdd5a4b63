"""Grad-CAM heat maps of the test feature (SCI's "see what you seek", Fig. 5-6) and how much of that
heat lies on identity parts, clothes and background (the seek fractions, over part masks: the synthetic
benchmark's own, or a human parser's for real datasets, masks.MaskSource). The drawing is visualize.py.

    heat = heatmaps(model, images)                  # [B, H, W], each map sums to 1
    seek_fractions(heat, masks)                     # {"identity": f, "clothes": f, "background": f}
    seek_on_dataset(model, items, (256, 128), normalize, "cuda", load_mask=source.read)   # over a dataset
    explain(runs, protocols, 8, "heatmaps.png", "cuda", masks=source)   # tools/figures.py --heatmaps

tools/figures.py (--heatmaps) and benchmarks/ablation.py call these.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from masks import CLOTHES_PARTS, IDENTITY_PARTS, PARTS  # part labels of the masks (label = index)
from utils import UserError, check_stop

if TYPE_CHECKING:
    from masks import MaskSource

GROUPS = ("identity", "clothes", "background")
_GROUP_OF_PART = torch.tensor([GROUPS.index("identity") if p in IDENTITY_PARTS else
                               GROUPS.index("clothes") if p in CLOTHES_PARTS else GROUPS.index("background")
                               for p in PARTS])


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


def part_masks_available(items: list[tuple], load_mask: Callable[[str], np.ndarray]) -> bool:
    """Whether the part mask of the first item can be read with `load_mask` (e.g. a masks.MaskSource's read)."""
    try:
        load_mask(str(items[0][0]))
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
                    device: torch.device | str, batch_size: int = 64, *,
                    load_mask: Callable[[str], np.ndarray], layer: str | None = None) -> dict[str, float]:
    """Seek fractions averaged over dataset items (path, pid, camid, clothes), each image read with
    the test transform and its part mask with `load_mask(path)` (e.g. masks.mask_source(...).read);
    returns {"identity", "clothes", "background", "images": number of images}."""
    if not items:
        raise UserError("seek fractions: no images given")
    sums = torch.zeros(len(GROUPS), dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        heat = heatmaps_of_items(model, chunk, img_size, normalize, device, batch_size, layer)  # [b, H, W]
        for i, item in enumerate(chunk):  # one at a time: masks of one batch may differ in size
            mask = torch.from_numpy(np.array(load_mask(str(item[0]))))[None]              # [1, H', W']
            sums += _image_fractions(heat[i:i + 1], mask)[0].double()
    return {**{g: float(sums[i] / len(items)) for i, g in enumerate(GROUPS)}, "images": len(items)}


# ----------------------------------------------------------------------------- the figure of tools/figures.py --heatmaps

def explain(runs: list[tuple], protocols: list[tuple], num_images: int, path: str | Path,
            device: torch.device | str, batch_size: int = 64, masks: MaskSource | None = None,
            layer: str | None = None, clothes_names: list[str] | None = None) -> dict:
    """tools/figures.py --heatmaps: the Grad-CAM figure of `num_images` test images for each run (checkpoint
    path, model, ModelConfig, its label: visualize.run_label), one row each, and, when the dataset's part
    masks (`masks`: masks.mask_source, the synthetic benchmark's own or --masks DIR) can be read, each run's seek fractions over all query and gallery images of
    `protocols` [(name, query, gallery, mask)]: {"seek": {...}, "seek_compare": {...}} for results.json.
    `clothes_names`: the dataset's label of each test clothes id (captions show the id without)."""
    from loaders import open_rgb
    from visualize import draw_heatmaps, pick_images

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
    if masks is None or not part_masks_available(items, masks.read):
        print("seek fractions need part masks (the synthetic benchmark's masks/ folder, or --masks DIR); not computed")
        return {}
    seek = {}
    for key, (ckpt, model, config, _), label in zip(("seek", "seek_compare"), runs, labels):
        fractions = seek_on_dataset(model, items, config.img_size, (config.pixel_mean, config.pixel_std), device,
                                    batch_size, load_mask=masks.read, layer=layer)
        print(f"seek fractions of {label}: " + "  ".join(f"{g} {fractions[g]:.3f}" for g in GROUPS)
              + f"  ({fractions['images']} images)")
        seek[key] = {"source": str(ckpt), **fractions}
    return seek
