"""Both training stages and evaluate.py end to end on a few-identity synthetic set with the tiny
CLIP: outputs, determinism, resume equality, signals, a non-finite loss, two-process DDP, bad input."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import config as recipes  # the name config is the run's ModelConfig below
import datasets
import evaluate
import loaders
import losses
import models
import train_stage1
import train_stage2
import training
import utils
from conftest import SMALL_BENCHMARK, stop_at_epoch

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "synthetic", "--arch", "tiny", "--img-size", "64", "32", "--device", "cpu",
          "--workers", "0", "--seed", "5", "--log-every", "1000"]
STAGE2 = ["--epochs", "3", "--batch-size", "16", "--num-instances", "4", "--warmup-epochs", "1",
          "--milestones", "2", "--cal-start", "1", "--eval-every", "3"]


@pytest.fixture(scope="module")
def stage1_dir(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    assert train_stage1.main(COMMON + ["--root", data_root, "--output-dir", str(out), "--epochs", "2",
                                       "--warmup-epochs", "1", "--batch-size", "16"]) == 0
    return out


def stage2(data_root: str, stage1_dir: Path, out: Path, *extra: str) -> int:
    return train_stage2.main(COMMON + ["--root", data_root, "--stage1", str(stage1_dir / "stage1.pt"),
                                       "--output-dir", str(out)] + STAGE2 + list(extra))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_stage1_writes_banks_and_is_deterministic(data_root, stage1_dir, tmp_path):
    ckpt = load(stage1_dir / "stage1.pt")
    num_ids = SMALL_BENCHMARK["num_train_ids"]
    assert ckpt["kind"] == "stage1" and ckpt["num_train_pids"] == num_ids
    assert set(ckpt["banks"]) == {"F_id", "F_clo", "F_ort"}
    for bank in ckpt["banks"].values():
        assert bank.shape == (num_ids, 64) and torch.isfinite(bank).all()
    assert len(ckpt["identities"]) == num_ids
    assert set(ckpt["contexts"]) == {"id_prompt.ctx", "clothes_prompt.ctx"}
    # only the contexts were trained, and they moved away from their initialisation
    assert json.loads((stage1_dir / "args_stage1.json").read_text())["arch"] == "tiny"
    assert len((stage1_dir / "metrics_stage1.jsonl").read_text().splitlines()) == 2
    # same seed, same numbers
    assert train_stage1.main(COMMON + ["--root", data_root, "--output-dir", str(tmp_path), "--epochs", "2",
                                       "--warmup-epochs", "1", "--batch-size", "16"]) == 0
    again = load(tmp_path / "stage1.pt")
    for key, bank in ckpt["banks"].items():
        assert torch.equal(bank, again["banks"][key]), key


def test_stage1_no_sse_bank_is_identity_bank(data_root, tmp_path):
    assert train_stage1.main(COMMON + ["--root", data_root, "--output-dir", str(tmp_path), "--epochs", "1",
                                       "--warmup-epochs", "1", "--batch-size", "16", "--no-sse", "--n-ctx", "2"]) == 0
    banks = load(tmp_path / "stage1.pt")["banks"]
    assert torch.equal(banks["F_ort"], banks["F_id"])
    # stage 2 reads the prompt properties from stage1.pt and has no flags for them
    assert stage2(data_root, tmp_path, tmp_path, "--epochs", "1") == 0
    args = json.loads((tmp_path / "args_stage2.json").read_text())
    assert args["no_sse"] is True and args["n_ctx"] == 2
    with pytest.raises(SystemExit) as exc:
        train_stage2.parse_args(["--n-ctx", "4"])
    assert exc.value.code == 2


def test_stage1_outfit_prompts(data_root, tmp_path, capsys):
    """--clothes-prompt outfit: one clothes context per clothes label; F_ort is orthogonal to every
    outfit feature of its identity; stage 2 runs from it."""
    assert train_stage1.main(COMMON + ["--root", data_root, "--output-dir", str(tmp_path), "--epochs", "1",
                                       "--warmup-epochs", "1", "--batch-size", "16", "--clothes-prompt", "outfit",
                                       "--ortho", "gram-schmidt"]) == 0
    ckpt = load(tmp_path / "stage1.pt")
    data = datasets.build_dataset("synthetic", data_root)
    clothes_of = train_stage1.clothes_by_identity(data.train, data.num_train_pids)
    assert ckpt["contexts"]["clothes_prompt.ctx"].shape[0] == data.num_train_clothes
    banks = ckpt["banks"]
    for y, outfits in enumerate(clothes_of):
        cos = torch.nn.functional.cosine_similarity(banks["F_ort"][y][None], banks["F_outfit"][outfits])
        assert cos.abs().max() < 1e-4, (y, cos)
    records = [json.loads(line) for line in (tmp_path / "metrics_stage1.jsonl").read_text().splitlines()]
    assert {"clo_i2t", "clo_t2i"} <= set(records[0])
    assert stage2(data_root, tmp_path, tmp_path, "--epochs", "1") == 0
    assert json.loads((tmp_path / "args_stage2.json").read_text())["clothes_prompt"] == "outfit"
    with pytest.raises(SystemExit) as exc:  # several outfit directions: only Gram-Schmidt removes them
        train_stage1.parse_args(["--clothes-prompt", "outfit"])
    assert exc.value.code == 2 and "gram-schmidt" in capsys.readouterr().err


def test_stage2_end_to_end_then_evaluate(data_root, stage1_dir, tmp_path):
    assert stage2(data_root, stage1_dir, tmp_path, "--eval-before") == 0
    for name in ("last.pt", "best.pt", "results.json", "stage2.log", "metrics_stage2.jsonl", "args_stage2.json"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["metrics"]) == {"general", "cc", "sc"}
    assert set(results["metrics"]["cc"]) == {"rank1", "rank5", "rank10", "rank20", "mAP", "mINP"}
    assert set(results["untrained"]) == {"general", "cc", "sc"}
    last = load(tmp_path / "last.pt")
    assert last["kind"] == "stage2" and last["epoch"] == 3
    # the model is described by a small named structure, not by the raw arguments
    config = models.ModelConfig(**last["config"])
    assert (config.arch, config.img_size, config.num_classes, config.use_sim) == ("tiny", [64, 32], 6, True)
    assert config.pixel_mean == list(recipes.IMAGENET_MEAN)
    history = [json.loads(line) for line in (tmp_path / "metrics_stage2.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert "cal" not in history[0] and "cal" in history[1]  # the adversarial loss starts at --cal-start
    assert all("tri" in h for h in history)  # CLIP-ReID's triplet term, on by default
    # each epoch's rate is CLIP-ReID's scheduler's, stepped as its processors step it
    from clipreid_reference import stage1_rates, stage2_rates
    assert [h["lr"] for h in history] == pytest.approx(stage2_rates(3, 3.5e-4, [2], 0.1, 0.01, 1), rel=1e-12)
    stage1 = [json.loads(line) for line in (stage1_dir / "metrics_stage1.jsonl").read_text().splitlines()]
    assert [h["lr"] for h in stage1] == pytest.approx(stage1_rates(2, 3.5e-4, 1, 1e-5, 1e-6), rel=1e-12)
    # the checkpoint alone rebuilds the model: evaluate reproduces the training run's final numbers
    assert evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--workers", "0", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["evaluate"]["metrics"] == results["metrics"]


def test_stage2_takes_stage1s_similarity(data_root, tmp_path, monkeypatch):
    """With --cosine-sim in stage 1, stage 2's Eq. 19 logits are cosine times the scale stage 1 used
    (saved in stage1.pt); without it, plain dot products (CLIP-ReID's), as before."""
    s1 = tmp_path / "s1"
    assert train_stage1.main(COMMON + ["--root", data_root, "--output-dir", str(s1), "--epochs", "1",
                                       "--warmup-epochs", "1", "--batch-size", "16", "--cosine-sim"]) == 0
    scale = load(s1 / "stage1.pt")["logit_scale"]
    assert scale == pytest.approx(models.build_clip("tiny", "none", (64, 32)).logit_scale.exp().item())
    seen = []
    real = losses.text_logits
    monkeypatch.setattr(losses, "text_logits", lambda x, bank, s=None: seen.append(s) or real(x, bank, s))
    assert stage2(data_root, s1, tmp_path / "s2", "--epochs", "1", "--milestones", "1", "--eval-every", "1") == 0
    assert seen and set(seen) == {scale}
    args = json.loads((tmp_path / "s2" / "args_stage2.json").read_text())
    assert args["cosine_sim"] is True and args["i2t_logit_scale"] == scale


def test_match_norm_is_kept_by_a_resumed_stage1_and_refused_without_sse(data_root, tmp_path, monkeypatch, capsys):
    argv = COMMON + ["--root", data_root, "--output-dir", str(tmp_path), "--epochs", "2", "--warmup-epochs", "1",
                     "--batch-size", "16", "--match-norm"]
    stop_at_epoch(monkeypatch, 2)
    assert train_stage1.main(argv) == 130
    monkeypatch.undo()
    assert train_stage1.main(["--output-dir", str(tmp_path), "--resume"]) == 0
    ckpt = load(tmp_path / "stage1.pt")
    assert ckpt["args"]["match_norm"] is True
    torch.testing.assert_close(ckpt["banks"]["F_ort"].norm(dim=1), ckpt["banks"]["F_id"].norm(dim=1))
    with pytest.raises(SystemExit) as exc:
        train_stage1.parse_args(["--match-norm", "--no-sse"])
    assert exc.value.code == 2 and "--match-norm" in capsys.readouterr().err


def test_an_older_cosine_stage1_file_gets_its_scale_from_the_weights(data_root, stage1_dir, tmp_path):
    """A stage1.pt written before it saved `logit_scale`: stage 2 rebuilds the scale from the same
    weights (exp of CLIP's logit_scale, 1/0.07 for OpenAI's initialisation)."""
    old = load(stage1_dir / "stage1.pt")
    del old["logit_scale"]
    old["args"]["cosine_sim"] = True
    utils.save_checkpoint(old, tmp_path / "stage1.pt")
    args = train_stage2.parse_args(COMMON + ["--root", data_root, "--stage1", str(tmp_path / "stage1.pt")])
    args, _ = train_stage2.resolve_args(args, resumed=False)
    assert args.cosine_sim and args.i2t_logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


@pytest.mark.parametrize("triplet", [True, False])
def test_loss_terms_triplet_on_clipreids_three_features(triplet):
    """The triplet term is on by default and sums the batch-hard loss over CLIP-ReID's three
    features; --no-triplet leaves it out, training Eq. 20 literally."""
    args = train_stage2.parse_args([] if triplet else ["--no-triplet"])
    assert args.triplet is triplet
    args.cal_start = 0
    torch.manual_seed(0)
    model = models.SCIReID(models.build_clip("tiny", "none", (64, 32)), 4, torch.randn(4, 64)).train()
    pids = torch.arange(4).repeat_interleave(2)
    outputs = model(torch.randn(8, 3, 64, 32))
    terms = losses.SCILoss(model.text_bank, args.triplet)(outputs, {"pids": pids, "clothes": pids}, epoch=0)
    assert ("tri" in terms) is triplet
    if triplet:
        expected = sum(losses.TripletLoss(0.3)(f, pids) for f in outputs["triplet_feats"])
        torch.testing.assert_close(terms["tri"], expected)


def test_resume_after_signal_equals_uninterrupted_run(data_root, stage1_dir, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert stage2(data_root, stage1_dir, full) == 0

    # a real SIGTERM, delivered to this process in the middle of the third epoch
    steps_per_epoch = len(loaders.build_train_loader(datasets.build_dataset("synthetic", data_root).train,
                                                     (64, 32), 16, 4, 0, 5))
    updates = []
    original = utils.Progress.update

    def update(self, step, images, losses=None, lr=None):
        original(self, step, images, losses, lr)
        if not self.desc.startswith(("stage1 ", "stage2 ")):
            return  # training steps only, not a feature extraction's
        updates.append(step)
        if len(updates) == 2 * steps_per_epoch + 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(utils.Progress, "update", update)
    assert stage2(data_root, stage1_dir, cut) == 130
    assert load(cut / "last.pt")["epoch"] == 2  # the last completed epoch, loadable
    monkeypatch.undo()
    # only --output-dir and --resume: the run continues with the settings it was started with
    assert train_stage2.main(["--output-dir", str(cut), "--resume"]) == 0
    a, b = load(full / "last.pt"), load(cut / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert json.loads((full / "results.json").read_text())["metrics"] == \
        json.loads((cut / "results.json").read_text())["metrics"]


def test_stage1_resume_after_signal_equals_uninterrupted_run(data_root, stage1_dir, tmp_path, monkeypatch):
    argv = COMMON + ["--root", data_root, "--output-dir", str(tmp_path), "--epochs", "2", "--warmup-epochs", "1",
                     "--batch-size", "16"]
    updates = []
    original = utils.Progress.update

    def update(self, step, images, losses=None, lr=None):
        original(self, step, images, losses, lr)
        if not self.desc.startswith(("stage1 ", "stage2 ")):
            return  # training steps only, not a feature extraction's
        updates.append(step)
        if len(updates) == self.total + 1:  # first step of the second epoch
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(utils.Progress, "update", update)
    assert train_stage1.main(argv) == 130
    assert not (tmp_path / "stage1.pt").exists() and load(tmp_path / "stage1_last.pt")["epoch"] == 1
    monkeypatch.undo()
    assert train_stage1.main(["--output-dir", str(tmp_path), "--resume"]) == 0
    resumed, full = load(tmp_path / "stage1.pt")["banks"], load(stage1_dir / "stage1.pt")["banks"]
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


def test_resume_rewrites_the_metrics_file_from_the_checkpoint(data_root, stage1_dir, tmp_path, monkeypatch):
    """A run stopped between its metrics line and its checkpoint (or killed) must not leave a
    duplicate or orphan line behind: --resume rewrites metrics_stage*.jsonl from the checkpoint."""
    argv = COMMON + ["--root", data_root, "--output-dir", str(tmp_path), "--warmup-epochs", "1", "--batch-size", "16",
                     "--epochs", "2"]
    stop_at_epoch(monkeypatch)
    assert train_stage1.main(argv) == 130
    utils.append_jsonl(tmp_path / "metrics_stage1.jsonl", {"epoch": 2, "orphan": True})
    monkeypatch.undo()
    assert train_stage1.main(argv + ["--resume"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics_stage1.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "orphan" not in records[1]
    assert load(tmp_path / "stage1_last.pt")["history"] == records

    stop_at_epoch(monkeypatch)
    assert stage2(data_root, stage1_dir, tmp_path, "--epochs", "2") == 130
    utils.append_jsonl(tmp_path / "metrics_stage2.jsonl", {"epoch": 2, "orphan": True})
    monkeypatch.undo()
    assert stage2(data_root, stage1_dir, tmp_path, "--epochs", "2", "--resume") == 0
    records = [json.loads(line) for line in (tmp_path / "metrics_stage2.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "orphan" not in records[1]


def test_stage1_float16_gradient_scaler_on_cpu(data_root, tmp_path):
    """--amp-dtype float16 runs the CUDA recipe's path on CPU: autocast float16 + GradScaler."""
    argv = COMMON + ["--root", data_root, "--output-dir", str(tmp_path), "--epochs", "2", "--warmup-epochs", "1",
                     "--batch-size", "16", "--amp", "--amp-dtype", "float16"]
    assert train_stage1.main(argv) == 0
    state = load(tmp_path / "stage1_last.pt")
    assert state["scaler"]["scale"] > 0 and state["args"]["amp_dtype"] == "float16"
    records = [json.loads(line) for line in (tmp_path / "metrics_stage1.jsonl").read_text().splitlines()]
    assert all("skipped_steps" in r for r in records)
    assert all(torch.isfinite(b).all() for b in load(tmp_path / "stage1.pt")["banks"].values())


def test_stage2_float16_resume_is_exact(data_root, stage1_dir, tmp_path, monkeypatch):
    """The gradient scaler's state is part of last.pt: stopped in epoch 3, resumed = 3 epochs."""
    fp16 = ["--amp", "--amp-dtype", "float16"]
    assert stage2(data_root, stage1_dir, tmp_path / "full", *fp16) == 0
    stop_at_epoch(monkeypatch, epoch=3)
    assert stage2(data_root, stage1_dir, tmp_path / "cut", *fp16) == 130
    monkeypatch.undo()
    assert train_stage2.main(["--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = load(tmp_path / "full" / "last.pt"), load(tmp_path / "cut" / "last.pt")
    assert full["scaler"]["scale"] == cut["scaler"]["scale"] > 0
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics_stage2.jsonl").read_text().splitlines()]
    assert all("skipped_steps" in r for r in records)


class NonFiniteCAL(torch.nn.Module):
    """Eq. 18 replaced by a loss that is infinite on the calls listed (all calls when None)."""

    def __init__(self, bad_calls: set[int] | None):
        super().__init__()
        self.bad_calls, self.calls = bad_calls, 0

    def forward(self, logits, clothes, mask):
        self.calls += 1
        bad = self.bad_calls is None or self.calls in self.bad_calls
        return logits.float().mean() * (float("inf") if bad else 0.0)


def test_float16_skips_an_overflowing_step_and_counts_it(data_root, stage1_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "ClothesAdversarialLoss", lambda *a: NonFiniteCAL({2, 3}))
    assert stage2(data_root, stage1_dir, tmp_path, "--amp", "--amp-dtype", "float16") == 0
    records = [json.loads(line) for line in (tmp_path / "metrics_stage2.jsonl").read_text().splitlines()]
    assert records[1]["skipped_steps"] >= 2  # CAL starts in epoch 2, where calls 2 and 3 overflow
    assert "skipped" in (tmp_path / "stage2.log").read_text()
    assert torch.isfinite(load(tmp_path / "last.pt")["model"]["neck_proj.classifier.weight"]).all()


def test_float16_stops_after_many_skipped_steps_in_a_row(data_root, stage1_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(losses, "ClothesAdversarialLoss", lambda *a: NonFiniteCAL(None))
    monkeypatch.setattr(training, "MAX_SKIPPED_STEPS", 12)
    code = utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--stage1", str(stage1_dir / "stage1.pt"),
                                                      "--output-dir", str(tmp_path), "--amp", "--amp-dtype",
                                                      "float16"] + STAGE2)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: 12 float16 steps in a row had non-finite gradients")
    assert "stage-2 loss at epoch 3 step" in err and load(tmp_path / "last.pt")["epoch"] == 2


def test_non_finite_loss_stops_with_last_good_checkpoint(data_root, stage1_dir, tmp_path, monkeypatch, capsys):
    class BrokenCAL(torch.nn.Module):
        def forward(self, logits, clothes, mask):
            return logits.sum() * float("nan")

    monkeypatch.setattr(losses, "ClothesAdversarialLoss", lambda *a: BrokenCAL())
    code = utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--stage1", str(stage1_dir / "stage1.pt"),
                                                      "--output-dir", str(tmp_path)] + STAGE2)
    assert code == 1
    assert "non-finite stage-2 loss at epoch 2" in capsys.readouterr().err
    assert load(tmp_path / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- stops as clusters deliver them

SIGNAL_EPOCHS = {"stage1": 12, "stage2": 4}  # long enough that the signal lands mid-run


def signal_argv(stage: str, data_root: str, stage1_dir: Path, out: Path) -> list[str]:
    argv = COMMON + ["--root", data_root, "--output-dir", str(out), "--epochs", str(SIGNAL_EPOCHS[stage]),
                     "--workers", "2"]  # real worker processes: a group signal reaches them too
    if stage == "stage1":
        return argv + ["--warmup-epochs", "1", "--batch-size", "16"]
    return argv + ["--stage1", str(stage1_dir / "stage1.pt"), "--batch-size", "16", "--num-instances", "4",
                   "--warmup-epochs", "1", "--milestones", "3", "--cal-start", "1", "--eval-every", "1000"]


@pytest.fixture(scope="module")
def uninterrupted(data_root, stage1_dir, tmp_path_factory) -> dict[str, Path]:
    """The reference runs the interrupted-and-resumed runs must reproduce exactly."""
    runs = {}
    for stage, script in (("stage1", train_stage1), ("stage2", train_stage2)):
        runs[stage] = tmp_path_factory.mktemp(f"full_{stage}")
        assert script.main(signal_argv(stage, data_root, stage1_dir, runs[stage])) == 0
    return runs


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("to_group", [False, True], ids=["process", "group"])
def test_signal_stops_cleanly_and_resume_is_exact(stage, sig, to_group, data_root, stage1_dir, uninterrupted,
                                                  tmp_path):
    """SIGTERM/SIGINT to the main process alone or to its whole group (scancel, timeout, Ctrl-C;
    DataLoader workers included): exit 130 within seconds, one line saying what was kept and how to
    continue, no traceback, a loadable checkpoint, and --resume ends exactly as the uninterrupted run."""
    argv = signal_argv(stage, data_root, stage1_dir, tmp_path)
    proc = subprocess.Popen([sys.executable, f"train_{stage}.py"] + argv, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / f"metrics_{stage}.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal was sent"
    os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 20
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Error" not in err
    progress = "stage1_last.pt" if stage == "stage1" else "last.pt"
    kept = load(tmp_path / progress)["epoch"]
    lines = err.strip().splitlines()  # progress bars above it, then the one line about the stop
    assert [line for line in lines if "stopped" in line] == lines[-1:]
    assert lines[-1].startswith(f"stopped by {sig.name}: {tmp_path / progress} holds epoch {kept} of "
                                f"{SIGNAL_EPOCHS[stage]}; continue with: python train_{stage}.py ")
    assert lines[-1].endswith(" --resume")
    assert 1 <= kept < SIGNAL_EPOCHS[stage]

    script = train_stage1 if stage == "stage1" else train_stage2
    assert script.main(argv + ["--resume"]) == 0
    if stage == "stage1":
        resumed, full = load(tmp_path / "stage1.pt")["banks"], load(uninterrupted[stage] / "stage1.pt")["banks"]
    else:
        resumed, full = load(tmp_path / "last.pt")["model"], load(uninterrupted[stage] / "last.pt")["model"]
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


def test_repeated_signals_exit_130_once(data_root, stage1_dir, tmp_path):
    """scancel under torchrun delivers SIGTERM twice (the group's and the launcher's); Ctrl-C may be
    pressed again while the run shuts down: still one line, exit 130, a loadable checkpoint."""
    argv = signal_argv("stage2", data_root, stage1_dir, tmp_path)
    proc = subprocess.Popen([sys.executable, "train_stage2.py"] + argv, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "metrics_stage2.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the first signal"
    sent = []  # only signals sent while the run was still going count
    for sig, pause in ((signal.SIGTERM, 0.05), (signal.SIGTERM, 0.2), (signal.SIGINT, 0.3), (signal.SIGTERM, 0)):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            sent.append(sig)
            time.sleep(pause)
    _, err = proc.communicate(timeout=60)
    assert len(sent) >= 2, f"only {len(sent)} signal reached the running process: nothing repeated"
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert len([line for line in err.splitlines() if line.startswith("stopped by SIGTERM: ")]) == 1
    assert load(tmp_path / "last.pt")["epoch"] >= 1


def test_signal_during_feature_caching_stops_at_once(data_root, tmp_path, monkeypatch, capsys):
    original = train_stage1.extract_features

    def signal_then_extract(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_stage1, "extract_features", signal_then_extract)
    code = train_stage1.main(COMMON + ["--root", data_root, "--output-dir", str(tmp_path), "--epochs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[-1] == "stopped by SIGTERM: no checkpoint was written yet; run the same command again"
    assert not (tmp_path / "stage1_last.pt").exists()


def test_signal_during_evaluation_stops_at_once(data_root, stage1_dir, tmp_path, monkeypatch, capsys):
    """last.pt is written before the epoch's evaluation, so a stop during it keeps the epoch's
    training; --resume evaluates that epoch first, then carries on."""
    original = train_stage2.evaluate
    calls = []

    def evaluate_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # before training, after epoch 1, then during the one after epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_stage2, "evaluate", evaluate_then_signal)
    code = stage2(data_root, stage1_dir, tmp_path, "--eval-before", "--eval-every", "1")
    err = capsys.readouterr().err
    assert code == 130 and len(calls) == 3, err
    assert err.strip().splitlines()[-1].startswith(
        f"stopped by SIGTERM: {tmp_path / 'last.pt'} holds epoch 2 of 3; continue with: ")
    state = load(tmp_path / "last.pt")
    assert state["epoch"] == 2 and "metrics" in state["history"][0] and "metrics" not in state["history"][1]

    monkeypatch.setattr(train_stage2, "evaluate", original)
    assert stage2(data_root, stage1_dir, tmp_path, "--eval-before", "--eval-every", "1", "--resume") == 0
    records = [json.loads(line) for line in (tmp_path / "metrics_stage2.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and all("metrics" in r for r in records)


def test_full_disk_during_training_is_one_line(data_root, stage1_dir, tmp_path, monkeypatch, capsys):
    """A checkpoint write that meets a full disk: one error line naming the file, the reason, what
    the kept last.pt holds and the command to continue; status 2, no traceback, last.pt intact."""
    import errno
    original, writes = torch.save, []

    def save(obj, f, *args, **kwargs):
        if str(f).startswith(str(tmp_path / "tmp")) and str(f).endswith(".pt"):
            writes.append(f)
            if len(writes) == 2:  # epoch 2's last.pt: some bytes, then the disk is full
                Path(f).write_bytes(b"PK" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--stage1", str(stage1_dir / "stage1.pt"),
                                                      "--output-dir", str(tmp_path)] + STAGE2) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("stage2 ")]
    assert len(err) == 1 and "Traceback" not in err[0], err  # progress lines aside, one line
    assert err[0].startswith(f"error: could not write {tmp_path / 'last.pt'}: no space left on device")
    assert f"the existing {tmp_path / 'last.pt'} is unchanged" in err[0]
    assert f"{tmp_path / 'last.pt'} holds epoch 1 of 3; continue with: python train_stage2.py" in err[0]
    assert load(tmp_path / "last.pt")["epoch"] == 1 and not list(tmp_path.glob("tmp*"))


DDP_PORTS = iter(range(29533, 29563))  # a port per launch: no reuse of one still in TIME_WAIT


def torchrun(*argv: str, **popen) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 ...` with gloo on CPU, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(next(DDP_PORTS))]
    return subprocess.Popen(launch + list(argv), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def torchrun_ok(*argv: str) -> None:
    proc = torchrun(*argv)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def ddp_stage2_argv(data_root: str, stage1: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["train_stage2.py"] + COMMON + ["--root", data_root, "--stage1", str(stage1), "--output-dir", str(out),
                                           "--epochs", str(epochs), "--warmup-epochs", "1", "--batch-size", "16",
                                           "--num-instances", "4", "--eval-every", "1",
                                           "--cal-start", "1", *extra]  # explicit: its default depends on --epochs


@pytest.fixture(scope="module")
def ddp_run(data_root, tmp_path_factory) -> Path:
    """Both stages under torchrun with 2 gloo processes, 2 epochs each, stage 2 evaluated before
    training and after each epoch."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun_ok("train_stage1.py", *COMMON, "--root", data_root, "--output-dir", str(out), "--epochs", "2",
                "--warmup-epochs", "1", "--batch-size", "16")
    torchrun_ok(*ddp_stage2_argv(data_root, out / "stage1.pt", out, 2, "--eval-before"))
    return out


def test_two_process_gloo_ddp(ddp_run):
    """Both stages under torchrun with 2 gloo processes. Every rank takes part in evaluation (the
    features are extracted in shards and gathered), so no rank waits alone in a collective; the
    numbers equal a single-process evaluation of the same checkpoint. --batch-size is global."""
    args = json.loads((ddp_run / "args_stage1.json").read_text())
    assert args["batch_size"] == 16  # the global batch: 8 features per process
    assert load(ddp_run / "last.pt")["epoch"] == 2
    results = json.loads((ddp_run / "results.json").read_text())
    assert set(results["metrics"]) == {"general", "cc", "sc"} and set(results["untrained"]) == {"general", "cc", "sc"}
    images = [json.loads(line)["images_per_s"] for line in (ddp_run / "metrics_stage2.jsonl").read_text().splitlines()]
    assert len(images) == 2
    assert evaluate.main(["--checkpoint", str(ddp_run / "last.pt"), "--workers", "0", "--device", "cpu"]) == 0
    single = json.loads((ddp_run / "results.json").read_text())["evaluate"]["metrics"]
    # Exactly equal (measured: 0.0 difference in every number). The ranks hold the same weights, and
    # evaluation uses rank 0's BN running statistics (broadcast first; per-rank statistics drift apart in
    # training), in eval mode, with deterministic CPU kernels, so each image's feature does not depend on
    # which rank or batch computed it. A difference means the ranks evaluated different models.
    assert results["metrics"] == single


def sigterm_after_first_epoch(proc: subprocess.Popen, out: Path) -> None:
    """SIGTERM to a torchrun launch's group once its first epoch's metrics line exists."""
    metrics = out / "metrics_stage2.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal was sent"
    os.killpg(proc.pid, signal.SIGTERM)


def test_ddp_resume_equals_uninterrupted_run(data_root, ddp_run, tmp_path):
    """2 processes stopped by a group SIGTERM after their first epoch, then `torchrun ... --output-dir
    DIR --resume` alone = the uninterrupted 2-epoch 2-process run."""
    proc = torchrun(*ddp_stage2_argv(data_root, ddp_run / "stage1.pt", tmp_path, 2, "--eval-before"),
                    start_new_session=True)
    sigterm_after_first_epoch(proc, tmp_path)
    proc.communicate(timeout=60)
    assert load(tmp_path / "last.pt")["epoch"] in (1, 2)  # epoch 2 trained but maybe not evaluated: --resume does it
    torchrun_ok("train_stage2.py", "--output-dir", str(tmp_path), "--resume")
    full, resumed = load(ddp_run / "last.pt"), load(tmp_path / "last.pt")
    assert resumed["epoch"] == 2
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    a, b = (json.loads((d / "results.json").read_text()) for d in (ddp_run, tmp_path))
    assert (a["metrics"], a["untrained"], a["best_epoch"]) == (b["metrics"], b["untrained"], b["best_epoch"])


def test_ddp_group_sigterm_stops_every_rank(data_root, ddp_run, tmp_path):
    """SIGTERM to the group of a torchrun launch (scancel): every rank stops at the same step, rank 0
    reports once, last.pt holds the last complete epoch and loads; torchrun itself ends with status 1
    and its own traceback (README, Stops)."""
    proc = torchrun(*ddp_stage2_argv(data_root, ddp_run / "stage1.pt", tmp_path, 20, "--eval-every", "1000"),
                    start_new_session=True)
    sigterm_after_first_epoch(proc, tmp_path)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 30
    assert proc.returncode == 1, err[-3000:]  # torchrun's status for a signalled launch
    stops = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(stops) == 1 and stops[0].startswith(f"stopped by SIGTERM: {tmp_path / 'last.pt'} holds epoch "), err
    assert stops[0].endswith("continue with: the same torchrun command with --resume")
    # the only traceback is torchrun's own (the ranks end with status 130)
    assert err.count("Traceback") <= 1 and ("Traceback" not in err or "SignalException" in err), err[-3000:]
    kept = load(tmp_path / "last.pt")["epoch"]
    assert 1 <= kept < 20
    assert len((tmp_path / "metrics_stage2.jsonl").read_text().splitlines()) == kept
    assert not list(tmp_path.glob("*.tmp*"))


# ----------------------------------------------------------------------------- bad input

def run_stage2(capsys, *argv: str) -> tuple[int, str]:
    code = utils.run_cli(train_stage2.main, list(argv))
    return code, capsys.readouterr().err


def test_missing_stage1_file(capsys, tmp_path):
    code, err = run_stage2(capsys, "--stage1", str(tmp_path / "nope.pt"), "--output-dir", str(tmp_path))
    assert code == 2 and err.startswith("error:") and "nope.pt" in err


def test_foreign_and_code_carrying_checkpoints_are_refused(capsys, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    code, err = run_stage2(capsys, "--stage1", str(foreign), "--output-dir", str(tmp_path))
    assert code == 2 and "not a checkpoint written by this project" in err

    pickled = tmp_path / "pickled.pt"
    torch.save({"kind": "stage1", "payload": Exploit(str(tmp_path / "exploited"))}, pickled)
    code, err = run_stage2(capsys, "--stage1", str(pickled), "--output-dir", str(tmp_path))
    assert code == 2 and "holds Python objects" in err and "not written by this project" in err
    assert "weights_only" not in err and "False" not in err  # never advise switching the protection off
    assert not (tmp_path / "exploited").exists()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(pickled.read_bytes()[:100])
    code, err = run_stage2(capsys, "--stage1", str(truncated), "--output-dir", str(tmp_path))
    assert code == 2 and "not a loadable checkpoint" in err and len(err.strip().splitlines()) == 1
    plain_pickle = tmp_path / "plain.pt"
    plain_pickle.write_bytes(pickle.dumps({"kind": "stage1"}))
    code, err = run_stage2(capsys, "--stage1", str(plain_pickle), "--output-dir", str(tmp_path))
    assert code == 2 and "not written by this project" in err and len(err.strip().splitlines()) == 1

    incomplete = tmp_path / "incomplete.pt"
    torch.save({"kind": "stage2", "model": {}}, incomplete)
    code = utils.run_cli(evaluate.main, ["--checkpoint", str(incomplete)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "lacks epoch, args" in err

    code = utils.run_cli(evaluate.main, ["--checkpoint", str(foreign)])
    assert code == 2 and capsys.readouterr().err.startswith("error:")


class Exploit:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_stage1_file_from_another_dataset_or_architecture(data_root, stage1_dir, capsys, tmp_path):
    ckpt = load(stage1_dir / "stage1.pt")
    ckpt["train_fingerprint"] = "0" * 40
    other = tmp_path / "other.pt"
    utils.save_checkpoint(ckpt, other)
    code, err = run_stage2(capsys, "--stage1", str(other), "--root", data_root, "--output-dir", str(tmp_path))
    assert code == 2 and "re-run train_stage1.py" in err

    code, err = run_stage2(capsys, "--stage1", str(stage1_dir / "stage1.pt"), "--arch", "RN50",
                           "--output-dir", str(tmp_path))
    assert code == 2 and "--arch RN50 disagrees" in err


def test_wrong_root_is_one_clear_line(stage1_dir, tmp_path):
    proc = subprocess.run([sys.executable, "train_stage1.py", "--dataset", "ltcc", "--root", str(tmp_path / "none"),
                           "--arch", "tiny", "--output-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_resume_with_other_arguments_is_refused(data_root, stage1_dir, capsys, tmp_path):
    argv = COMMON + ["--root", data_root, "--stage1", str(stage1_dir / "stage1.pt"), "--output-dir", str(tmp_path),
                     "--epochs", "1", "--batch-size", "16", "--num-instances", "4"]
    assert train_stage2.main(argv) == 0
    capsys.readouterr()  # the first run's progress lines
    code, err = run_stage2(capsys, *argv, "--epochs", "2", "--resume", "--no-sim")
    assert code == 2 and "--epochs 2 (saved: 1)" in err and "--no-sim True (saved: False)" in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --resume continues")
    # a silently different run is what this prevents: --batch-size without --epochs used to re-derive both
    code, err = run_stage2(capsys, "--output-dir", str(tmp_path), "--resume", "--batch-size", "32")
    assert code == 2 and "--batch-size 32 (saved: 16)" in err and "--epochs" not in err.split("differ")[0]
    for script in (train_stage1, ):  # stage 1 refuses the same way
        out = tmp_path / "s1"
        assert script.main(COMMON + ["--root", data_root, "--output-dir", str(out), "--epochs", "1",
                                     "--batch-size", "16"]) == 0
        assert utils.run_cli(script.main, ["--output-dir", str(out), "--resume", "--n-ctx", "2"]) == 2
        assert "--n-ctx 2 (saved: 4)" in capsys.readouterr().err


def test_resume_applies_the_flags_that_may_change(data_root, stage1_dir, tmp_path, capsys):
    """--device, --workers, --log-every, --tensorboard may differ on --resume: applied, with a log line."""
    argv = COMMON + ["--root", data_root, "--stage1", str(stage1_dir / "stage1.pt"), "--output-dir", str(tmp_path),
                     "--epochs", "1", "--batch-size", "16", "--num-instances", "4"]
    assert train_stage2.main(argv) == 0
    assert train_stage2.main(["--output-dir", str(tmp_path), "--resume", "--workers", "1", "--log-every", "5"]) == 0
    out = capsys.readouterr().out
    assert "--resume: --workers 1 instead of the saved 0" in out and "--log-every 5 instead of the saved 1000" in out
    saved = json.loads((tmp_path / "args_stage2.json").read_text())
    assert saved["workers"] == 1 and saved["batch_size"] == 16 and saved["resume"] is True


def test_resume_a_last_pt_written_before_the_method_registry(data_root, stage1_dir, tmp_path, monkeypatch):
    """A run stopped by the version before registry.METHODS (CAL's classifier saved as clothes_classifier, no
    method or masks among its arguments) goes on with this one."""
    original = training.Run.stopped
    with monkeypatch.context() as m:
        m.setattr(training.Run, "stopped", lambda self: original(self) or True)  # a stop after epoch 1
        assert stage2(data_root, stage1_dir, tmp_path) == 130
    state = load(tmp_path / "last.pt")
    state["clothes_classifier"] = {k.removeprefix("adversary."): v for k, v in state.pop("loss").items()}
    del state["args"]["method"], state["args"]["masks"]
    torch.save(state, tmp_path / "last.pt")
    assert train_stage2.main(["--output-dir", str(tmp_path), "--resume"]) == 0
    resumed = load(tmp_path / "last.pt")
    assert resumed["epoch"] == 3 and resumed["args"]["method"] == "sci"
    assert not torch.equal(resumed["loss"]["adversary.weight"], state["clothes_classifier"]["weight"])  # trained on
