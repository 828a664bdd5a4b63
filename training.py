"""A training run's pieces both stages share: the opening (device, log, seeds, the arguments file),
mixed precision with its non-finite policy, CLIP-ReID's learning-rate schedules and optimizer groups,
and `Run`, the bookkeeping of --resume and of every epoch's end (the checkpoint first, then the metrics
line, then the stop check), so each stage's `train` reads top to bottom as its loop."""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from config import restore_run
from utils import (Progress, StopSignal, TensorBoard, TrainingStopped, append_jsonl, args_to_dict, autocast, barrier,
                   configure_determinism, default_amp_dtype, default_workers, init_distributed, load_checkpoint,
                   save_checkpoint, seed_everything, select_device, setup_logging, write_json, write_jsonl)

MAX_SKIPPED_STEPS = 25  # float16: consecutive skipped steps before the run is declared broken (scale / 2^25)
BIAS_LR_FACTOR = 2.0    # CLIP-ReID's convention: biases learn twice as fast


# ----------------------------------------------------------------------------- the opening

def start_run(args: argparse.Namespace, out: Path, stage: str) -> tuple[torch.device, int, int, logging.Logger]:
    """The opening of both training scripts: device, process group, log, determinism, seeds, and the
    full arguments as OUTPUT_DIR/args_{stage}.json. Returns (device, rank, world size, logger)."""
    device = select_device(args.device)
    args.deterministic = configure_determinism(device, args.deterministic)
    if args.amp is None:  # CLIP-ReID trains under autocast + GradScaler on the GPU; CPU runs stay float32
        args.amp = device.type == "cuda"
    args.amp_dtype = args.amp_dtype or default_amp_dtype(device.type)
    if args.workers is None:
        args.workers = default_workers(device.type)
    rank, world = init_distributed(device)
    log = setup_logging(out, stage, rank)
    seed_everything(args.seed)
    if rank == 0:
        write_json(out / f"args_{stage}.json", args_to_dict(args))
    log.info("%s | %s", stage, json.dumps(args_to_dict(args)))
    return device, rank, world, log


def note_short_schedule(log: logging.Logger, args: argparse.Namespace, rates: list[float]) -> None:
    """One log line when the run ends inside its warm-up (e.g. --epochs 2 with the recipe's 5 or 10
    warm-up epochs): every epoch then trains below --lr, which is easy to miss."""
    if args.epochs <= args.warmup_epochs:
        log.warning("WARNING: --epochs %d ends inside the %d warm-up epochs, so the learning rate peaks at %.3g, "
                    "below --lr %g; pass a smaller --warmup-epochs for a short run", args.epochs,
                    args.warmup_epochs, max(rates), args.lr)


# ----------------------------------------------------------------------------- mixed precision

