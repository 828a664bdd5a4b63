"""Shared pieces of the two training scripts and evaluate.py: errors, seeding, devices,
distributed set-up, logging, progress, checkpoint I/O and the argument groups they share."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

DEFAULT_OUTPUT_DIR = "runs/sci"
DEFAULT_DATA_ROOT = "data"
ARCHS = ("RN50", "ViT-B/16", "tiny")


class UserError(Exception):
    """Bad input from the user (a path, a file, a flag). Scripts print `error: <message>` and exit 2."""


class TrainingStopped(Exception):
    """The run cannot go on (a non-finite loss); the message says what happened and what was kept."""


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's main; bad input becomes one `error:` line and exit status 2 (argparse's convention)."""
    import clip  # late import: clip's own error type is part of the user-error family

    try:
        return main(argv)
    except (UserError, clip.CheckpointError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the training loop's own handler is installed (set-up, caching)
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130


def _one_line(exc: Exception) -> str:
    """The user-facing line of an error; an error re-raised from a DataLoader worker carries the
    worker's traceback, whose last line is the original message."""
    text = str(exc)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


# ----------------------------------------------------------------------------- arguments

def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by train_stage1.py and train_stage2.py, with the same names and meaning."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help="ltcc, prcc, vcclothes, vcclothes_sc, vcclothes_cc, market1501, msmt17, celebreid, "
                        "deepchange or synthetic (default: synthetic; stage 2 defaults to stage 1's)")
    g.add_argument("--root", default=None,
                   help=f"folder holding the dataset's own folder (default: {DEFAULT_DATA_ROOT}; "
                        "synthetic is generated there on first use)")
    g.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input height and width (default: 384 192)")
    g.add_argument("--workers", type=int, default=2, help="data-loading worker processes (default: 2)")

    g = parser.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default=None,
                   help="CLIP backbone; tiny is a narrow random-weight preset for CPU demos (default: RN50)")
    g.add_argument("--weights", default=None,
                   help="pretrained CLIP: a checkpoint path, a model name looked up in ~/.cache/clip "
                        "(or $CLIP_CACHE_DIR), or 'none' for random init (default: the --arch name; "
                        "none for tiny)")
    g.add_argument("--n-ctx", type=int, default=None, help="learnable [X] tokens per prompt, M (default: 4)")
    g.add_argument("--no-sse", action="store_true",
                   help="ablation: one identity prompt, F_ort = F_id, no L_sim (the CLIP-ReID baseline)")
    g.add_argument("--ortho", choices=("paper", "gram-schmidt"), default=None,
                   help="Eq. 4-5 as printed (paper, default) or removal of the F_clo direction (gram-schmidt)")
    g.add_argument("--lambda-id", type=float, default=None, help="lambda_1 of Eq. 8, weight of 1 - sim_id (default: 1)")
    g.add_argument("--lambda-clo", type=float, default=None, help="lambda_2 of Eq. 8, weight of sim_clo (default: 1)")
    g.add_argument("--vit-stride", type=int, default=None,
                   help="ViT patch stride (overlapping patches when below the patch size; default: the patch size)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (default: the paper's, per dataset)")
    g.add_argument("--batch-size", type=int, default=None, help="images per batch (per process under torchrun)")
    g.add_argument("--lr", type=float, default=None, help="base learning rate (default: 3.5e-4)")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay")
    g.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up epochs")
    g.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    g.add_argument("--seed", type=int, default=1, help="random seed; same seed, same numbers on CPU (default: 1)")

    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help=f"where checkpoints and logs go (default: {DEFAULT_OUTPUT_DIR})")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto picks cuda when available (default: auto)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR's last checkpoint, ending exactly as an uninterrupted run")
    g.add_argument("--log-every", type=int, default=20, help="progress line every N steps when not on a terminal")


def fill_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> argparse.Namespace:
    """Replace every None-valued flag by its default (defaults may depend on the dataset)."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def resolve_weights(arch: str, weights: str | None) -> str:
    """--weights default: the arch's OpenAI name; the tiny preset has no pretrained file."""
    if weights is None:
        return "none" if arch == "tiny" else arch
    return weights


