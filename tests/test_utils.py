"""config.py: the recipe table; utils.py: determinism settings, the mixed-precision step policy, stop reports."""
from __future__ import annotations

import argparse
import errno
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import config
import train_stage1
import train_stage2
import training
import utils

REPO = Path(__file__).resolve().parents[1]


def test_readme_shows_the_recipe_table():
    assert config.recipe_markdown() in (REPO / "README.md").read_text()


def test_recipe_values_and_sources():
    vit, rn50 = config.recipe("ViT-B/16", "ltcc"), config.recipe("RN50", "ltcc")
    # CLIP-ReID's vit_clipreid.yml, as the issue lists it
    assert (vit["stage2_lr"], vit["stage2_weight_decay"], vit["stage2_epochs"]) == (5e-6, 1e-4, 60)
    assert (vit["stage2_milestones"], vit["stage2_warmup_factor"], vit["id_loss_weight"]) == ([30, 50], 0.1, 0.25)
    assert vit["stage1_epochs"] == 120 and vit["pixel_mean"] == vit["pixel_std"] == (0.5, 0.5, 0.5)
    assert (rn50["stage2_lr"], rn50["stage2_epochs"], rn50["stage2_milestones"]) == (3.5e-4, 120, [40, 70])
    for arch in ("RN50", "ViT-B/16"):  # PRCC keeps SCI's 20 epochs in both stages
        prcc = config.recipe(arch, "prcc")
        assert prcc["stage1_epochs"] == prcc["stage2_epochs"] == 20
    assert config.RECIPES["tiny"] == config.RECIPES["RN50"]
    assert config.recipe("resnet50", "prcc")["stage2_epochs"] == 120  # SCI's PRCC override is not CSSC's
    source = (REPO / "config.py").read_text()
    table = source[source.index("RECIPES: dict"):source.index('RECIPES["tiny"]')]
    for line in table.splitlines():  # every value names its source
        if re.match(r'\s+"\w+": [^{]', line):
            assert re.search(r"# (SCI|CLIP-ReID|CAL|CSSC)", line), line


def test_help_shows_the_recipe_defaults(capsys):
    with pytest.raises(SystemExit):
        train_stage2.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "RN50 3.5e-4, ViT-B/16 5e-6, resnet50 3e-4" in text and "RN50 120, ViT-B/16 60, resnet50 120; prcc 20 with CLIP" in text
    with pytest.raises(SystemExit):
        train_stage1.parse_args(["--help"])
    assert "RN50 60, ViT-B/16 120, resnet50 –; prcc 20 with CLIP" in " ".join(capsys.readouterr().out.split())


def test_flags_override_the_recipe():
    args = train_stage1.parse_args(["--arch", "ViT-B/16", "--dataset", "prcc", "--lr", "1e-3"])
    assert (args.lr, args.epochs, args.pixel_mean) == (1e-3, 20, [0.5, 0.5, 0.5])
    args = train_stage1.parse_args([])
    assert (args.arch, args.epochs, args.img_size, args.warmup_lr) == ("RN50", 60, [384, 192], 1e-5)


def test_loss_weights():
    names = ("id", "i2t", "cal", "tri")
    assert config.loss_weights([], names, {"id": 0.25}) == {"id": 0.25}
    assert config.loss_weights(["id=2", "cal=0.5"], names, {"id": 0.25}) == {"id": 2.0, "cal": 0.5}
    for bad in (["id"], ["foo=1"], ["id=x"]):
        with pytest.raises(utils.UserError, match="TERM=WEIGHT"):
            config.loss_weights(bad, names, {"id": 1.0})


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = state[2], state[3]


def test_determinism_defaults(restore_determinism):
    assert utils.configure_determinism(torch.device("cpu"), None) is True
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    # CUDA: off by default (autotuning instead); on when asked, with the cuBLAS workspace set
    assert utils.configure_determinism(torch.device("cuda"), None) is False
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert utils.configure_determinism(torch.device("cuda"), True) is True
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.backends.cudnn.deterministic


def tiny_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 4)


