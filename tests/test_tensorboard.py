"""--tensorboard in both training scripts (utils.TensorBoard): the event files hold each epoch's
metrics_stage*.jsonl entries (loss terms, learning rate, images/s; stage 2's evaluation metrics), and
a missing tensorboard package stops the run at start-up. 1-epoch runs on the small synthetic set."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_stage1
import train_stage2
import utils
from test_train import COMMON, STAGE2

class RecordingWriter:
    """Stands in for SummaryWriter (tensorboard is optional for users): keeps every
    scalar in memory, per log folder."""
    logged: dict[str, dict[str, list[tuple[int, float]]]] = {}

    def __init__(self, log_dir: str):
        self.scalars = RecordingWriter.logged.setdefault(log_dir, {})

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append((step, value))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every event file under `folder` (real tensorboard files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stage1_argv(data_root: str, out: Path) -> list[str]:
    return COMMON + ["--root", data_root, "--output-dir", str(out), "--epochs", "1", "--warmup-epochs", "1",
                     "--batch-size", "16", "--tensorboard"]


def stage2_argv(data_root: str, stage1: Path, out: Path, *extra: str) -> list[str]:
    return COMMON + ["--root", data_root, "--stage1", str(stage1), "--output-dir", str(out)] + STAGE2 + \
        ["--epochs", "1", "--tensorboard", *extra]


def run_both_stages(data_root: str, out: Path) -> None:
    """Stage 1 then stage 2, 1 epoch each, with --tensorboard (stage 2 also evaluates before training)."""
    assert train_stage1.main(stage1_argv(data_root, out)) == 0
    assert train_stage2.main(stage2_argv(data_root, out / "stage1.pt", out, "--eval-every", "1", "--eval-before")) == 0


@pytest.fixture(scope="module")
def run_dir(data_root, tmp_path_factory) -> Path:
    """Both stages with the recording writer in place of tensorboard's."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch.utils.tensorboard", SimpleNamespace(SummaryWriter=RecordingWriter))
        run_both_stages(data_root, out)
    return out


def test_real_event_files_when_tensorboard_is_installed(data_root, tmp_path):
    pytest.importorskip("tensorboard")  # optional for users; requirements-test.txt installs it
    run_both_stages(data_root, tmp_path)
    logged = scalars(tmp_path / "tensorboard")
    stage1 = records(tmp_path / "metrics_stage1.jsonl")[0]
    assert logged["stage1/loss/t2i"] == [(1, pytest.approx(stage1["t2i"], rel=1e-6))]
    assert {"stage2/loss/id", "stage2/lr_factor", "stage2/eval/cc/mAP"} <= set(logged)


def test_both_stages_write_their_epoch_records(run_dir):
    logged = RecordingWriter.logged[str(run_dir / "tensorboard")]

    stage1 = records(run_dir / "metrics_stage1.jsonl")[0]
    assert {"i2t", "t2i", "sim", "lr", "images_per_s"} <= set(stage1)
    for key, value in stage1.items():
        tag = f"stage1/{key}" if key in ("lr", "images_per_s") else f"stage1/loss/{key}"
        if key != "epoch":
            assert logged[tag] == [(1, pytest.approx(value, rel=1e-6))], tag

    stage2 = records(run_dir / "metrics_stage2.jsonl")[0]
    assert {"id", "i2t", "lr_factor", "images_per_s", "metrics"} <= set(stage2)
    for key in ("id", "i2t"):
        assert logged[f"stage2/loss/{key}"] == [(1, pytest.approx(stage2[key], rel=1e-6))]
    for key in ("lr_factor", "images_per_s"):
        assert logged[f"stage2/{key}"] == [(1, pytest.approx(stage2[key], rel=1e-6))]
    assert set(stage2["metrics"]) == {"general", "cc", "sc"}
    untrained = json.loads((run_dir / "results.json").read_text())["untrained"]
    for setting, metrics in stage2["metrics"].items():  # --eval-before's metrics at step 0, the epoch's at 1
        for name in ("rank1", "mAP"):
            assert logged[f"stage2/eval/{setting}/{name}"] == [(0, pytest.approx(untrained[setting][name], rel=1e-6)),
                                                              (1, pytest.approx(metrics[name], rel=1e-6))]


def test_missing_tensorboard_stops_before_training(data_root, run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    for main, argv in ((train_stage1.main, stage1_argv(data_root, tmp_path)),
                       (train_stage2.main, stage2_argv(data_root, run_dir / "stage1.pt", tmp_path))):
        assert utils.run_cli(main, argv) == 2
        err = capsys.readouterr().err
        assert err == "error: --tensorboard needs the tensorboard package: pip install tensorboard\n"
        assert not list(tmp_path.iterdir())  # nothing was started, logged or written
