"""Tests of visualize.py: run labels, image picks, the figures (smoke; the ranked lists and CMC curve read
back as figures), and the tiny checkpoints the tools' tests use. Grad-CAM and the seek fractions:
tests/test_gradcam.py; tools/figures.py's CLI: tests/test_figures.py. CPU."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metrics
import models
import registry
import utils
import visualize
from utils import UserError

EMBED = 64  # tiny joint embedding D
PNG_MAGIC = b"\x89PNG"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_pick_images_spreads_over_identities():
    items = [(f"q{pid}_{k}", pid, 0, k) for pid in range(10) for k in range(2)]
    assert [it[1] for it in visualize.pick_images(items, 4)] == [0, 3, 6, 9]
    picks = visualize.pick_images(items, 12)
    assert [it[0] for it in picks[:10]] == [f"q{pid}_0" for pid in range(10)] and picks[10][0] == "q0_1"


# ---- figures ---------------------------------------------------------------------------

def test_heatmap_figure_is_written(tmp_path):
    pictures = [Image.new("RGB", (64, 128), (200, 120, 40)), np.zeros((128, 64, 3), np.uint8),
                np.full((128, 64, 3), 0.5)]
    rows = [h / h.sum(dim=(1, 2), keepdim=True) for h in (torch.rand(3, 64, 32), torch.rand(3, 64, 32))]
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
    model = registry.build_model(config, torch.zeros(6, EMBED), seed=seed)
    args = {"dataset": "synthetic", "root": data_root, "arch": "tiny", "no_sim": False, "no_sse": False,
            "no_cal": False, **flags}
    utils.save_checkpoint({"kind": "stage2", "epoch": 0, "args": args, "model": model.state_dict(),
                           "config": dataclasses.asdict(config)}, path)
    return path
