"""tools/figures.py: Grad-CAM heat maps (--heatmaps, --compare, --heatmap-layer) with the seek fractions in
results.json, t-SNE (--tsne) from a checkpoint or a features file, the figures' run labels, and the flags
it refuses. CPU (and the CUDA look-alike), untrained tiny checkpoints (tests/test_visualize.py makes them)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import evaluate
import gradcam
import visualize
from fake_cuda import fake_cuda
from test_visualize import PNG_MAGIC, tiny_checkpoint
from tools import figures

COMMON = ["--workers", "0", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(data_root, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    return {"sci": tiny_checkpoint(out / "sci" / "best.pt", data_root),
            "base": tiny_checkpoint(out / "base" / "best.pt", data_root, seed=1, no_sim=True, no_sse=True,
                                    no_cal=True)}


def test_heatmaps_compare_and_tsne(checkpoints, tmp_path, capsys):
    assert figures.main(["--checkpoint", str(checkpoints["sci"]), "--compare", str(checkpoints["base"]),
                         "--heatmaps", "2", "--heatmap-layer", "layer1", "--tsne", *COMMON,
                         "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("heatmaps.png", "tsne.png"):
        assert (tmp_path / name).read_bytes()[:4] == PNG_MAGIC, name
    assert "seek fractions" in out  # the fractions, or the line saying they need part masks
    # a features file has the gallery features and labels that --tsne needs
    feats = tmp_path / "feats.npz"
    assert evaluate.main(["--checkpoint", str(checkpoints["sci"]), "--save-features", str(feats), *COMMON,
                          "--out-dir", str(tmp_path / "e")]) == 0
    assert figures.main(["--features", str(feats), "--tsne", "--out-dir", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "tsne.png").read_bytes()[:4] == PNG_MAGIC


def test_seek_fractions_on_the_synthetic_benchmark_join_results_json(checkpoints, tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"evaluate": {"metrics": {}}, "seek_compare": "stale"}))
    assert figures.main(["--checkpoint", str(checkpoints["sci"]), "--compare", str(checkpoints["base"]),
                         "--heatmaps", "2", *COMMON, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["evaluate"] == {"metrics": {}}  # evaluate.py's record stays
    for key, ckpt in (("seek", "sci"), ("seek_compare", "base")):
        seek = record[key]
        assert seek["source"] == str(checkpoints[ckpt]) and seek["images"] > 0
        assert abs(sum(seek[g] for g in gradcam.GROUPS) - 1) < 1e-6
    assert out.count("seek fractions of") == 2
    # the rows are named by their runs' folders and the flags that differ from the training defaults
    assert "seek fractions of sci (tiny): " in out and "seek fractions of base (tiny; --no-sse --no-sim --no-cal): " in out


def test_heatmaps_on_the_cuda_look_alike(checkpoints, tmp_path):
    with fake_cuda():
        assert figures.main(["--checkpoint", str(checkpoints["sci"]), "--device", "cuda", "--heatmaps", "3",
                             "--tsne", "--workers", "0", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "heatmaps.png").is_file() and (tmp_path / "tsne.png").is_file()


def test_checkpoint_labels_name_the_flags_that_differ_from_the_training_defaults():
    defaults = evaluate._method_defaults()
    assert defaults["no_sim"] is False and defaults["ortho"] == "paper" and defaults["triplet"] is True
    assert not {"output_dir", "seed", "epochs", "eval_every", "stage1"} & set(defaults)  # plumbing and recipe
    # --loss-weight is saved resolved (a dict, not the flag's list): not comparable, left out
    args = {"arch": "RN50", "no_sse": False, "ortho": "gram-schmidt", "triplet": False, "loss_weight": {"id": 1.0},
            "sim_norm": "softmax", "lambda_clo": 0.5, "output_dir": "runs/x", "seed": 3}
    assert evaluate.checkpoint_label("runs/x/last.pt", args) == \
        "x (RN50; --ortho gram-schmidt --lambda-clo 0.5 --no-triplet --sim-norm softmax)"  # in the flags' order
    assert visualize.run_label("best.pt", {"arch": "tiny"}) == "best (tiny)"


@pytest.mark.parametrize("argv,message", [
    ([], "nothing to draw"),
    (["--features", "feats.npz", "--heatmaps", "2"], "need --checkpoint"),
    (["--features", "feats.npz", "--tsne", "--flip"], "need --checkpoint"),
    (["--checkpoint", "best.pt", "--compare", "base.pt"], "pass --heatmaps N too"),
    (["--checkpoint", "best.pt", "--masks", "parsing", "--tsne"], "pass --heatmaps N too"),
    (["--checkpoint", "best.pt", "--heatmaps", "2", "--flip"], "feature extraction of --tsne"),
])
def test_refused_flags(argv, message, capsys):
    assert figures.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_masks_that_are_not_a_folder_are_refused(checkpoints, tmp_path, capsys):
    assert figures.main(["--checkpoint", str(checkpoints["sci"]), "--heatmaps", "2", "--masks",
                         str(tmp_path / "none"), *COMMON, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--masks" in err[0] and "is not a folder" in err[0]


@pytest.mark.parametrize("flag", [["--heatmaps", "2"], ["--compare", "b.pt"], ["--heatmap-layer", "layer1"], ["--tsne"]])
def test_evaluate_no_longer_draws_explanations(flag, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", "best.pt", *flag])
    assert "unrecognized arguments" in capsys.readouterr().err
