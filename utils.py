"""The plumbing every script shares: errors and the CLI runner, devices, seeds, DDP, autocast, logging,
progress, TensorBoard, JSON and checkpoint I/O, and stops (a training run's loop pieces: training.py;
the defaults and argument groups: config.py)."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user (a path, a file, a flag). Scripts print `error: <message>` and exit 2."""


class WriteFailed(UserError):
    """A file could not be written (a full disk or quota); raised by `write_atomic`, so also by
    save_checkpoint, write_json and write_jsonl. `path`: the file; `reason`: why, e.g. "no space left on
    device (1.2 MB free on /runs)"; `existed`: whether a previous file is at `path` (it is unchanged:
    the partial temporary file was removed). The message is one line; a caller adds what the kept
    file holds and how to continue with `with_advice(...)`."""

    def __init__(self, path: str | Path, reason: str, existed: bool, advice: str = ""):
        self.path, self.reason, self.existed, self.advice = Path(path), reason, existed, advice
        kept = f"the existing {self.path} is unchanged" if existed else f"no file was written at {self.path}"
        super().__init__(f"could not write {self.path}: {reason}; {kept}" + (f"; {advice}" if advice else ""))

    def with_advice(self, advice: str) -> WriteFailed:
        """The same error with a sentence appended, e.g. "it holds epoch 12; free space and continue with ..."."""
        return WriteFailed(self.path, self.reason, self.existed, "; ".join(filter(None, (self.advice, advice))))


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when `exc` says the device is full (None for any other error, which then
    propagates as it is). torch.save reports a full disk as a RuntimeError from its zip writer
    ("[enforce fail at inline_container.cc:...] . unexpected pos ..." or "... file write failed")."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for the file system"}[exc.errno]
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "file write failed" in text
                                          or "No space left" in text):
        return "no space left on device"
    return None


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if free < 1000 or unit == "TB":
            return f" ({free:.3g} {unit} free on {folder})" if unit != "bytes" else f" ({free} bytes free on {folder})"
        free /= 1000
    return ""


class TrainingStopped(Exception):
    """The run cannot go on (a non-finite loss); the message says what happened and what was kept."""


_program = False  # run_cli is running the program's own main (`python script.py`), not a call from other code


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None, program: bool | None = None) -> int:
    """Run a script's main; bad input becomes one `error:` line and exit status 2 (argparse's convention).
    `program`: this is the process's program (default: `main` is defined in `__main__`; a package's
    `__main__.py` that calls into its modules says True)."""
    import clip  # late import: clip's own error type is part of the user-error family

    global _program
    outer = _program
    _program = outer or (getattr(main, "__module__", None) == "__main__" if program is None else program)
    # SIGTERM (timeout, scancel) ends a script like Ctrl-C does; the training scripts' StopSignal
    # replaces this handler while they run
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    first = len(WRITTEN)
    try:
        return main(argv)
    except (UserError, clip.CheckpointError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):  # a script without its own StopSignal report
        if _program:  # the program ends now: a repeated signal (scancel's second, Ctrl-C again) must not turn
            ignore_stop_signals()  # 130 into a kill (-15) or strike in a finalizer during the teardown
        print(f"interrupted; {_written_since(first)}", file=sys.stderr)
        return 130
    finally:
        _program = outer
        if signal.getsignal(signal.SIGTERM) is _raise_interrupted:  # a stopped script ignores it: keep that
            signal.signal(signal.SIGTERM, previous)


WRITTEN: list[Path] = []  # every file write_atomic completed in this process, in order (for a stop's report)


def _written_since(first: int) -> str:
    """What a stopped script leaves: the files it completed (each written whole), or nothing."""
    done = list(dict.fromkeys(WRITTEN[first:]))
    if not done:
        return "nothing was written"
    shown = ", ".join(map(str, done[:5])) + (f" and {len(done) - 5} more" if len(done) > 5 else "")
    return f"written before the stop, each complete: {shown}; nothing else was written"


def ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_training(script: str, parse: Callable, train: Callable, argv: list[str] | None) -> int:
    """A training script's main: parse the arguments and train under a StopSignal; a stop ends
    with its one-line report and exit status 130."""
    stop = StopSignal(script, argv)
    try:
        return train(parse(argv), stop)
    except Interrupted:
        return stop.report(get_logger())
    except WriteFailed as exc:  # a full disk: say what the run kept and how to go on, in the one error line
        raise exc.with_advice(f"make room there; {stop.kept}") from None
    except Exception:
        if stop.received:  # a collective broken by the other ranks' stop
            return stop.report(get_logger())
        raise
    finally:
        stop.restore()
        cleanup_distributed()


