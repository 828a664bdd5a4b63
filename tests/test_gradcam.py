"""Tests of gradcam.py: Grad-CAM heat maps (distributions, the model left alone, a transcription and
hand-made cases, the ViT token grid) and the seek fractions (by hand, over a folder, over a human parser's
masks through masks.MaskSource). The figures: tests/test_visualize.py; tools/figures.py --heatmaps:
tests/test_figures.py. CPU (and the CUDA look-alike), tiny CLIP presets."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import clip
import gradcam
import masks
from fake_cuda import fake_cuda_device  # noqa: F401  (a fixture)
from models import SCIReID
from utils import UserError

EMBED = 64  # tiny joint embedding D
PART = {name: i for i, name in enumerate(gradcam.PARTS)}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_resnet_reid(img=(64, 32)) -> SCIReID:
    clip_model = clip.build_model(clip.tiny_state_dict("resnet", seed=0), last_stride=1, input_size=img)
    return SCIReID(clip_model, 4, torch.randn(4, EMBED, generator=torch.Generator().manual_seed(0)))


def tiny_vit_reid(img=(128, 64), stride=None) -> SCIReID:
    # as tests/test_models.py builds it: the tiny ViT (16x16 patches) at 128x64, an 8x4 grid
    clip_model = clip.build_model(clip.tiny_state_dict("vit", seed=0), input_size=img, patch_stride=stride)
    return SCIReID(clip_model, 4, torch.randn(4, EMBED, generator=torch.Generator().manual_seed(0)))


def images(b, size, seed=0):
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed))


# ---- Grad-CAM --------------------------------------------------------------------------

@pytest.mark.parametrize("make,size", [(tiny_resnet_reid, (64, 32)), (tiny_vit_reid, (128, 64)),
                                       (lambda: tiny_vit_reid(stride=12), (128, 64))],
                         ids=["resnet", "vit", "vit-overlapping-patches"])
def test_heatmaps_are_distributions_and_leave_the_model_alone(make, size):
    model = make().train()
    model.visual.conv1.requires_grad_(False)  # a frozen part must stay frozen, the rest trainable
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():  # also under a caller's no_grad
        heat = gradcam.heatmaps(model, images(3, size))
    assert heat.shape == (3, *size) and heat.dtype == torch.float32 and heat.device.type == "cpu"
    assert bool((heat >= 0).all())
    torch.testing.assert_close(heat.sum(dim=(1, 2)), torch.ones(3), atol=1e-5, rtol=0)
    assert heat.std(dim=(1, 2)).min() > 0  # not the uniform fallback
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_an_earlier_resnet_layer_gives_a_finer_map():
    """--heatmap-layer: layer1's 16x8 map at 64x32 is another map than layer4's 4x2, still a
    distribution; names that are not a ResNet stage, or any layer of a ViT, are refused."""
    model, x = tiny_resnet_reid(), images(2, (64, 32))
    coarse, fine = gradcam.heatmaps(model, x), gradcam.heatmaps(model, x, layer="layer1")
    assert fine.shape == coarse.shape and torch.allclose(fine.sum(dim=(1, 2)), torch.ones(2))
    assert not torch.allclose(fine, coarse)
    with pytest.raises(UserError, match="layer1, layer2, layer3, layer4"):
        gradcam.heatmaps(model, x, layer="conv1")
    with pytest.raises(UserError, match="ViT"):
        gradcam.heatmaps(tiny_vit_reid(), images(1, (128, 64)), layer="layer1")


def test_heatmaps_on_the_cuda_look_alike(fake_cuda_device):
    model = tiny_resnet_reid().to(fake_cuda_device).eval()
    heat = gradcam.heatmaps(model, images(2, (64, 32)).to(fake_cuda_device))
    assert heat.device.type == "cpu" and heat.shape == (2, 64, 32)
    torch.testing.assert_close(heat, gradcam.heatmaps(tiny_resnet_reid().eval(), images(2, (64, 32))))


class ToyVisual(nn.Module):
    """A 'ResNet' whose layer4 map is the image average-pooled 4x4: A = avgpool(x), [B, 3, h, w]."""

    def __init__(self):
        super().__init__()
        self.layer4 = nn.AvgPool2d(4)


class Toy(nn.Module):
    """Test feature f = W sum_ij S_ij A[:, :, i, j]: the gradient of ||f||^2 / 2 w.r.t. A_c(i, j)
    is (W^T f)_c S_ij, so Grad-CAM's weights are (W^T f)_c mean(S)."""

    def __init__(self, spatial: torch.Tensor, dim: int = 5):
        super().__init__()
        self.visual = ToyVisual()
        self.proj = nn.Linear(3, dim, bias=False)
        self.register_buffer("spatial", spatial)

    def forward(self, x):
        a = self.visual.layer4(x)
        return self.proj((a * self.spatial).sum(dim=(2, 3)))


