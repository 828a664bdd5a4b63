"""Tests of visualize.py: Grad-CAM heat maps (distributions, the model left alone, a transcription
and hand-made cases, the ViT token grid), seek fractions by hand, run labels, the figures (smoke; the
ranked lists and CMC curve read back as figures). tools/figures.py's CLI: tests/test_figures.py. CPU
(and the CUDA look-alike), tiny CLIP presets."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import clip
import metrics
import models
import utils
import visualize
from fake_cuda import fake_cuda_device  # noqa: F401  (a fixture)
from models import SCIReID
from utils import UserError

EMBED = 64  # tiny joint embedding D
PNG_MAGIC = b"\x89PNG"
PART = {name: i for i, name in enumerate(visualize.PARTS)}


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
        heat = visualize.heatmaps(model, images(3, size))
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
    coarse, fine = visualize.heatmaps(model, x), visualize.heatmaps(model, x, layer="layer1")
    assert fine.shape == coarse.shape and torch.allclose(fine.sum(dim=(1, 2)), torch.ones(2))
    assert not torch.allclose(fine, coarse)
    with pytest.raises(UserError, match="layer1, layer2, layer3, layer4"):
        visualize.heatmaps(model, x, layer="conv1")
    with pytest.raises(UserError, match="ViT"):
        visualize.heatmaps(tiny_vit_reid(), images(1, (128, 64)), layer="layer1")


def test_heatmaps_on_the_cuda_look_alike(fake_cuda_device):
    model = tiny_resnet_reid().to(fake_cuda_device).eval()
    heat = visualize.heatmaps(model, images(2, (64, 32)).to(fake_cuda_device))
    assert heat.device.type == "cpu" and heat.shape == (2, 64, 32)
    torch.testing.assert_close(heat, visualize.heatmaps(tiny_resnet_reid().eval(), images(2, (64, 32))))


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
    torch.testing.assert_close(visualize.heatmaps(toy, x), expected.detach())


def test_heat_lies_where_the_feature_comes_from():
    # one cell of the 4x2 map holds all of the signal: the heat peaks inside that cell's pixels
    x = torch.zeros(1, 3, 16, 8)
    x[0, :, 8:12, 4:8] = 1.0  # cell (2, 1)
    heat = visualize.heatmaps(Toy(torch.ones(4, 2)), x)[0]
    peak = np.unravel_index(int(heat.argmax()), heat.shape)
    assert 8 <= peak[0] < 12 and 4 <= peak[1] < 8
    assert float(heat[6:14, 2:8].sum()) > 0.99  # the cell and its bilinear rim


def test_heatmaps_without_heat_are_uniform():
    heat = visualize.heatmaps(Toy(torch.ones(4, 2)), torch.zeros(1, 3, 16, 8))  # f = 0: no gradient
    torch.testing.assert_close(heat, torch.full((1, 16, 8), 1 / 128))


def test_vit_tokens_go_to_their_grid_cells():
    h, w, b, c = 3, 5, 2, 4
    tokens = torch.zeros(1 + h * w, b, c)  # sequence-first, the class token first
    tokens[0] = -1.0
    for i in range(h):
        for j in range(w):
            tokens[1 + i * w + j] = 100 * i + j
    grid = visualize._as_map(tokens, "vit", (h, w))
    assert grid.shape == (b, c, h, w)
    assert torch.equal(grid[1, 2], torch.tensor([[100. * i + j for j in range(w)] for i in range(h)]))


def test_vit_cells_are_placed_at_their_patch_centres():
    # 16x16 patches every 12 pixels on 128x64: a 10x5 grid; patch (3, 2) covers rows 36..51, columns
    # 24..39, so a one-hot cell peaks at rows 43-44, columns 31-32 (centre 43.5, 31.5)
    vit = SimpleNamespace(patch_size=16, patch_stride=12)
    cam = torch.zeros(1, 10, 5)
    cam[0, 3, 2] = 1.0
    heat = visualize._upsample(cam, (128, 64), vit, "vit")[0]
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
    one = visualize.seek_fractions(heat[:1], masks[:1])
    assert one == {"identity": 0.25, "clothes": 0.5, "background": 0.25}
    both = visualize.seek_fractions(heat, masks)  # the mean of the images' fractions
    assert both == {"identity": 0.125, "clothes": 0.75, "background": 0.125}
    # masks at the image's size (here 2x larger) are resized to the heat's with nearest
    big = masks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).numpy().astype(np.uint8)
    assert visualize.seek_fractions(heat, big) == both


def test_seek_fractions_of_every_part_and_random_maps_sum_to_one():
    for part in visualize.PARTS:
        group = ("identity" if part in visualize.IDENTITY_PARTS else
                 "clothes" if part in visualize.CLOTHES_PARTS else "background")
        got = visualize.seek_fractions(torch.full((1, 4, 2), 1 / 8), torch.full((1, 4, 2), PART[part]))
        assert got[group] == 1.0, part
    g = torch.Generator().manual_seed(0)
    heat = visualize._normalise(torch.rand(5, 32, 16, generator=g))
    masks = torch.randint(0, len(visualize.PARTS), (5, 128, 64), generator=g)
    fractions = visualize._image_fractions(heat, masks)
    torch.testing.assert_close(fractions.sum(1), torch.ones(5, dtype=fractions.dtype))


@pytest.mark.parametrize("heat,masks,message", [
    (torch.ones(1, 2, 2), torch.full((1, 2, 2), 8), "labels outside"),
    (torch.ones(1, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long), "same B"),
    (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), "no heat"),
])
def test_seek_fractions_refuse_bad_input(heat, masks, message):
    with pytest.raises(UserError, match=message):
        visualize.seek_fractions(heat, masks)


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
    got = visualize.seek_on_dataset(model, items, (64, 32), norm, "cpu", batch_size=2, load_mask=masks.__getitem__)
    assert got["images"] == 3 and abs(got["identity"] + got["clothes"] + got["background"] - 1) < 1e-6
    heat = visualize.heatmaps_of_items(model, items, (64, 32), norm, "cpu")
    expected = visualize.seek_fractions(heat, np.stack([masks[it[0]] for it in items]))
    assert all(abs(got[k] - expected[k]) < 1e-6 for k in visualize.GROUPS)
    assert visualize.part_masks_available(items, masks.__getitem__)
    assert not visualize.part_masks_available(items, lambda path: np.load(path + ".missing"))


def test_pick_images_spreads_over_identities():
    items = [(f"q{pid}_{k}", pid, 0, k) for pid in range(10) for k in range(2)]
    assert [it[1] for it in visualize.pick_images(items, 4)] == [0, 3, 6, 9]
    picks = visualize.pick_images(items, 12)
    assert [it[0] for it in picks[:10]] == [f"q{pid}_0" for pid in range(10)] and picks[10][0] == "q0_1"


# ---- figures ---------------------------------------------------------------------------

def test_heatmap_figure_is_written(tmp_path):
    pictures = [Image.new("RGB", (64, 128), (200, 120, 40)), np.zeros((128, 64, 3), np.uint8),
                np.full((128, 64, 3), 0.5)]
    rows = [visualize._normalise(torch.rand(3, 64, 32)), visualize._normalise(torch.rand(3, 64, 32))]
    path = tmp_path / "heat.png"
    visualize.draw_heatmaps(pictures, rows, ["baseline (tiny, --no-sim --no-sse)", "SCI"], path, "Grad-CAM",
                            captions=["id 1", "id 2", "id 3"])
    assert path.read_bytes()[:4] == PNG_MAGIC
    with pytest.raises(UserError, match="do not fit"):
        visualize.draw_heatmaps(pictures, rows, ["one title"], path, "Grad-CAM")


def test_tsne_figure_is_written(tmp_path):
    g = np.random.default_rng(0)
    pids = np.repeat(np.arange(25), 4)
    clothes = np.tile([0, 0, 1, 2], 25) + 3 * pids  # outfits: global labels, 3 per identity
    feats = g.normal(size=(100, 16)) + 3 * np.eye(16)[pids % 16]
    path = tmp_path / "tsne.png"
    visualize.tsne_figure(feats, pids, clothes, path, "t-SNE of tiny features", max_ids=20)
    assert path.read_bytes()[:4] == PNG_MAGIC
    visualize.tsne_figure(feats[:5], pids[:5], clothes[:5], tmp_path / "few.png", "five points")
    assert (tmp_path / "few.png").is_file()
    with pytest.raises(UserError, match="do not match"):
        visualize.tsne_figure(feats, pids[:3], clothes, path, "bad")


# ---- the figures (matplotlib), read back as figures ---------------------------------------------

@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved during the test, kept open for inspection."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    figures, save, close = [], matplotlib.figure.Figure.savefig, plt.close

    def record(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    monkeypatch.setattr(plt, "close", lambda *a: None)
    yield figures
    for fig in figures:
        close(fig)


def frame_colour(ax) -> str:
    from matplotlib.colors import to_hex
    return to_hex(ax.spines["top"].get_edgecolor())


def test_cmc_figure_has_axis_titles_a_title_and_one_line_per_protocol(tmp_path, saved_figures):
    results = {"general": {"cmc": np.linspace(0.5, 1.0, 50), "mAP": 0.4},
               "cc": {"cmc": np.linspace(0.2, 0.9, 50), "mAP": 0.15}}
    visualize.cmc_curve(results, tmp_path / "cmc_curve.png", source="runs/sci (RN50)", reranked=True)
    assert (tmp_path / "cmc_curve.png").read_bytes()[:4] == PNG_MAGIC
    (ax,) = saved_figures[0].axes
    assert ax.get_xlabel() == "rank" and ax.get_ylabel() == "matching rate (%)"
    assert "runs/sci (RN50)" in ax.get_title() and "re-ranked" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["general: Rank-1 50.0%, mAP 40.0%",
                                                                    "cc: Rank-1 20.0%, mAP 15.0%"]
    assert len(ax.get_lines()) == 2 and ax.get_lines()[1].get_ydata()[0] == pytest.approx(20.0)
    # equal curves must not hide each other: each its own dash pattern and marker
    styles = [(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
    assert len({s[0] for s in styles}) == 2 and len({s[1] for s in styles}) == 2


def test_caption_texts():
    # significant digits, never a negative zero: a ranked list of near-duplicates stays readable
    assert [visualize.distance_text(d) for d in (0.000123, 0.4567, -1e-7, -0.0, 0.0, 1.5)] == \
        ["0.000123", "0.457", "0", "0", "0", "1.5"]
    # long names are cut in the middle: the identity at the start and the frame at the end both show
    assert visualize.short_text("0012_c3_s1_000151_01.jpg", 14) == "0012_c…_01.jpg"
    assert visualize.short_text("short.jpg", 14) == "short.jpg"
    # a dataset's own outfit labels (a custom CSV's text) are shown instead of the clothes ids
    labels = {"pids": [3], "camids": [1], "clothes": [0], "clothes_names": ["red_coat"]}
    assert visualize.who_text(labels, 0, ", ") == "id 3, cam 1\nclothes red_coat"
    assert visualize.who_text(labels, 0) == "id 3\ncam 1\nclothes red_coat"


def test_ranked_lists_figure_frames_captions_and_legend(tmp_path, saved_figures):
    """Rows labelled with the query's id/camera/clothes, frames green where protocol_masks says good and
    red otherwise (junk left out), the setting and the source in the title, a legend, grey tiles without paths."""
    gen = np.random.default_rng(0)
    qp, gp = np.array([1, 2, 3]), np.repeat([1, 2, 3, 4], 5)
    qc, gc = np.zeros(3, int), np.tile([0, 1, 2, 3, 4], 4)
    qo, go = np.array([0, 2, 4]), np.tile([0, 0, 1, 1, 1], 4) + 2 * (gp - 1)
    qf, gf = gen.normal(size=(3, 6)).astype(np.float32), gen.normal(size=(20, 6)).astype(np.float32)
    gf[gp == 1] += 3 * qf[0]  # identity 1 is easy to find
    protocol = {"name": "cc", "mask": "cc",
                "query": {"feats": qf, "pids": qp, "camids": qc, "clothes": qo, "paths": None},
                "gallery": {"feats": gf, "pids": gp, "camids": gc, "clothes": go, "paths": None}}
    visualize.ranked_lists(protocol, 2, tmp_path / "ranked_cc.png", top=4, source="features file f.npz")
    fig = saved_figures[0]
    assert "cc protocol" in fig._suptitle.get_text() and "features file f.npz" in fig._suptitle.get_text()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "query" and "correct: same identity, other camera, other clothes" in legend
    assert "grey: image not available" in legend
    axes = fig.axes
    assert len(axes) == 2 * (1 + 4)
    dist = 1 - (qf / np.linalg.norm(qf, axis=1, keepdims=True)) @ (gf / np.linalg.norm(gf, axis=1, keepdims=True)).T
    for row, i in enumerate([0, 2]):  # two queries spread over the three (all have a cc match)
        query_ax, tiles = axes[5 * row], axes[5 * row + 1:5 * row + 5]
        assert query_ax.get_ylabel() == f"query {i + 1}\nid {qp[i]}\ncam 0\nclothes {qo[i]}"  # 1-based, as search_*.png
        assert frame_colour(query_ax) == visualize.FRAME_COLOURS["query"]
        good, junk = metrics.protocol_masks(qp[i], qc[i], qo[i], gp, gc, go, "cc")
        order = [j for j in np.argsort(dist[i], kind="stable") if not junk[j]][:4]
        for r, (ax, j) in enumerate(zip(tiles, order), 1):
            assert ax.get_xlabel() == f"{r}. id {gp[j]}, cam {gc[j]}\nclothes {go[j]}\nd {dist[i, j]:.3g}"
            assert frame_colour(ax) == visualize.FRAME_COLOURS["right" if good[j] else "wrong"]
    assert metrics.rank_metrics(dist, qp, gp, qc, gc, qo, go, "cc")["num_valid_queries"] == 3


# ---- checkpoints for the tools' tests (tests/test_figures.py, test_search.py, test_stops.py) --------

def tiny_checkpoint(path: Path, data_root: str, seed: int = 0, **flags) -> Path:
    """A stage-2 checkpoint as train_stage2.py writes it, of an untrained tiny model: Grad-CAM and
    the figures need a model, not a trained one, so no training is spent here."""
    config = models.ModelConfig(arch="tiny", img_size=[64, 32], num_classes=6, use_sim=not flags.get("no_sim"))
    model = models.build_model(config, torch.zeros(6, EMBED), seed=seed)
    args = {"dataset": "synthetic", "root": data_root, "arch": "tiny", "no_sim": False, "no_sse": False,
            "no_cal": False, **flags}
    utils.save_checkpoint({"kind": "stage2", "epoch": 0, "args": args, "model": model.state_dict(),
                           "config": dataclasses.asdict(config)}, path)
    return path