def test_float32_non_finite_loss_stops():
    model, opt, x = tiny_problem()
    amp = training.MixedPrecision(torch.device("cpu"), enabled=False)
    with pytest.raises(utils.TrainingStopped, match="non-finite loss at step 3"):
        amp.step(model(x).sum() * float("nan"), opt, "loss at step 3")


def test_float16_skips_overflowing_steps_then_stops(monkeypatch):
    model, opt, x = tiny_problem()
    amp = training.MixedPrecision(torch.device("cpu"), enabled=True, dtype="float16")
    assert amp.scaling
    before = model.weight.detach().clone()
    assert amp.step(model(x).sum() * float("inf"), opt, "bad") is False  # skipped: weights untouched
    assert torch.equal(model.weight, before) and amp.take_skipped() == 1 and amp.take_skipped() == 0
    assert amp.step(model(x).sum(), opt, "good") is True and not torch.equal(model.weight, before)
    monkeypatch.setattr(training, "MAX_SKIPPED_STEPS", 3)
    amp.step(model(x).sum() * float("nan"), opt, "bad")
    amp.step(model(x).sum() * float("nan"), opt, "bad")
    with pytest.raises(utils.TrainingStopped, match="3 float16 steps in a row"):
        amp.step(model(x).sum() * float("nan"), opt, "bad")


def test_stop_report_names_what_was_kept(capsys, tmp_path):
    stop = utils.StopSignal("train_stage2.py", ["--epochs", "3", "--output-dir", "my runs"])
    try:
        assert stop.report() == 130
        assert capsys.readouterr().err.strip() == ("stopped by an interrupt: no checkpoint was written yet; "
                                                   "run the same command again")
        stop.check()  # nothing received: no stop
        stop.keep(tmp_path / "last.pt", "epoch 2 of 3")
        os.kill(os.getpid(), signal.SIGTERM)  # only noted: the handler never raises
        os.kill(os.getpid(), signal.SIGINT)   # a repeated signal changes nothing
        assert stop.received == "SIGTERM" and stop.requested()
        with pytest.raises(utils.Interrupted):
            utils.check_stop()  # read-only phases end at their next check
        stop.report()
        assert capsys.readouterr().err.strip() == (
            f"stopped by SIGTERM: {tmp_path / 'last.pt'} holds epoch 2 of 3; continue with: "
            "python train_stage2.py --epochs 3 --output-dir 'my runs' --resume")
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored: not the script itself
    utils.check_stop()  # no active stop any more


def test_stop_of_a_resumed_run_before_its_first_save(capsys):
    stop = utils.StopSignal("train_stage1.py", ["--epochs", "9", "--resume"])
    try:
        stop.report()
    finally:
        stop.restore()
    assert capsys.readouterr().err.strip() == ("stopped by an interrupt: nothing new was written; continue with: "
                                               "python train_stage1.py --epochs 9 --resume")