def test_gradcam_equals_its_transcription():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 8)  # a 4x2 map
    spatial = torch.rand(4, 2)
    toy = Toy(spatial)
    a = F.avg_pool2d(x, 4)                                               # [B, 3, 4, 2]
    f = toy.proj((a * spatial).sum(dim=(2, 3)))                          # [B, 5]
    weights = (f @ toy.proj.weight) * spatial.mean()                     # [B, 3] = mean_ij of dT/dA
    cam = F.relu((weights[:, :, None, None] * a).sum(1))                 # [B, 4, 2]
    heat = F.interpolate(cam[:, None], size=(16, 8), mode="bilinear", align_corners=False)[:, 0]
    expected = heat / heat.sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(gradcam.heatmaps(toy, x), expected.detach())


def test_heat_lies_where_the_feature_comes_from():
    # one cell of the 4x2 map holds all of the signal: the heat peaks inside that cell's pixels
    x = torch.zeros(1, 3, 16, 8)
    x[0, :, 8:12, 4:8] = 1.0  # cell (2, 1)
    heat = gradcam.heatmaps(Toy(torch.ones(4, 2)), x)[0]
    peak = np.unravel_index(int(heat.argmax()), heat.shape)
    assert 8 <= peak[0] < 12 and 4 <= peak[1] < 8
    assert float(heat[6:14, 2:8].sum()) > 0.99  # the cell and its bilinear rim


def test_heatmaps_without_heat_are_uniform():
    heat = gradcam.heatmaps(Toy(torch.ones(4, 2)), torch.zeros(1, 3, 16, 8))  # f = 0: no gradient
    torch.testing.assert_close(heat, torch.full((1, 16, 8), 1 / 128))


def test_vit_tokens_go_to_their_grid_cells():
    h, w, b, c = 3, 5, 2, 4
    tokens = torch.zeros(1 + h * w, b, c)  # sequence-first, the class token first
    tokens[0] = -1.0
    for i in range(h):
        for j in range(w):
            tokens[1 + i * w + j] = 100 * i + j
    grid = gradcam._as_map(tokens, "vit", (h, w))
    assert grid.shape == (b, c, h, w)
    assert torch.equal(grid[1, 2], torch.tensor([[100. * i + j for j in range(w)] for i in range(h)]))


def test_vit_cells_are_placed_at_their_patch_centres():
    # 16x16 patches every 12 pixels on 128x64: a 10x5 grid; patch (3, 2) covers rows 36..51, columns
    # 24..39, so a one-hot cell peaks at rows 43-44, columns 31-32 (centre 43.5, 31.5)
    vit = SimpleNamespace(patch_size=16, patch_stride=12)
    cam = torch.zeros(1, 10, 5)
    cam[0, 3, 2] = 1.0
    heat = gradcam._upsample(cam, (128, 64), vit, "vit")[0]
    assert heat.shape == (128, 64)
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(64.0), indexing="ij")
    centre = (float((heat * ys).sum() / heat.sum()), float((heat * xs).sum() / heat.sum()))
    assert centre == pytest.approx((43.5, 31.5), abs=1e-4)
    peak = np.unravel_index(int(heat.argmax()), heat.shape)
    assert peak[0] in (43, 44) and peak[1] in (31, 32)


# ---- seek fractions --------------------------------------------------------------------

def test_seek_fractions_by_hand():
    heat = torch.tensor([[[0.5, 0.25], [0.25, 0.0]],
                         [[0.0, 0.0], [0.0, 1.0]]])
    masks = torch.tensor([[[PART["top"], PART["hair"]], [PART["background"], PART["skin"]]],
                          [[PART["top"], PART["hair"]], [PART["background"], PART["bottom"]]]])
    one = gradcam.seek_fractions(heat[:1], masks[:1])
    assert one == {"identity": 0.25, "clothes": 0.5, "background": 0.25}
    both = gradcam.seek_fractions(heat, masks)  # the mean of the images' fractions
    assert both == {"identity": 0.125, "clothes": 0.75, "background": 0.125}
    # masks at the image's size (here 2x larger) are resized to the heat's with nearest
    big = masks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).numpy().astype(np.uint8)
    assert gradcam.seek_fractions(heat, big) == both