def _finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank: under DDP all ranks stop together, or none does
    (a rank stopping alone would leave the others blocked in the next gradient all-reduce)."""
    finite = torch.isfinite(loss.detach()).all().float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


class MixedPrecision:
    """--amp for a training loop: the autocast region, and an optimizer step that follows the
    non-finite policy. float16 uses a gradient scaler: a step whose loss or gradients are not finite
    is skipped (and counted) and the scale halves; only MAX_SKIPPED_STEPS consecutive skips stop the
    run. In float32 and bfloat16 (no scaler) a non-finite loss stops the run at once."""

    def __init__(self, device: torch.device, enabled: bool, dtype: str | None = None):
        self.device, self.enabled = device, enabled
        self.dtype = dtype or default_amp_dtype(device.type)
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and self.dtype == "float16")
        self.skipped = 0      # steps skipped since the last `take_skipped()`
        self.consecutive = 0  # skipped steps in a row

    def autocast(self):
        return autocast(self.device, self.enabled, self.dtype)

    @property
    def scaling(self) -> bool:
        return self.scaler.is_enabled()

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, what: str,
             shared: list[torch.nn.Parameter] = ()) -> bool:
        """Backward and optimizer step for `loss`; False when float16 skipped it. `what` completes
        the stop message: "<what> is not finite ...", e.g. "stage-2 loss at epoch 3 step 7; last.pt keeps ...".
        `shared`: parameters outside DDP's model whose gradients are averaged over the processes first."""
        if not self.scaling:
            if not _finite_everywhere(loss):
                raise TrainingStopped(f"non-finite {what} (try a lower --lr, or drop --amp)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(shared)
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        average_gradients(shared)  # scaled gradients: averaging commutes with the scale
        self.scaler.step(optimizer)  # skipped when the unscaled gradients hold inf or NaN
        self.scaler.update()
        if self.scaler.get_scale() < scale:  # the scale only drops when the step was skipped
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive >= MAX_SKIPPED_STEPS:
                raise TrainingStopped(f"{self.consecutive} float16 steps in a row had non-finite gradients "
                                      f"(loss scale now {self.scaler.get_scale():g}); last: {what} (try a lower "
                                      f"--lr, or --amp-dtype bfloat16, or drop --amp)")
            return False
        self.consecutive = 0
        return True

    def state_dict(self) -> dict:
        return self.scaler.state_dict()  # {} when there is no scaler

    def load_state_dict(self, state: dict) -> None:
        if state and self.scaling:  # a run resumed with another --amp starts a fresh scale
            self.scaler.load_state_dict(state)

    def take_skipped(self) -> int:
        """Steps skipped since the last call (for the epoch's log line)."""
        n, self.skipped = self.skipped, 0
        return n


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters that DDP does not hold (a loss module's, an adversary's) over
    the processes, so every process takes the same step; nothing without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def epoch_summary(log: logging.Logger, bar: Progress, amp: MixedPrecision, epoch: int, epochs: int) -> dict:
    """An epoch's entries for metrics_stage*.jsonl, also logged: the mean of every loss term and,
    under float16, the steps skipped for non-finite gradients."""
    record = {k: round(v, 6) for k, v in bar.means().items()}
    log.info("epoch %d/%d: %s", epoch + 1, epochs, " ".join(f"{k} {v:.4f}" for k, v in bar.means().items()))
    if amp.scaling:
        record["skipped_steps"] = amp.take_skipped()
        if record["skipped_steps"]:
            log.info("epoch %d: skipped %d float16 steps with non-finite gradients (loss scale now %g)",
                     epoch + 1, record["skipped_steps"], amp.scaler.get_scale())
    return record


# ----------------------------------------------------------------------------- schedules

def warmup_cosine(epoch: int, epochs: int, warmup: int, base_lr: float, warmup_lr: float, min_lr: float) -> float:
    """Stage-1 learning rate of epoch `epoch`, counted from 1 (METHOD.md section 3), as CLIP-ReID's
    stage-1 processor steps timm's CosineLRScheduler (t_initial = epochs, warmup_t = warmup, no warm-up
    prefix, one cycle): `scheduler.step(epoch)` before each epoch, so epoch 1 is one warm-up step in,
    and the cosine runs over the absolute epoch, reaching min_lr at the last one."""
    if epoch < warmup:
        return warmup_lr + epoch * (base_lr - warmup_lr) / warmup
    if epoch >= epochs:  # timm: past the single cycle the rate is lr_min
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def warmup_multistep(epoch: int, warmup: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    """Stage-2 learning-rate factor of epoch `epoch`, counted from 1 (METHOD.md section 4), as CLIP-ReID's
    stage-2 processor steps its WarmupMultiStepLR (`scheduler.step()` before each epoch, so the scheduler's
    last_epoch is the epoch's number): linear warm-up from warmup_factor, then x gamma from each milestone."""
    factor = gamma ** sum(epoch >= m for m in milestones)
    if epoch < warmup:
        alpha = epoch / warmup
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


# ----------------------------------------------------------------------------- the run's bookkeeping

class Run:
    """One training run's files and state around its loop: --resume reads the progress checkpoint and
    restores the run's settings (`Run(...)`), `open` starts the device, log and TensorBoard, `resume`
    restores the history, and per epoch `record`, `save` (progress checkpoint, rank 0) and `log_epoch`
    (metrics_{stage}.jsonl and TensorBoard, never ahead of what is saved), then `stopped`."""

    def __init__(self, args: argparse.Namespace, stop: StopSignal, stage: str, checkpoint: str,
                 keys: tuple[str, ...], comparable: Callable[[str, Any, dict], Any] | None = None):
        self.out = Path(args.output_dir)
        self.path, self.stage, self.stop = self.out / checkpoint, stage, stop
        self.state: dict | None = None
        self.notes: list[str] = []
        self.history: list[dict] = []
        if args.resume:  # the saved run's settings, whatever this command line leaves out
            self.state = load_checkpoint(self.path, stage, keys)
            args, self.notes = restore_run(args, self.state["args"], self.path, comparable)
        self.args = args
        self.where = f"{self.path} keeps the last good epoch"  # completes a stop message

    def open(self, args: argparse.Namespace) -> logging.Logger:
        """Device, process group, log and TensorBoard for the run's final settings `args`."""
        self.args = args
        self.board = TensorBoard(self.out, self.stage, args.tensorboard)  # a missing package stops here, first
        self.device, self.rank, self.world, self.log = start_run(args, self.out, self.stage)
        for note in self.notes:
            self.log.info(note)
        return self.log

    def resume(self) -> int:
        """The epochs the saved state holds (0 for a new run); the metrics file is rewritten to say
        what the checkpoint holds, not what a stopped run appended after it."""
        if self.state is None:
            return 0
        self.history = self.state["history"]
        self.rewrite_metrics()
        self.stop.keep(self.path, f"epoch {self.state['epoch']} of {self.args.epochs}")
        self.log.info("resumed from %s after epoch %d", self.path, self.state["epoch"])
        return self.state["epoch"]

    def rewrite_metrics(self) -> None:
        """metrics_{stage}.jsonl from the history (rank 0)."""
        if self.rank == 0:
            write_jsonl(self.out / f"metrics_{self.stage}.jsonl", self.history)

    def record(self, epoch: int, bar: Progress, amp: MixedPrecision, **values: float) -> dict:
        """Epoch `epoch`'s (from 0) entry of the history: `values`, images/s and the loss means."""
        record = {"epoch": epoch + 1, **values, "images_per_s": round(bar.images_per_second, 1),
                  **epoch_summary(self.log, bar, amp, epoch, self.args.epochs)}
        self.history.append(record)
        return record

    def save(self, state: dict, epochs_done: int) -> None:
        """The progress checkpoint (rank 0); every rank's stop report then names it."""
        if self.rank == 0:
            save_checkpoint(state, self.path)
        self.stop.keep(self.path, f"epoch {epochs_done} of {self.args.epochs}")

    def log_epoch(self, record: dict) -> None:
        if self.rank == 0:
            append_jsonl(self.out / f"metrics_{self.stage}.jsonl", record)
            self.board.log_epoch(record)

    def stopped(self) -> bool:
        """Whether a stop was asked for, decided by all processes together after the epoch."""
        barrier()
        return self.stop.requested(self.device)

    def close(self) -> None:
        self.board.close()


# ----------------------------------------------------------------------------- optimizer groups

def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float,
                 bias_lr_factor: float = BIAS_LR_FACTOR) -> list[dict]:
    """Biases at `bias_lr_factor` times the rate (CLIP-ReID's 2; CSSC's 1); each group keeps its base
    rate for the schedule."""
    named = [(n, p) for n, p in named if p.requires_grad]
    weights = [p for n, p in named if not n.endswith("bias")]
    biases = [p for n, p in named if n.endswith("bias")]
    return [{"params": weights, "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
            {"params": biases, "lr": lr * bias_lr_factor, "base_lr": lr * bias_lr_factor,
             "weight_decay": weight_decay}]


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