def test_forked_helpers_end_normally_on_sigterm():
    """A process pool forked while the stop handler is installed (the synthetic benchmark's
    generator) is terminated with SIGTERM: its workers must end as usual, not raise Interrupted."""
    code = ("import multiprocessing as mp, sys; sys.path.insert(0, '.'); import utils\n"
            "stop = utils.StopSignal('x', [])\n"
            "with mp.get_context('fork').Pool(2) as pool:\n"
            "    assert pool.map(abs, range(-4, 4)) == [4, 3, 2, 1, 0, 1, 2, 3]\n"
            "print('done')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "done"
    assert "Traceback" not in proc.stderr and "Interrupted" not in proc.stderr, proc.stderr


def test_progress_reports_epoch_means(capsys):
    bar = utils.Progress(3, "stage2 1/9", every=100)
    bar.update(1, 4, {"id": 3.0}, lr=0.1)
    bar.update(2, 4, {"id": 1.0, "cal": 2.0}, lr=0.1)  # L_cal starts mid-epoch: its mean is over its steps
    bar.update(3, 4, {"id": 2.0, "cal": 4.0}, lr=0.1)
    assert bar.means() == {"id": 2.0, "cal": 3.0}
    assert capsys.readouterr().err.startswith("stage2 1/9 [####################] 3/3 id 2 cal 3 lr 0.1 ")


def test_progress_of_an_extraction_counts_batches_without_losses(capsys):
    bar = utils.Progress(2, "query features: 5 images", every=100, unit="batches")
    bar.update(1, 4)
    bar.update(2, 1)
    assert bar.images == 5 and bar.means() == {}
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("query features: 5 images [####################] 2/2 batches ") and line.endswith(" img/s")
    assert " lr " not in line


def test_other_scripts_end_on_sigterm_with_130(capsys):
    """evaluate.py, tools/*.py, python -m synthetic, python -m datasets and the demo run under run_cli: SIGTERM (timeout,
    scancel) ends them as Ctrl-C does, with one line and status 130, and the handler is restored."""
    before = signal.getsignal(signal.SIGTERM)

    def main(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # not reached: the signal interrupts at once
        return 0

    assert utils.run_cli(main, []) == 130
    assert capsys.readouterr().err.strip() == "interrupted; nothing was written"
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- schedules vs CLIP-ReID

SCHEDULE_CASES = [  # (stage-1 epochs, warm-up) and (stage-2 epochs, warm-up, milestones, warm-up factor)
    ((60, 5), (120, 10, [40, 70], 0.01)),  # the RN50 recipe
    ((120, 5), (60, 10, [30, 50], 0.1)),   # the ViT-B/16 recipe
    ((8, 3), (9, 3, [4, 7], 0.01)),        # short: warm-up, milestones and the cosine all show
    ((3, 5), (2, 10, [40, 70], 0.01)),     # shorter than the warm-up
    ((4, 0), (4, 0, [2], 0.1)),            # no warm-up
]


@pytest.mark.parametrize("stage1,stage2", SCHEDULE_CASES)
def test_schedules_equal_clipreid_stepping(stage1, stage2):
    """Per-epoch rates of both stages equal CLIP-ReID's schedulers stepped as its processors step
    them (tests/clipreid_reference.py), epoch by epoch."""
    from clipreid_reference import stage1_rates, stage2_rates

    epochs, warmup = stage1
    ours = [training.warmup_cosine(e, epochs, warmup, 3.5e-4, 1e-5, 1e-6) for e in range(1, epochs + 1)]
    assert ours == pytest.approx(stage1_rates(epochs, 3.5e-4, warmup, 1e-5, 1e-6), rel=1e-12, abs=0)
    epochs, warmup, milestones, factor = stage2
    ours = [3.5e-4 * training.warmup_multistep(e, warmup, factor, milestones, 0.1) for e in range(1, epochs + 1)]
    assert ours == pytest.approx(stage2_rates(epochs, 3.5e-4, milestones, 0.1, factor, warmup), rel=1e-12, abs=0)


def test_schedule_landmarks_of_the_rn50_recipe():
    """The facts the parity rests on: stage-2 epoch 1 at 0.01*(1-0.1)+0.1 = 0.109, the x0.1 drops
    taking effect in epochs 40 and 70; stage-1 epoch 1 one warm-up step in, the last at lr_min."""
    factor = [training.warmup_multistep(e, 10, 0.01, [40, 70], 0.1) for e in range(1, 121)]
    assert factor[0] == pytest.approx(0.109) and factor[9] == 1.0
    assert factor[38] == 1.0 and factor[39] == pytest.approx(0.1) and factor[69] == pytest.approx(0.01)
    lr = [training.warmup_cosine(e, 60, 5, 3.5e-4, 1e-5, 1e-6) for e in range(1, 61)]
    assert lr[0] == pytest.approx(1e-5 + (3.5e-4 - 1e-5) / 5) and lr[-1] == 1e-6
    assert lr[4] == pytest.approx(1e-6 + 0.5 * (3.5e-4 - 1e-6) * (1 + math.cos(math.pi * 5 / 60)))


def test_stage1_epoch_takes_the_remainder_batch():
    """CLIP-ReID's stage-1 epoch is ceil(N / batch) steps, the last one smaller."""
    assert train_stage1.epoch_steps(130, 64) == 3 and train_stage1.epoch_steps(128, 64) == 2
    assert train_stage1.epoch_steps(10, 64) == 1
    assert train_stage1.epoch_steps(129, 64, world=2) == 2  # one sample cannot be shared by two processes


def test_amp_and_workers_defaults_follow_the_device(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert utils.default_workers("cuda") == 8 and utils.default_workers("cpu") == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert utils.default_workers("cuda") == 4
    args = train_stage1.parse_args(["--device", "cpu"])
    assert args.amp is None and args.workers is None  # resolved by start_run once the device is known
    assert train_stage1.parse_args(["--no-amp"]).amp is False and train_stage1.parse_args(["--amp"]).amp is True


# ---- full disk: write_atomic / save_checkpoint ----------------------------------------------------

def _enospc_midway(tmp: str) -> None:
    """A writer that gets some bytes out, then meets a full disk (as f.write would)."""
    with open(tmp, "wb") as f:
        f.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "last.pt")


def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path, capsys):
    path = tmp_path / "last.pt"
    utils.save_checkpoint({"epoch": 3}, path)
    with pytest.raises(utils.WriteFailed) as exc:
        utils.write_atomic(path, _enospc_midway)
    message = str(exc.value)
    assert message.startswith(f"could not write {path}: no space left on device (") and "free on" in message
    assert message.endswith(f"the existing {path} is unchanged") and "\n" not in message
    assert exc.value.path == path and exc.value.existed and isinstance(exc.value, utils.UserError)
    assert torch.load(path)["epoch"] == 3 and _leftovers(tmp_path) == []  # previous file intact, no temp file
    # a training script adds what the kept file holds and how to continue
    assert str(exc.value.with_advice("it holds epoch 3; free space, then run X")).endswith(
        "is unchanged; it holds epoch 3; free space, then run X")
    # through run_cli: one line, exit status 2, no traceback
    def main(argv):
        utils.write_atomic(tmp_path / "new.json", _enospc_midway)
    assert utils.run_cli(main, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no file was written at {tmp_path / 'new.json'}" in err
    assert _leftovers(tmp_path) == []


def test_torch_save_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full disk with its zip writer's own RuntimeError."""
    path = tmp_path / "last.pt"
    utils.save_checkpoint({"epoch": 3}, path)

    def full(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 part of a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(utils.WriteFailed, match="no space left on device"):
        utils.save_checkpoint({"epoch": 4}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 3 and _leftovers(tmp_path) == []
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("another bug")))
    with pytest.raises(RuntimeError, match="another bug"):  # other errors are not disguised as a full disk
        utils.save_checkpoint({"epoch": 4}, path)
    assert _leftovers(tmp_path) == []


def test_a_real_full_file_system(tmp_path):
    """A 1 MB tmpfs (needs root; skipped where mounting is refused)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or not allowed in this container)")
    try:
        path = folder / "last.pt"
        utils.save_checkpoint({"w": torch.zeros(1000)}, path)
        with pytest.raises(utils.WriteFailed, match=r"no space left on device \(.* free on "):
            utils.save_checkpoint({"w": torch.zeros(1_000_000)}, path)  # 4 MB
        assert torch.load(path)["w"].shape == (1000,) and os.listdir(folder) == ["last.pt"]
        with pytest.raises(utils.WriteFailed, match="no file was written at"):
            utils.write_json(folder / "big.json", {"x": "y" * 2_000_000})
        assert os.listdir(folder) == ["last.pt"]
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_default_workers(monkeypatch):
    for cpus, cuda, cpu in ((None, 1, 1), (1, 1, 1), (2, 2, 2), (4, 4, 2), (64, 8, 2)):
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        assert (utils.default_workers("cuda"), utils.default_workers("cpu")) == (cuda, cpu)


def test_a_stopped_script_names_the_files_it_completed(tmp_path, capsys):
    """evaluate.py writes some outputs before others: a stop reports exactly those, each complete."""
    def main(argv):
        utils.write_json(tmp_path / "a.json", {"x": 1})
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # not reached
        return 0

    assert utils.run_cli(main, []) == 130
    assert capsys.readouterr().err.strip() == (f"interrupted; written before the stop, each complete: "
                                               f"{tmp_path / 'a.json'}; nothing else was written")