def test_seek_fractions_of_every_part_and_random_maps_sum_to_one():
    for part in gradcam.PARTS:
        group = ("identity" if part in gradcam.IDENTITY_PARTS else
                 "clothes" if part in gradcam.CLOTHES_PARTS else "background")
        got = gradcam.seek_fractions(torch.full((1, 4, 2), 1 / 8), torch.full((1, 4, 2), PART[part]))
        assert got[group] == 1.0, part
    g = torch.Generator().manual_seed(0)
    heat = gradcam._normalise(torch.rand(5, 32, 16, generator=g))
    masks = torch.randint(0, len(gradcam.PARTS), (5, 128, 64), generator=g)
    fractions = gradcam._image_fractions(heat, masks)
    torch.testing.assert_close(fractions.sum(1), torch.ones(5, dtype=fractions.dtype))


@pytest.mark.parametrize("heat,masks,message", [
    (torch.ones(1, 2, 2), torch.full((1, 2, 2), 8), "labels outside"),
    (torch.ones(1, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long), "same B"),
    (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), "no heat"),
])
def test_seek_fractions_refuse_bad_input(heat, masks, message):
    with pytest.raises(UserError, match=message):
        gradcam.seek_fractions(heat, masks)


def test_seek_on_a_hand_made_folder(tmp_path):
    # three 128x64 images, heads of hair in the top quarter, a top below, background elsewhere
    g = np.random.default_rng(0)
    items, masks = [], {}
    for i in range(3):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(g.integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(path)
        mask = np.zeros((128, 64), dtype=np.uint8)
        mask[:32, 16:48], mask[32:96, 8:56] = PART["hair"], PART["top"]
        items.append((path, i, 0, 0))
        masks[path] = mask
    model, norm = tiny_resnet_reid().eval(), (clip.MEAN, clip.STD)
    got = gradcam.seek_on_dataset(model, items, (64, 32), norm, "cpu", batch_size=2, load_mask=masks.__getitem__)
    assert got["images"] == 3 and abs(got["identity"] + got["clothes"] + got["background"] - 1) < 1e-6
    heat = gradcam.heatmaps_of_items(model, items, (64, 32), norm, "cpu")
    expected = gradcam.seek_fractions(heat, np.stack([masks[it[0]] for it in items]))
    assert all(abs(got[k] - expected[k]) < 1e-6 for k in gradcam.GROUPS)
    assert gradcam.part_masks_available(items, masks.__getitem__)
    assert not gradcam.part_masks_available(items, lambda path: np.load(path + ".missing"))


def test_seek_reads_a_human_parsers_masks_through_a_mask_source(tmp_path):
    """The seek fractions over a real dataset's part masks (masks.MaskSource, --masks DIR): SCHP's LIP labels
    become PARTS, so a face (LIP 13) counts as identity and upper-clothes (LIP 5) as clothes."""
    data, parsing = tmp_path / "data", tmp_path / "parsing"
    data.mkdir(), parsing.mkdir()
    items = []
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        lip = np.zeros((128, 64), dtype=np.uint8)
        lip[:32], lip[32:96] = 13, 5  # face, upper-clothes
        Image.fromarray(lip, mode="L").save(parsing / f"{i}.png")
        items.append((str(data / f"{i}.png"), i, 0, 0))
    source = masks.MaskSource("schp", str(data), str(parsing))
    model, norm = tiny_resnet_reid().eval(), (clip.MEAN, clip.STD)
    got = gradcam.seek_on_dataset(model, items, (64, 32), norm, "cpu", load_mask=source.read)
    heat = gradcam.heatmaps_of_items(model, items, (64, 32), norm, "cpu")
    parts = np.zeros((2, 128, 64), dtype=np.int64)
    parts[:, :32], parts[:, 32:96] = PART["skin"], PART["top"]
    expected = gradcam.seek_fractions(heat, parts)
    assert all(abs(got[k] - expected[k]) < 1e-6 for k in gradcam.GROUPS)
    assert gradcam.part_masks_available(items, source.read)
    assert not gradcam.part_masks_available([(str(tmp_path / "elsewhere.png"), 0, 0, 0)], source.read)
