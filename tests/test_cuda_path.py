"""The scripts' CUDA path, end to end on the CUDA look-alike device (tests/fake_cuda.py): stage 1,
stage 2 with CAL, the triplet term, --flip-test and float16 AMP (the CUDA default), evaluate.py with --visualize and
--save-features, and --resume, all with --device cuda on a machine without a GPU. Each device
bug these found has a test here that fails without its fix."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import models
import train_stage1
import train_stage2
from conftest import stop_at_epoch
from fake_cuda import fake_cuda, fake_cuda_device  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
CUDA = ["--dataset", "synthetic", "--arch", "tiny", "--img-size", "64", "32", "--device", "cuda", "--seed", "5",
        "--log-every", "1000"]
STAGE1 = ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "16"]
STAGE2 = ["--epochs", "3", "--batch-size", "16", "--num-instances", "4", "--warmup-epochs", "1", "--milestones", "2",
          "--cal-start", "1", "--eval-every", "3"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def cuda_runs(data_root, tmp_path_factory) -> dict[str, Path]:
    """Stage 1 in float32 (its banks are compared with a CPU run's) and stage 2 with the CUDA defaults
    (float16 AMP, triplet, CAL from epoch 2) and --flip-test, 2 DataLoader workers."""
    out = tmp_path_factory.mktemp("cuda")
    with fake_cuda():
        assert train_stage1.main(CUDA + ["--root", data_root, "--output-dir", str(out), "--workers", "2",
                                         "--no-amp"] + STAGE1) == 0
        assert train_stage2.main(CUDA + ["--root", data_root, "--output-dir", str(out), "--workers", "2", "--triplet",
                                         "--flip-test", "--eval-before"] + STAGE2) == 0
    return {"out": out}


def test_prompt_learner_on_a_cuda_model(fake_cuda_device):
    """The first bug: CPU token ids reached the CUDA token embedding ("Expected all tensors to be
    on the same device"), so `python train_stage1.py` stopped at once on a GPU."""
    clip_model = models.build_clip("tiny", "none", (64, 32)).to(fake_cuda_device)
    prompts = models.SemanticPrompts(clip_model, num_ids=3, n_ctx=2).to(fake_cuda_device)
    f_id, f_clo, f_ort = prompts(torch.tensor([0, 2, 2], device=fake_cuda_device))
    assert f_ort.device == fake_cuda_device and f_ort.shape == (3, clip_model.text_projection.shape[1])


def test_stages_run_on_cuda_and_match_cpu(cuda_runs, data_root, tmp_path):
    out = cuda_runs["out"]
    ckpt = load(out / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["args"]["device"] == "cuda" and ckpt["args"]["deterministic"] is False
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())  # loadable without a GPU
    history = [json.loads(line) for line in (out / "metrics_stage2.jsonl").read_text().splitlines()]
    assert "cal" in history[1] and "tri" in history[0]
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == set(results["untrained"]) == {"general", "cc", "sc"}
    # the look-alike runs the CPU kernels: stage 1 on "cuda" gives the CPU run's banks exactly
    cpu = [a if a != "cuda" else "cpu" for a in CUDA]
    assert train_stage1.main(cpu + ["--root", data_root, "--output-dir", str(tmp_path), "--workers", "0"] + STAGE1) == 0
    for name, bank in load(out / "stage1.pt")["banks"].items():
        assert torch.equal(bank, load(tmp_path / "stage1.pt")["banks"][name]), name


def test_evaluate_on_cuda_with_pictures_and_features(cuda_runs, tmp_path):
    out = cuda_runs["out"]
    features = tmp_path / "features.npz"
    with fake_cuda():
        assert evaluate.main(["--checkpoint", str(out / "last.pt"), "--device", "cuda", "--workers", "2",
                              "--visualize", "3", "--save-features", str(features), "--out-dir", str(tmp_path),
                              "--flip"]) == 0
        assert evaluate.main(["--features", str(features), "--device", "cuda", "--out-dir", str(tmp_path / "f"),
                              "--visualize", "2"]) == 0
    for name in ("ranked_general.png", "ranked_cc.png", "ranked_sc.png", "cmc_curve.png"):
        assert (tmp_path / name).is_file(), name
    record = json.loads((tmp_path / "results.json").read_text())["evaluate"]["metrics"]
    assert record == json.loads((out / "results.json").read_text())["metrics"]  # --flip as in training
    assert json.loads((tmp_path / "f" / "results.json").read_text())["evaluate"]["metrics"] == record
    with np.load(features) as arrays:
        assert arrays["cc_query_feats"].dtype == np.float32


def test_stage2_resume_on_cuda_is_exact(cuda_runs, data_root, tmp_path, monkeypatch):
    """Stopped by a signal in epoch 3, resumed with --output-dir --resume alone: the uninterrupted run."""
    out = cuda_runs["out"]
    argv = CUDA + ["--root", data_root, "--stage1", str(out / "stage1.pt"), "--output-dir", str(tmp_path),
                   "--workers", "2", "--triplet", "--flip-test", "--eval-before"] + STAGE2
    with fake_cuda():
        stop_at_epoch(monkeypatch, 3)
        assert train_stage2.main(argv) == 130
        monkeypatch.undo()
        assert train_stage2.main(["--output-dir", str(tmp_path), "--resume"]) == 0
    full, resumed = load(out / "last.pt")["model"], load(tmp_path / "last.pt")["model"]
    for key, value in full.items():
        assert torch.equal(value, resumed[key]), key


def test_float16_amp_with_gradient_scaler_is_the_cuda_default(cuda_runs, data_root, tmp_path):
    """On CUDA both stages train under float16 autocast with a GradScaler unless --no-amp, as
    CLIP-ReID does; on CPU the default stays float32."""
    out = cuda_runs["out"]
    with fake_cuda():
        assert train_stage1.main(CUDA + ["--root", data_root, "--output-dir", str(tmp_path), "--workers", "0"]
                                 + STAGE1) == 0
    for name in ("stage1_last.pt", "last.pt"):
        state = load((tmp_path if name == "stage1_last.pt" else out) / name)
        assert state["args"]["amp"] is True and state["args"]["amp_dtype"] == "float16", name
        assert state["scaler"]["scale"] > 0, name
    assert torch.isfinite(load(out / "last.pt")["model"]["neck_proj.classifier.weight"]).all()
    assert load(out / "stage1_last.pt")["args"]["amp"] is False  # --no-amp
    cpu = [a if a != "cuda" else "cpu" for a in CUDA]
    assert train_stage1.main(cpu + ["--root", data_root, "--output-dir", str(tmp_path / "cpu"), "--workers", "0"]
                             + STAGE1) == 0
    state = load(tmp_path / "cpu" / "stage1_last.pt")
    assert state["args"]["amp"] is False and state["scaler"] == {}


def test_a_script_as_a_user_runs_it(cuda_runs, tmp_path):
    """`python tests/fake_cuda.py evaluate.py --device cuda ...`: a real process, as a user types it."""
    proc = subprocess.run([sys.executable, "tests/fake_cuda.py", "evaluate.py", "--checkpoint",
                           str(cuda_runs["out"] / "last.pt"), "--device", "cuda", "--workers", "2",
                           "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and (tmp_path / "results.json").is_file()