# ----------------------------------------------------------------------------- devices, seeds, DDP

def select_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_deterministic() -> None:
    """Same seed, same numbers on CPU; on CUDA the few non-deterministic kernels only warn."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); starts a process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def start_run(args: argparse.Namespace, out: Path, stage: str) -> tuple[torch.device, int, int, logging.Logger]:
    """The opening of both training scripts: device, process group, log, seeds, and the full
    arguments as OUTPUT_DIR/args_{stage}.json. Returns (device, rank, world size, logger)."""
    device = select_device(args.device)
    rank, world = init_distributed(device)
    log = setup_logging(out, stage, rank)
    make_deterministic()
    seed_everything(args.seed)
    if rank == 0:
        write_json(out / f"args_{stage}.json", args_to_dict(args))
    log.info("%s | %s", stage, json.dumps(args_to_dict(args)))
    return device, rank, world, log


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device, enabled: bool):
    """Mixed precision that works on both devices: float16 on CUDA, bfloat16 on CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


# ----------------------------------------------------------------------------- logging and progress

def setup_logging(output_dir: Path | None, name: str, rank: int = 0) -> logging.Logger:
    """Console + OUTPUT_DIR/{name}.log on rank 0; other ranks log warnings only."""
    logger = logging.getLogger("sci")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir is not None and rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(output_dir / f"{name}.log")
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


class Progress:
    """A per-epoch progress bar: loss terms, learning rate and images/s. Redraws in place on a
    terminal; elsewhere (logs, CI) prints a line every `every` steps and at the end."""

    def __init__(self, total: int, desc: str, every: int = 20, enabled: bool = True):
        self.total, self.desc, self.every, self.enabled = total, desc, every, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.images = 0

    def update(self, step: int, images: int, values: dict[str, float]) -> None:
        self.images += images
        if not self.enabled:
            return
        last = step == self.total
        if not self.tty and not last and step % self.every:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        terms = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        line = f"{self.desc} [{bar}] {step}/{self.total} {terms} {self.images / elapsed:.1f} img/s"
        end = "\r" if self.tty and not last else "\n"
        print(line, end=end, file=sys.stderr, flush=True)

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _default_mode(path: str) -> None:
    """Temporary files are created private; give the final file the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2)
        tmp = f.name
    _default_mode(tmp)
    os.replace(tmp, path)


def args_to_dict(args: argparse.Namespace) -> dict:
    """JSON- and weights_only-safe copy of the arguments (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(obj: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | Path, kind: str) -> dict:
    """Read a checkpoint written by this project. `weights_only=True`: a file carrying pickled code
    is refused, never run. `kind` ("stage1" or "stage2") must match the file's own `kind` entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path (or --output-dir) and that the "
                        f"previous step finished")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated zip, not a torch file ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a loadable checkpoint of this project ({first[:200]}); "
                        f"re-run the step that writes it") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in ("stage1", "stage2"):
        raise UserError(f"{path} is not a checkpoint written by this project's training scripts")
    if ckpt["kind"] != kind:
        raise UserError(f"{path} is a {ckpt['kind']} checkpoint, but a {kind} checkpoint is needed here")
    return ckpt


# ----------------------------------------------------------------------------- schedules and signals

def warmup_cosine(epoch: float, epochs: int, warmup: int, base_lr: float, warmup_lr: float, min_lr: float) -> float:
    """Stage-1 learning rate (SPEC section 3): linear warm-up from warmup_lr, then cosine to min_lr."""
    if epoch < warmup:
        return warmup_lr + (base_lr - warmup_lr) * epoch / warmup
    progress = (epoch - warmup) / max(epochs - warmup, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def warmup_multistep(epoch: int, warmup: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    """Stage-2 learning-rate factor (SPEC section 4): linear warm-up from warmup_factor, then ×gamma
    at each milestone."""
    factor = gamma ** sum(epoch >= m for m in milestones)
    if epoch < warmup:
        alpha = epoch / warmup
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step and stops at a clean point."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