def _one_line(exc: Exception) -> str:
    """The user-facing line of an error; an error re-raised from a DataLoader worker carries the
    worker's traceback, whose last line is the original message."""
    text = str(exc)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def default_workers(device_type: str) -> int:
    """DataLoader workers for a device: CLIP-ReID's 8 on CUDA (2 cannot decode and augment 384x192 images
    as fast as a GPU trains), 2 on CPU (workers there compete with the training math); never more than
    the machine's CPUs (benchmarks/bench_loader.py measures what a GPU needs)."""
    cpus = os.cpu_count() or 1
    return min(8 if device_type == "cuda" else 2, cpus)


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


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in one epoch: it depends on (seed, epoch) only, so a resumed
    run repeats the epoch exactly."""
    return seed * 1000 + epoch


def configure_determinism(device: torch.device, wanted: bool | None) -> bool:
    """--deterministic: on by default for CPU (same seed, same numbers), off for CUDA, where
    deterministic kernels are slower and cuDNN autotuning is the faster choice. Returns the setting."""
    on = device.type == "cpu" if wanted is None else wanted
    if on and device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; read when its handle is created
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on
    return on


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


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def default_amp_dtype(device_type: str) -> str:
    """--amp-dtype's default: float16 on CUDA (with a gradient scaler, as CLIP-ReID), bfloat16 on CPU,
    whose float16 kernels are slower."""
    return "float16" if device_type == "cuda" else "bfloat16"


def autocast(device: torch.device, enabled: bool, dtype: str | None = None):
    """Mixed precision on either device: `dtype` float16 or bfloat16 (default: default_amp_dtype)."""
    dtype = dtype or default_amp_dtype(device.type)
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[dtype], enabled=enabled)


# ----------------------------------------------------------------------------- logging and progress

def get_logger() -> logging.Logger:
    """The project's logger, as `setup_logging` configured it."""
    return logging.getLogger("sci")


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
    """A progress bar of `total` steps: for a training epoch the running mean of each loss term, the
    learning rate and images/s; for feature extraction (no losses) images/s alone. Redraws in place on a
    terminal; elsewhere (logs, CI) prints a line every `every` steps and at the end. `unit` names the
    steps (e.g. "batches"). `means()` gives the epoch means for the metrics file and the log."""

    def __init__(self, total: int, desc: str, every: int = 20, enabled: bool = True, unit: str = ""):
        self.total, self.desc, self.every, self.enabled, self.unit = total, desc, every, enabled, unit
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.images = 0
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def update(self, step: int, images: int, losses: dict[str, float] | None = None, lr: float | None = None) -> None:
        self.images += images
        for name, value in (losses or {}).items():  # a term may start mid-run (L_cal): mean over its own steps
            self._sums[name] = self._sums.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0) + 1
        if not self.enabled:
            return
        last = step == self.total
        if not self.tty and not last and step % self.every:
            return
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        terms = [f"{step}/{self.total}" + (f" {self.unit}" if self.unit else "")]
        terms += [f"{k} {v:.4g}" for k, v in self.means().items()] + ([f"lr {lr:.3g}"] if lr is not None else [])
        line = f"{self.desc} [{bar}] {' '.join(terms)} {self.images_per_second:.1f} img/s"
        end = "\r" if self.tty and not last else "\n"
        print(line, end=end, file=sys.stderr, flush=True)

    def means(self) -> dict[str, float]:
        return {name: total / self._counts[name] for name, total in self._sums.items()}

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


