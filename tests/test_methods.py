"""The method registry (registry.METHODS): a method without stage 1 trains, evaluates and resumes with
the existing scripts; a loss term with a parameter is optimised and checkpointed; a method that asks
for part masks gets them with its batches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import evaluate
import losses
import models
import registry
import train_stage2
import training
import utils

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--dataset", "synthetic", "--arch", "tiny", "--img-size", "64", "32", "--device", "cpu",
          "--workers", "0", "--seed", "5", "--log-every", "1000", "--epochs", "3", "--batch-size", "16",
          "--num-instances", "4", "--warmup-epochs", "1", "--milestones", "2", "--eval-every", "3"]


def run(data_root: str, out: Path, *extra: str) -> int:
    return train_stage2.main(COMMON + ["--root", data_root, "--output-dir", str(out)] + list(extra))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def stop_after_first_epoch(monkeypatch) -> None:
    """Run.stopped answers yes after the first epoch, as a SIGTERM between epochs would."""
    original = training.Run.stopped

    def stopped(self):
        original(self)
        return True
    monkeypatch.setattr(training.Run, "stopped", stopped)


def test_every_registered_method_is_complete():
    """What the scripts and tools read of a method (registry.Method's docstring)."""
    for name, method in registry.METHODS.items():
        assert "id" in method.loss.NAMES and method.summary, name
        arch = "tiny" if "tiny" in method.archs else method.archs[0]  # CSSC: ResNet-50, whose stripes need 128 rows
        size = [64, 32] if arch == "tiny" else [128, 16]
        config = models.ModelConfig(arch=arch, img_size=size, num_classes=4, method=name)
        bank = torch.randn(4, 64) if method.needs_stage1 else None
        model = registry.build_model(config, bank)
        assert isinstance(model.visual, nn.Module) and model.feature_dim > 0, name  # Grad-CAM, export
        assert model.eval()(torch.zeros(2, 3, *size)).shape == (2, model.feature_dim), name
        outputs = model.train()(torch.randn(4, 3, *size))
        assert {"logits", "bn_feat", "triplet_feats"} <= set(outputs), name
        assert isinstance(method.model.FLAGS, tuple) and isinstance(method.loss.FLAGS, tuple), name


def test_method_without_stage1_trains_evaluates_and_resumes(data_root, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run(data_root, full, "--method", "bnneck") == 0
    ckpt = load(full / "last.pt")
    assert ckpt["config"]["method"] == "bnneck" and "text_bank" not in ckpt["model"]
    assert not (full / "stage1.pt").exists()
    args = json.loads((full / "args_stage2.json").read_text())
    assert args["stage1"] is None and args["n_ctx"] is None  # no prompt properties without stage 1
    records = [json.loads(line) for line in (full / "metrics_stage2.jsonl").read_text().splitlines()]
    assert {"id", "tri"} <= set(records[0]) and "i2t" not in records[0] and "cal" not in records[0]

    # evaluate.py rebuilds it from the checkpoint alone and reproduces the run's final numbers
    assert evaluate.main(["--checkpoint", str(full / "last.pt"), "--workers", "0", "--device", "cpu"]) == 0
    evaluated = json.loads((full / "results.json").read_text())
    assert evaluated["evaluate"]["metrics"] == evaluated["metrics"]

    # stopped after epoch 1 and resumed: the same weights as the uninterrupted run
    with monkeypatch.context() as m:
        stop_after_first_epoch(m)
        assert run(data_root, cut, "--method", "bnneck") == 130
    assert load(cut / "last.pt")["epoch"] == 1
    assert train_stage2.main(["--output-dir", str(cut), "--resume"]) == 0
    resumed = load(cut / "last.pt")["model"]
    assert all(torch.equal(resumed[k], v) for k, v in ckpt["model"].items())


def test_method_flags_are_checked(data_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_stage2.parse_args(["--method", "nosuch"])
    assert exc.value.code == 2
    assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--output-dir", str(tmp_path),
                                                      "--method", "bnneck", "--stage1", "x.pt"]) == 2
    assert "trains without stage 1; drop --stage1" in capsys.readouterr().err
    assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--output-dir", str(tmp_path),
                                                      "--method", "bnneck", "--loss-weight", "i2t=2"]) == 2
    assert "TERM one of id, tri" in capsys.readouterr().err
    assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--output-dir", str(tmp_path),
                                                      "--method", "bnneck", "--masks", str(tmp_path)]) == 2
    assert "does not train on part masks" in capsys.readouterr().err
    assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--output-dir", str(tmp_path),
                                                      "--method", "bnneck", "--no-sim", "--cal-start", "2"]) == 2
    assert "--cal-start, --no-sim: method bnneck does not read them" in capsys.readouterr().err
    assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--output-dir", str(tmp_path),
                                                      "--method", "bnneck", "--no-triplet", "--loss-weight", "tri=2"]) == 2
    assert "--loss-weight tri: this run has no such term (its terms: id;" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--no-sse", "--loss-weight", "sim=2"], ["--loss-weight", "clo_t2i=0.5"]])
