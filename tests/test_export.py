"""tools/export.py --out / --onnx (export_inference, export_onnx): the exported inference
path gives the checkpoint model's features for any batch size; bad combinations are refused. CPU,
tiny CLIP presets, untrained (randomly perturbed) checkpoints."""
from __future__ import annotations

import dataclasses
import errno
import importlib.util
import os
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import evaluate
import models
import registry
import utils
from tools import export
from fake_cuda import fake_cuda_device  # noqa: F401  (a fixture)

IMG = [64, 32]
NUM_IDS = 6
EMBED = 64  # the tiny presets' joint embedding D
HAS_ONNX = importlib.util.find_spec("onnx") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_checkpoint(path: Path, arch: str) -> Path:
    """A stage-2 checkpoint as train_stage2.py writes it, of an untrained tiny model whose weights and
    BN statistics are perturbed, so that SIM (zero-initialised alpha and W) and the necks all act."""
    config = models.ModelConfig(arch=arch, img_size=IMG, num_classes=NUM_IDS, neck_feat="after")
    generator = torch.Generator().manual_seed(0)
    model = registry.build_model(config, torch.randn(NUM_IDS, EMBED, generator=generator))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = 0.05 * torch.randn(t.shape, generator=generator)
                t.copy_(t.abs() + noise.abs() if name.endswith("running_var") else t + noise)
    args = {"dataset": "synthetic", "root": "unused", "arch": arch}
    utils.save_checkpoint({"kind": "stage2", "epoch": 0, "args": args, "model": model.state_dict(),
                           "config": dataclasses.asdict(config)}, path)
    return path


@pytest.mark.parametrize("arch", ["tiny", "tiny-vit"])
def test_export_gives_the_checkpoint_models_features(arch, tmp_path, capsys, caplog):
    ckpt = tiny_checkpoint(tmp_path / "best.pt", arch)
    program_path, onnx_path = tmp_path / "deploy" / "model.pt2", tmp_path / "deploy" / "model.onnx"
    argv = ["--checkpoint", str(ckpt), "--out", str(program_path)] + (["--onnx"] if HAS_ONNX else [])
    assert export.main(argv) == 0
    out = capsys.readouterr()
    assert "wrote" in out.out
    # torch.export.save warns of a file not ending in .pt2 (write_atomic's temporary file keeps the suffix)
    assert "Expect archive" not in caplog.text + out.err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert sorted(p.name for p in program_path.parent.iterdir()) == sorted(["model.pt2"] + (["model.onnx"] if HAS_ONNX else []))
    model, _, config = registry.load_checkpoint_model(ckpt)
    extra = {"config.json": ""}
    program = torch.export.load(program_path, extra_files=extra).module()
    assert json.loads(extra["config.json"])["img_size"] == IMG
    assert model.sim is not None and model.sim.alpha.abs().min() > 0  # SIM takes part in the feature

    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3, 5):  # the batch dimension is dynamic
        images = torch.randn(batch, 3, *IMG, generator=generator)
        # the features evaluate.py extracts (and ranks after L2 normalisation)
        loader = DataLoader(TensorDataset(images, *[torch.zeros(batch, dtype=torch.long)] * 3), batch_size=batch)
        expected = evaluate.extract_features(model, loader, "cpu")[0]
        with torch.no_grad():
            got = program(images)
        assert got.shape == (batch, model.feature_dim) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        if HAS_ONNX:
            from onnx.reference import ReferenceEvaluator  # onnx's own runtime: no onnxruntime needed

            onnx_out = ReferenceEvaluator(str(onnx_path)).run(None, {"images": images.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(onnx_out), expected, atol=1e-5, rtol=0)
    assert onnx_path.is_file() == HAS_ONNX


def test_export_on_cuda_matches_cpu_features(tmp_path, fake_cuda_device):
    """With CUDA visible (exported on the CPU all the same): tracing failed under the look-alike GPU
    ("Cannot insert a Tensor that requires grad as a constant") without no_grad."""
    ckpt = tiny_checkpoint(tmp_path / "best.pt", "tiny")
    program_path, onnx_path = tmp_path / "model.pt2", tmp_path / "model.onnx"
    argv = ["--checkpoint", str(ckpt), "--out", str(program_path)] + \
        (["--onnx"] if HAS_ONNX else [])
    assert export.main(argv) == 0
    model, _, _ = registry.load_checkpoint_model(ckpt, "cpu")
    images = torch.randn(3, 3, *IMG, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(images, *[torch.zeros(3, dtype=torch.long)] * 3), batch_size=3)
    expected = evaluate.extract_features(model, loader, "cpu")[0]
    program = torch.export.load(program_path).module()
    with torch.no_grad():
        got = program(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if HAS_ONNX:
        from onnx.reference import ReferenceEvaluator

        onnx_out = ReferenceEvaluator(str(onnx_path)).run(None, {"images": images.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(onnx_out), expected, atol=1e-5, rtol=0)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("flags", [["--features", "feats.npz"], ["--profile"], ["--flip"], ["--setting", "cc"]])
def test_export_takes_no_evaluation_flags(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export.main(flags + ["--out", str(tmp_path / "model.pt2")])
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert not (tmp_path / "model.pt2").exists()


def test_export_refuses_a_missing_onnx(tmp_path, capsys, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "best.pt", "tiny")
    program_path = tmp_path / "model.pt2"
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the package were not installed
    assert export.main(["--checkpoint", str(ckpt), "--out", str(program_path), "--onnx"]) == 2
    assert "pip install onnx" in one_error_line(capsys)
    assert not program_path.exists()  # refused before anything was written
    with pytest.raises(SystemExit) as exc:
        export.parse_args(["--onnx"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def test_a_failed_export_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    """The write fails midway (a full disk after some bytes): the previous program survives byte for
    byte, no temporary file is left, and the error is one line."""
    ckpt = tiny_checkpoint(tmp_path / "best.pt", "tiny")
    program_path = tmp_path / "deploy" / "model.pt2"
    argv = ["--checkpoint", str(ckpt), "--out", str(program_path)]
    assert export.main(argv) == 0
    before = program_path.read_bytes()

    def save_half(program, f, extra_files=None):
        with open(f, "wb") as out:
            out.write(before[:len(before) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch.export, "save", save_half)
    capsys.readouterr()
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: could not write {program_path}: no space left on device")
    assert err.rstrip().endswith(f"the existing {program_path} is unchanged")
    assert program_path.read_bytes() == before and os.listdir(program_path.parent) == ["model.pt2"]