class TensorBoard:
    """--tensorboard: each epoch's record of metrics_stage*.jsonl as scalars under OUTPUT_DIR/tensorboard/,
    tagged "{stage}/loss/{term}", "{stage}/{lr, lr_factor, images_per_s, skipped_steps}" and
    "{stage}/eval/{setting}/{metric}", at step = the record's epoch. Only rank 0 writes; a no-op when
    off. The package is checked at construction, so a missing one stops the run before it starts."""

    NOT_LOSSES = ("lr", "lr_factor", "images_per_s", "skipped_steps")  # every other number is a loss term's mean

    def __init__(self, out: Path, stage: str, enabled: bool):
        self.log_dir, self.stage, self.enabled = out / "tensorboard", stage, enabled
        self.writer = None  # made at the first record: a run that stops at set-up leaves no empty event file
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._writer_class = SummaryWriter

    def log_epoch(self, record: dict) -> None:
        if not self.enabled or (dist.is_initialized() and dist.get_rank() != 0):
            return
        if self.writer is None:
            self.writer = self._writer_class(str(self.log_dir))
        for tag, value in self._scalars(record):
            self.writer.add_scalar(f"{self.stage}/{tag}", value, record["epoch"])
        self.writer.flush()  # a stopped or killed run keeps every epoch it logged

    def _scalars(self, record: dict) -> list[tuple[str, float]]:
        scalars = [(k if k in self.NOT_LOSSES else f"loss/{k}", v) for k, v in record.items()
                   if k != "epoch" and isinstance(v, (int, float))]
        for setting, values in (record.get("metrics") or {}).items():
            scalars += [(f"eval/{setting}/{name}", v) for name, v in values.items() if v is not None]
        return scalars

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace the file by these records, atomically (on --resume: the checkpoint's history)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _default_mode(path: str) -> None:
    """Temporary files are created private; give the final file the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader never sees half a file."""
    text = json.dumps(obj, indent=2)  # serialised first: an unserialisable object fails before any write
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def args_to_dict(args: argparse.Namespace) -> dict:
    """JSON- and weights_only-safe copy of the arguments (tuples become lists); `given` (which flags
    were typed) describes one command line, not the run, and is left out."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k != "given"}


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(obj: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a checkpoint."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_atomic(path: Path, write: Callable[[str], Any]) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed to `path`: a crash or
    an error never leaves half a file (the temporary one is removed) and the previous file at `path`
    stays as it was. A full disk or quota raises WriteFailed (one line: which file, why, how much
    space is free, that the previous file is unchanged); other errors propagate unchanged."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp" + path.suffix)  # the suffix: torch.export.save checks it
        os.close(fd)
    except OSError as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
        raise WriteFailed(path, reason + _free_space(path.parent if path.parent.exists() else Path(".")), existed) from None
    reason = None
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # a full disk may only show when the data reach it
            os.fsync(f.fileno())
        _default_mode(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        reason = _write_failure(exc)
        if reason is None:
            raise
    finally:
        _remove(tmp)
    if reason is not None:  # here, not in the except clause: its traceback keeps torch's writer (and the
        # removed file's space) alive, and the free space reported should be what a retry would have
        raise WriteFailed(path, reason + _free_space(path.parent), existed)
    WRITTEN.append(path)
    return path


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def load_checkpoint(path: str | Path, kind: str, keys: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint written by this project. `weights_only=True`: a file carrying pickled code
    is refused, never run. `kind` ("stage1" or "stage2") must match the file's own `kind` entry,
    and the file must hold `keys` (besides kind, epoch and args)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path (or --output-dir) and that the "
                        f"previous step finished")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # never repeat torch's text: it advises switching the protection off
        if "Weights only load failed" in str(exc):
            raise UserError(f"{path} holds Python objects or pickle data other than tensors and plain containers, "
                            f"so it was not written by this project; it was not loaded. Pass a stage1.pt, last.pt "
                            f"or best.pt written by train_stage1.py or train_stage2.py") from None
        raise UserError(f"{path} is not a loadable checkpoint of this project ({type(exc).__name__}: the file is "
                        f"truncated or not a PyTorch file); re-run the step that writes it") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in ("stage1", "stage2"):
        raise UserError(f"{path} is not a checkpoint written by this project's training scripts")
    if ckpt["kind"] != kind:
        raise UserError(f"{path} is a {ckpt['kind']} checkpoint, but a {kind} checkpoint is needed here")
    missing = [k for k in ("epoch", "args", *keys) if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it was written by another version of this project "
                        f"or by other code; re-run the step that writes it")
    return ckpt


# ----------------------------------------------------------------------------- stops

class Interrupted(BaseException):
    """A stop was requested and a read-only phase (set-up, feature caching, evaluation) ends at its
    next safe point. A BaseException, like KeyboardInterrupt, so `except Exception` lets it through."""


_active_stop: StopSignal | None = None  # the running script's, for check_stop()


def check_stop() -> None:
    """Raise Interrupted when a stop was requested: long loops that write nothing (feature
    extraction, ranking) call this once per batch or chunk, so a stop takes effect within seconds."""
    if _active_stop is not None:
        _active_stop.check()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_held():
    """Hold SIGINT and SIGTERM while worker processes start (DataLoader iterators, process pools);
    a signal that arrives meanwhile takes effect when the block ends.

    Why: a forked worker keeps the parent's handlers until its initializer (loaders._worker_init)
    ignores the signals, so a group signal in that window killed it ("DataLoader worker is killed
    by signal") or ran the parent's handler in it; the signals stay blocked in the child (the mask
    is inherited) until the initializer has set SIG_IGN, which discards them. And a raising handler
    (run_cli's, KeyboardInterrupt) must not fire inside torch's iterator constructor: a half-built
    iterator's __del__ prints "Exception ignored ... no attribute '_workers_status'". Blocking in
    this thread alone is not enough for that, as any other thread (OpenMP's) may take a signal sent
    to the process, so Python-level handlers are swapped for one that notes the signal; it is
    re-raised once the block has ended."""
    noted: list[int] = []
    previous: dict[int, Any] = {}
    held = True

    def note(signum, frame):
        if held:
            noted.append(signum)
        else:  # the block ended but a restore was cut short: behave as the handler it replaced
            previous[signum](signum, frame)

    if threading.current_thread() is threading.main_thread():  # only there can handlers be set
        for sig in STOP_SIGNALS:
            if callable(signal.getsignal(sig)):  # SIG_IGN / SIG_DFL need no deferral: the mask holds them
                previous[sig] = signal.signal(sig, note)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        held = False
        try:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sig in dict.fromkeys(noted):
                signal.raise_signal(sig)  # pending while blocked here; delivered (once) on the unblock below
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class StopSignal:
    """SIGINT and SIGTERM as terminals (Ctrl-C) and clusters (scancel, timeout) deliver them, to this
    process alone or to its whole group (DataLoader workers ignore them, see loaders._worker_init).

    The handler only notes the signal (raising from an arbitrary frame could land in a fork hook,
    a finalizer or a half-written file). The training loops ask `requested()` after every step;
    read-only phases call `check()` / `check_stop()` and end with `Interrupted`. Either way the
    script ends with `report()`: one line saying what was kept and how to continue, exit status 130.
    A repeated signal (torchrun forwards the one the group already got) changes nothing.
    """

    def __init__(self, script: str, argv: list[str] | None):
        global _active_stop
        self.received: str | None = None
        self.script, self.argv = script, list(sys.argv[1:] if argv is None else argv)
        self.kept = ("nothing new was written; continue with: " + self._command() if "--resume" in self.argv
                     else "no checkpoint was written yet; run the same command again")
        self._pid = os.getpid()
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        _active_stop = self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked helper process (a pool worker) inherited the handler:
            signal.signal(signum, signal.SIG_DFL)  # it ends as it would have without us
            os.kill(os.getpid(), signum)
            return
        self.received = self.received or signal.Signals(signum).name

    def check(self) -> None:
        if self.received:
            raise Interrupted(self.received)

    def requested(self, device: torch.device | None = None) -> bool:
        """Whether to stop now; under DDP every rank gets the same answer (a rank stopping alone
        would leave the others blocked in the next collective)."""
        flag = self.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([float(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.received is None:
                self.received = "a signal to another process"
        return flag

    def _command(self) -> str:
        if dist.is_initialized() and dist.get_world_size() > 1:
            return "the same torchrun command with --resume"
        args = self.argv + ([] if "--resume" in self.argv else ["--resume"])
        return "python " + shlex.join([self.script] + args)

    def keep(self, path: Path, what: str) -> None:
        """Record what a stop now leaves behind (after each checkpoint write)."""
        self.kept = f"{path} holds {what}; continue with: {self._command()}"

    def report(self, log: logging.Logger | None = None) -> int:
        """Print the one line about the stop and return exit status 130."""
        line = f"stopped by {self.received or 'an interrupt'}: {self.kept}"
        if log is not None:
            for handler in log.handlers:  # the log file gets the line too; stderr gets it once
                if isinstance(handler, logging.FileHandler):
                    handler.handle(log.makeRecord(log.name, logging.WARNING, __file__, 0, line, None, None))
        if not dist.is_initialized() or dist.get_rank() == 0:
            start = "\n" if sys.stderr.isatty() else ""  # a progress bar may be drawn in place on this line
            print(start + line, file=sys.stderr, flush=True)
        return 130

    def restore(self) -> None:
        """Put the previous handlers back. After a stop of the script being run as the program
        (`python train_stage2.py`), ignore the signals instead: a repeated one during the
        interpreter's teardown must not turn exit status 130 into a kill."""
        global _active_stop
        _active_stop = None
        # the script is the program, or the program (demo.py) ends with the stage's status: see run_cli
        exiting = self.received is not None and (os.path.basename(sys.argv[0]) == self.script or _program)
        for sig, handler in self._old.items():
            signal.signal(sig, signal.SIG_IGN if exiting else handler)