def test_stage1_refuses_a_weight_for_a_term_it_does_not_compute(argv, capsys):
    import train_stage1
    with pytest.raises(SystemExit) as exc:
        train_stage1.parse_args(argv)
    assert exc.value.code == 2 and "no such term" in capsys.readouterr().err
    assert train_stage1.parse_args(["--loss-weight", "t2i=0.5"]).loss_weight == {"t2i": 0.5}


class ScaledIdentityLoss(losses.IdentityLoss):
    """A loss term with a learnable parameter: the identity logits times a learnt scale."""

    def __init__(self, triplet: bool = True):
        super().__init__(triplet)
        self.scale = nn.Parameter(torch.ones(()))

    def id_term(self, outputs: dict, pids: torch.Tensor) -> torch.Tensor:
        return sum(self.id_loss(logits * self.scale, pids) for logits in outputs["logits"])


def test_loss_parameters_are_trained_checkpointed_and_resumed(data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "scaled", registry.Method(models.BNNeckReID, ScaledIdentityLoss,
                                                                needs_stage1=False, summary="test"))
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run(data_root, full, "--method", "scaled") == 0
    scale = load(full / "last.pt")["loss"]["scale"]
    assert scale.item() != 1.0  # the main optimizer stepped it
    with monkeypatch.context() as m:
        stop_after_first_epoch(m)
        assert run(data_root, cut, "--method", "scaled") == 130
    assert train_stage2.main(["--output-dir", str(cut), "--resume"]) == 0
    assert torch.equal(load(cut / "last.pt")["loss"]["scale"], scale)


class MaskedReID(models.BNNeckReID):
    """Records the part masks its forward receives."""
    seen: list = []

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        if self.training:
            MaskedReID.seen.append((images.shape, mask))
        return super().forward(images)


def test_a_method_with_extras_gets_part_masks(data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "masked", registry.Method(MaskedReID, losses.IdentityLoss, needs_stage1=False,
                                                                summary="test", extras=("mask",)))
    MaskedReID.seen.clear()
    assert run(data_root, tmp_path, "--method", "masked", "--epochs", "1", "--eval-every", "1") == 0
    assert MaskedReID.seen
    for shape, mask in MaskedReID.seen:
        assert mask is not None and mask.dtype == torch.long and tuple(mask.shape) == (shape[0], *shape[2:])
    assert any(len(mask.unique()) > 2 for _, mask in MaskedReID.seen)  # parts, not an empty mask


def test_clipreid_is_sci_without_sse_sim_and_cal(data_root, tmp_path, capsys):
    """--method clipreid on a --no-sse stage 1 trains exactly what --no-sim --no-cal trains, names
    itself in its checkpoint, and refuses the flags it fixes and a stage 1 with SSE."""
    import train_stage1

    s1 = ["--dataset", "synthetic", "--root", data_root, "--arch", "tiny", "--img-size", "64", "32", "--device", "cpu",
          "--workers", "0", "--seed", "5", "--log-every", "1000", "--epochs", "1", "--batch-size", "16"]
    for name, flags in (("plain", ["--no-sse"]), ("sse", [])):
        assert train_stage1.main(s1 + ["--output-dir", str(tmp_path / name)] + flags) == 0
    short = ["--epochs", "2", "--eval-every", "2", "--milestones", "1"]
    assert run(data_root, tmp_path / "flags", "--stage1", str(tmp_path / "plain" / "stage1.pt"), "--no-sim",
               "--no-cal", *short) == 0
    assert run(data_root, tmp_path / "named", "--stage1", str(tmp_path / "plain" / "stage1.pt"), "--method",
               "clipreid", *short) == 0
    flags, named = load(tmp_path / "flags" / "last.pt"), load(tmp_path / "named" / "last.pt")
    assert named["config"]["method"] == "clipreid" and named["config"]["use_sim"] is False
    assert named["model"].keys() == flags["model"].keys()
    assert all(torch.equal(named["model"][k], v) for k, v in flags["model"].items())
    records = [json.loads(line) for line in (tmp_path / "named" / "metrics_stage2.jsonl").read_text().splitlines()]
    assert {"id", "i2t", "tri"} <= set(records[-1]) and "cal" not in records[-1]
    for extra, message in ((["--stage1", str(tmp_path / "sse" / "stage1.pt")], "made with --no-sse, and"),
                           (["--stage1", str(tmp_path / "plain" / "stage1.pt"), "--no-cal"], "--no-cal: method clipreid")):
        assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--output-dir", str(tmp_path / "x"),
                                                          "--method", "clipreid", *extra]) == 2
        assert message in capsys.readouterr().err
