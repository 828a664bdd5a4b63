"""SCI's Table I with one command: stage 1, stage 2 and evaluation of last.pt for every method x
dataset x seed, then Rank-1 / mAP as mean ± std over the seeds beside the published numbers.

    python benchmarks/reproduce.py --root /data --datasets ltcc prcc vcclothes --arch RN50 --seeds 3
    python benchmarks/reproduce.py --root /data --methods sci cssc   # SCI and CSSC side by side
    python benchmarks/reproduce.py --root /data --methods sci clipreid ccaf csgn --datasets prcc \
        --masks prcc=/data/PRCC_parsing                              # the CLIP-based methods
    python benchmarks/reproduce.py --root /data --gpus 4     # up to 4 runs at once, one per GPU
    python benchmarks/reproduce.py --smoke                   # the whole grid, tiny model, synthetic data

Each run has its own folder OUTPUT_DIR/{dataset}/{arch}/seed{s}/ for SCI (OUTPUT_DIR/{dataset}/{method}/
seed{s}/ for another method: the CLIP-based ones on --arch, CSSC on its own backbone) and the recipe defaults (config.RECIPES,
config.DATASET_RECIPES) with --seed s; a method without stage 1 runs stage 2 and the evaluation. The numbers are evaluate.py's for last.pt:
best.pt is selected on the test protocols (README, *Method notes*). Running the command again skips
finished runs and resumes interrupted ones with the scripts' own --resume; a run folder made with
other arguments is refused. Writes OUTPUT_DIR/results.md (also printed) and OUTPUT_DIR/results.json.

Without --gpus the runs go one after another in this process (as benchmarks/ablation.py's): no
Python and torch start-up per step, and a Ctrl-C reaches the running script's own stop handling.
With --gpus N each step is a subprocess that sees one GPU (CUDA_VISIBLE_DEVICES), its output in
the run folder (train_stage1.out, train_stage2.out, evaluate.out).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import config  # noqa: E402
import datasets  # noqa: E402
import evaluate  # noqa: E402
import registry  # noqa: E402
import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
import utils  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON: tuple[str, ...] = (sys.executable,)  # what runs a script under --gpus (tests put a stand-in after it)
RECORD = "reproduce_run.json"  # in each run folder: the arguments it was made with
SCRIPTS = {"train_stage1.py": train_stage1.main, "train_stage2.py": train_stage2.main, "evaluate.py": evaluate.main}

# SCI's published Rank-1 / mAP (%), Table I of the paper as METHOD.md section 10 transcribes it
# ("SCI RN50" and "SCI ViT-B/16" rows). Keys are the protocol names evaluate.py writes for each
# dataset (PRCC: sc/cc; LTCC and VC-Clothes: general/cc among others), in Table I's column order.
PUBLISHED: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "RN50": {"ltcc": {"general": (75.7, 40.6), "cc": (42.1, 18.6)},
             "prcc": {"sc": (99.6, 97.7), "cc": (59.8, 56.2)},
             "vcclothes": {"general": (94.9, 89.2), "cc": (89.2, 83.1)}},
    "ViT-B/16": {"ltcc": {"general": (79.9, 44.4), "cc": (45.9, 21.6)},
                 "prcc": {"sc": (100.0, 99.4), "cc": (62.8, 60.0)},
                 "vcclothes": {"general": (95.4, 91.6), "cc": (91.7, 87.5)}},
}
TABLE_I = tuple(PUBLISHED["RN50"])  # the datasets --datasets takes
# the other methods' published numbers, where their papers give them (none: the cell shows "–"), and
# whose words they are; each trains on its own backbone, the first of its registry.METHODS entry's archs
OTHER_PUBLISHED: dict[str, tuple[str, dict[str, dict[str, tuple[float, float]]]]] = {
    "clipreid": ("CLIP-ReID RN50 as reproduced by SCI's authors, Table I (the dagger row)",
                 {"ltcc": {"general": (73.0, 36.5), "cc": (38.3, 15.9)}, "prcc": {"sc": (100.0, 99.5), "cc": (57.0, 55.3)},
                  "vcclothes": {"general": (93.1, 86.9), "cc": (85.9, 79.3)}}),
    "cssc": ("CSSC ResNet-50, the authors' README and paper (METHOD.md section 12)",
             {"ltcc": {"general": (78.1, 40.2), "cc": (43.6, 18.6)}, "prcc": {"sc": (100.0, 99.1), "cc": (65.5, 63.0)}}),
    "ccaf": ("CCAF (RECONSTRUCTED here), PRCC as quoted by a later paper's table, unverified (METHOD.md section 13)",
             {"prcc": {"cc": (70.4, 63.7)}}),
    "csgn": ("CSGN (RECONSTRUCTED here): no published numbers found (METHOD.md section 14)", {}),
}
PUBLISHED_ARCH = {"clipreid": "RN50"}  # a CLIP-based method's published row holds for this --arch only
METHOD_CHOICES = ("sci", *OTHER_PUBLISHED)  # what --methods takes
LABELS = {"ltcc": "LTCC", "prcc": "PRCC", "vcclothes": "VC-Clothes", "general": "general", "cc": "CC", "sc": "SC"}
# --smoke: the tiny random-init model at 64x32, one stage-1 and two stage-2 epochs (CAL starts in the
# second), small batches; stage 2 takes the architecture, weights and image size from stage1.pt
SMOKE_STAGE1 = ("--arch", "tiny", "--weights", "none", "--img-size", "64", "32", "--epochs", "1",
                "--batch-size", "16")
SMOKE_STAGE2 = ("--epochs", "2", "--batch-size", "16")
# --smoke for a method without stage 1: its own backbone at random init, as small as it allows
SMOKE_OTHER = {"cssc": ("--weights", "none", "--img-size", "128", "8", "--epochs", "1", "--batch-size", "8",
                        "--tri-start", "0")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="folder holding the datasets' own folders (README, *Datasets*); with --smoke: "
                                  f"where the synthetic benchmark is, or is made (default: {config.DEFAULT_DATA_ROOT})")
    p.add_argument("--datasets", nargs="+", default=list(TABLE_I), metavar="NAME",
                   help=f"any of {', '.join(TABLE_I)} (default: all)")
    p.add_argument("--methods", nargs="+", choices=METHOD_CHOICES, default=["sci"],
                   help="methods trained side by side (registry.METHODS), each beside its published numbers "
                        "(default: sci)")
    p.add_argument("--masks", nargs="+", default=[], metavar="DATASET=DIR",
                   help="part masks for ccaf, per dataset (SCHP label PNGs, masks.py), e.g. prcc=/data/PRCC_parsing")
    p.add_argument("--arch", choices=tuple(PUBLISHED), default="RN50",
                   help="SCI's backbone, and whose published numbers its rows compare with (default: %(default)s; "
                        "another method trains on its own)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N per dataset (default: %(default)s)")
    p.add_argument("--gpus", type=int, help="run up to N runs at once, one per GPU, as subprocesses with "
                                            "--device cuda (default: one after another in this process)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="without --gpus: where the runs train (default: auto)")
    p.add_argument("--workers", type=int, help="data-loading processes per run (default: the scripts' own; "
                                               "0 with --smoke)")
    p.add_argument("--output-dir", help="where every run, results.md and results.json go; finished runs there are "
                                         "skipped (default: runs/reproduce, runs/reproduce-smoke with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="the whole grid in minutes: the tiny random-init model at 64x32 for 1 + 2 epochs, on the "
                        "synthetic benchmark under --root standing in for every dataset (rows keep the requested "
                        "names, to exercise the table; the numbers mean nothing for SCI)")
    args = p.parse_args(argv)
    unknown = [d for d in args.datasets if d not in TABLE_I]
    if unknown:
        raise utils.UserError(f"unknown dataset {', '.join(unknown)}; Table I has {', '.join(TABLE_I)}")
    args.datasets = list(dict.fromkeys(args.datasets))
    args.methods = list(dict.fromkeys(args.methods))
    pairs = [item.partition("=") for item in args.masks]
    if any(not sep or name not in TABLE_I for name, sep, _ in pairs):
        raise utils.UserError(f"--masks {' '.join(args.masks)}: expected DATASET=DIR with DATASET one of "
                              f"{', '.join(TABLE_I)}, e.g. --masks prcc=/data/PRCC_parsing")
    args.masks = {name: folder for name, _, folder in pairs}
    unread = sorted(set(args.masks) - set(args.datasets)) or (list(args.masks) if args.smoke or not any(
        registry.method_of(m).extras for m in args.methods) else [])
    if unread:  # masks nobody reads would be dropped silently
        raise utils.UserError(f"--masks {', '.join(unread)}: only ccaf reads part masks, for a dataset of --datasets and "
                              f"not with --smoke (the synthetic world has its own); drop them")
    if args.seeds < 1:
        raise utils.UserError(f"--seeds {args.seeds}: need at least 1 seed")
    if args.gpus is not None and args.gpus < 1:
        raise utils.UserError(f"--gpus {args.gpus}: need at least 1 GPU (leave it out to run on --device)")
    if args.gpus is not None and args.device == "cpu":
        raise utils.UserError("--gpus runs on CUDA devices and --device cpu asks for the CPU; drop one of them")
    if args.workers is not None and args.workers < 0:
        raise utils.UserError(f"--workers {args.workers}: must be >= 0")
    if args.root is None and not args.smoke:
        raise utils.UserError("--root is needed: the folder holding LTCC_ReID, prcc and VC-Clothes (README, "
                              "*Datasets*); or try the whole grid on synthetic data with --smoke")
    args.root = args.root or config.DEFAULT_DATA_ROOT
    args.output_dir = args.output_dir or ("runs/reproduce-smoke" if args.smoke else "runs/reproduce")
    if args.smoke and args.workers is None:
        args.workers = 0
    return args


# ----------------------------------------------------------------------------- runs and steps

@dataclass(frozen=True)
class Run:
    """One dataset x seed. stage1/stage2/evaluate are the arguments that define its result: every
    flag but where it writes (--output-dir, --checkpoint) and where it runs (--device, --workers)."""
    dataset: str
    seed: int
    folder: Path
    stage1: tuple[str, ...]   # empty for a method without stage 1
    stage2: tuple[str, ...]
    evaluate: tuple[str, ...] = ()
    method: str = "sci"
    flip: bool = False        # the evaluation its recipe makes (CSSC's flip test)

    @property
    def label(self) -> str:
        return ("" if self.method == "sci" else f"{self.method} ") + f"{self.dataset} seed {self.seed}"

    @property
    def data(self) -> dict[str, str]:
        """--dataset and --root of the run's first step."""
        return _flags(list(self.stage1 or self.stage2))

    @property
    def record(self) -> dict[str, list[str]]:
        return {"stage1": list(self.stage1), "stage2": list(self.stage2), "evaluate": list(self.evaluate)}


@dataclass(frozen=True)
class Step:
    name: str                 # "stage 1", "stage 2", "evaluate"
    script: str               # a key of SCRIPTS
    argv: tuple[str, ...]

    @property
    def title(self) -> str:
        return self.name + (" (resumed)" if "--resume" in self.argv else "")


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every method x dataset x seed, in that order. --smoke trains on the synthetic benchmark in each
    one's place."""
    arch = "tiny" if args.smoke else args.arch
    runs = []
    for method in args.methods:
        for name in args.datasets:
            for seed in range(1, args.seeds + 1):
                data = ["--dataset", "synthetic" if args.smoke else name, "--root", args.root]
                if method == "sci":
                    folder = Path(args.output_dir) / name / arch.replace("/", "-") / f"seed{seed}"
                    stage1 = [*data, *(SMOKE_STAGE1 if args.smoke else ("--arch", arch)), "--seed", str(seed)]
                    stage2 = ["--seed", str(seed), *(SMOKE_STAGE2 if args.smoke else ())]
                    runs.append(Run(name, seed, folder, tuple(stage1), tuple(stage2)))
                    continue
                if registry.method_of(method).needs_stage1:  # two stages on SCI's backbone, its own stage 1
                    stage1 = [*data, *(SMOKE_STAGE1 if args.smoke else ("--arch", arch)), "--method", method,
                              *masks_flags(args, name, method), "--seed", str(seed)]
                    stage2 = ["--method", method, "--seed", str(seed), *(SMOKE_STAGE2 if args.smoke else ())]
                    runs.append(Run(name, seed, Path(args.output_dir) / name / method / f"seed{seed}", tuple(stage1),
                                    tuple(stage2), method=method))
                    continue
                own = registry.method_of(method).archs[0]
                stage2 = [*data, "--method", method, *(SMOKE_OTHER[method] if args.smoke else ()), "--seed", str(seed)]
                flip = bool(config.recipe(own, data[1])["stage2_flip_test"])
                runs.append(Run(name, seed, Path(args.output_dir) / name / method / f"seed{seed}", (), tuple(stage2),
                                method=method, flip=flip))
    return runs


def masks_flags(args: argparse.Namespace, dataset: str, method: str) -> tuple[str, ...]:
    """--masks DIR for a method whose stage 1 reads part masks (CCAF), from --masks DATASET=DIR."""
    if args.smoke or not registry.method_of(method).extras:
        return ()
    return ("--masks", args.masks[dataset]) if dataset in args.masks else ()


def runtime_flags(device: str, workers: int | None) -> tuple[str, ...]:
    """Where a step runs: not part of a run's identity (a run may resume on another device)."""
    return ("--device", device, *(() if workers is None else ("--workers", str(workers))))


def read_results(folder: Path) -> dict:
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def evaluated(run: Run) -> dict | None:
    """evaluate.py's metrics of this run's last.pt with the default protocol (no re-ranking or
    single-shot; the flip test where the method's recipe has it) on the run's own dataset, with every protocol Table I publishes for it; None when
    there are none (an evaluation of best.pt, a folder search or one --setting does not count)."""
    folder = run.folder
    record = read_results(folder).get("evaluate")
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        return None
    plain = not record.get("single_shot") and bool(record.get("flip")) == run.flip and record.get("rerank") is None \
        and "query" not in record
    same = Path(str(record.get("source"))).resolve() == (folder / "last.pt").resolve()
    trained = run.data["--dataset"]
    complete = all(isinstance(record["metrics"].get(p), dict) for p in PUBLISHED["RN50"][run.dataset])
    return record["metrics"] if plain and same and complete and record.get("dataset") == trained else None


def pending_steps(run: Run, runtime: tuple[str, ...]) -> list[Step]:
    """What a run still needs, from its folder: a stage without its final product runs again, with
    --resume where its progress checkpoint (stage1_last.pt, last.pt) is there."""
    f, out = run.folder, ("--output-dir", str(run.folder))
    steps = []
    if run.stage1 and not (f / train_stage1.CHECKPOINT).is_file():
        resume = ("--resume",) if (f / train_stage1.PROGRESS).is_file() else ()
        steps.append(Step("stage 1", "train_stage1.py", (*run.stage1, *out, *runtime, *resume)))
    if "metrics" not in read_results(f):
        resume = ("--resume",) if (f / "last.pt").is_file() else ()
        steps.append(Step("stage 2", "train_stage2.py", (*run.stage2, *out, *runtime, *resume)))
    if evaluated(run) is None:
        steps.append(Step("evaluate", "evaluate.py", ("--checkpoint", str(f / "last.pt"), *run.evaluate, *runtime)))
    return steps


def _flags(argv: list[str]) -> dict[str, str]:
    """--flag -> its values, e.g. {"--img-size": "64 32", "--resume": ""}."""
    flags: dict[str, list[str]] = {}
    key = ""
    for item in argv:
        if item.startswith("--"):
            key = item
            flags[key] = []
        else:
            flags.setdefault(key, []).append(item)
    return {k: " ".join(v) for k, v in flags.items()}


def _difference(recorded: dict, wanted: dict[str, list[str]]) -> str:
    """'stage 1 --root: data there, /data now; ...' for the refusal message."""
    parts = []
    for step, argv in wanted.items():
        old, new = _flags(recorded.get(step) or []), _flags(argv)
        for flag in dict.fromkeys([*old, *new]):
            if old.get(flag) != new.get(flag):
                there = "absent" if flag not in old else old[flag] or "given"
                now = "absent" if flag not in new else new[flag] or "given"
                parts.append(f"{step.replace('stage', 'stage ')} {flag}: {there} there, {now} now")
    return "; ".join(parts) or "another format"


def check_folder(run: Run) -> None:
    """Refuse a run folder made with other arguments, or by something other than this script."""
    path = run.folder / RECORD
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except ValueError:
            recorded = None
        if recorded != run.record:
            what = _difference(recorded, run.record) if isinstance(recorded, dict) else f"{RECORD} is unreadable"
            raise utils.UserError(f"{run.folder} holds a run made with other arguments ({what}); pass another "
                                  f"--output-dir, or delete that folder to start the run again")
    elif run.folder.is_dir() and any(run.folder.iterdir()):
        raise utils.UserError(f"{run.folder} holds files that reproduce.py did not make (no {RECORD}); pass another "
                              f"--output-dir, or move them away")


def start_run(run: Run) -> None:
    """Record the run's arguments before its first step, so a stopped run is recognised later."""
    if not (run.folder / RECORD).is_file():
        utils.write_json(run.folder / RECORD, run.record)


def check_data(runs: list[Run]) -> None:
    """Parse each dataset that a run still trains on, so that a wrong --root stops the grid before any
    training (and the synthetic benchmark is generated once, here, not by concurrent runs)."""
    for dataset, root in dict.fromkeys((r.data["--dataset"], r.data["--root"]) for r in runs):
        datasets.build_dataset(dataset, root)


# ----------------------------------------------------------------------------- one after another

def run_in_process(runs: list[Run], runtime: tuple[str, ...]) -> None:
    """Each step through its script's main(argv) in this process. A stopped step (status 130) stops the
    grid: its script has kept its checkpoint, and the next call resumes."""
    for i, run in enumerate(runs, 1):
        steps = pending_steps(run, runtime)
        print(f"[{i}/{len(runs)}] {run.label}: {', '.join(s.title for s in steps)} in {run.folder}", flush=True)
        start_run(run)
        for step in steps:
            try:
                code = SCRIPTS[step.script](list(step.argv))
            except utils.UserError as exc:  # the training scripts raise; evaluate.py prints and returns 2
                raise utils.UserError(f"{run.label}, {step.name}: {exc}") from None
            except utils.TrainingStopped as exc:
                raise utils.TrainingStopped(f"{run.label}, {step.name}: {exc}") from None
            if code == 130:
                raise utils.Interrupted(f"{step.name} of {run.folder}")
            if code:
                raise utils.TrainingStopped(f"{run.label}: {step.name} ended with status {code} (its message is "
                                            f"above; log in {run.folder})")


# ----------------------------------------------------------------------------- --gpus

def gpu_command(step: Step, gpu: int, environ: dict[str, str] | None = None,
                gpus: int = 1) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one step on GPU `gpu` (0-based): its script in a fresh
    Python that sees that one GPU. Indices count among the GPUs this process sees, so a
    CUDA_VISIBLE_DEVICES=2,3 here gives the steps 2 and 3. OMP_NUM_THREADS shares the cores between
    the `gpus` concurrent runs unless it is set."""
    environ = dict(os.environ if environ is None else environ)
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    env = {**environ, "CUDA_VISIBLE_DEVICES": visible[gpu] if visible else str(gpu)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    return [*PYTHON, str(REPO / step.script), *step.argv], env


class Children:
    """The running --gpus subprocesses. Each has its own process group, and a SIGINT or SIGTERM to this
    script (a terminal's Ctrl-C to the whole group, `timeout`, or a kill of this process alone) is
    passed to each child's group exactly once. The training scripts' StopSignal would ignore a
    repeat, but evaluate.py and a script still starting up handle only the first one cleanly."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.received: str | None = None

    def start(self, command: list[str], env: dict[str, str], log) -> subprocess.Popen | None:
        with self.lock:  # no child starts after a stop has been passed on
            if self.received:
                return None
            proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    process_group=0)
            self.running.add(proc)
            return proc

    def wait(self, proc: subprocess.Popen) -> int:
        code = proc.wait()
        with self.lock:
            self.running.discard(proc)
        return code

    def forward(self, signum: int, frame) -> None:
        """The signal handler (main thread, which never holds the lock itself)."""
        with self.lock:
            self.received = self.received or signal.Signals(signum).name
            for proc in self.running:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def gpu_worker(gpu: int, todo: queue.Queue, children: Children, failures: list[str], runtime: tuple[str, ...],
               gpus: int) -> None:
    """Takes runs off the queue and runs their steps on GPU `gpu` until the queue is empty, a stop
    arrives, or any run failed (runs already going elsewhere finish)."""
    while children.received is None and not failures:
        try:
            run = todo.get_nowait()
        except queue.Empty:
            return
        try:
            start_run(run)
            for step in pending_steps(run, runtime):
                command, env = gpu_command(step, gpu, gpus=gpus)
                out = run.folder / f"{Path(step.script).stem}.out"
                print(f"[gpu {gpu}] {run.label}: {step.title} (output in {out})", flush=True)
                with open(out, "a") as log:
                    proc = children.start(command, env, log)
                    code = None if proc is None else children.wait(proc)
                if proc is None or children.received:
                    return
                if code:
                    failures.append(f"{run.label}: {step.name} ended with status {code}; last lines of {out}:\n"
                                    f"{_tail(out)}")
                    return
            print(f"[gpu {gpu}] {run.label}: done", flush=True)
        except Exception as exc:  # noqa: BLE001 (an unwritable folder...): reported like a failed step
            failures.append(f"{run.label}: {type(exc).__name__}: {exc}")
            return


def run_on_gpus(runs: list[Run], gpus: int, runtime: tuple[str, ...]) -> None:
    """Up to `gpus` runs at once, one per GPU, each step a subprocess."""
    todo: queue.Queue = queue.Queue()
    for run in runs:
        todo.put(run)
    children, failures = Children(), []
    threads = [threading.Thread(target=gpu_worker, args=(i, todo, children, failures, runtime, gpus), daemon=True)
               for i in range(min(gpus, len(runs)))]
    previous = {sig: signal.signal(sig, children.forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # short waits: the signal handler runs in this thread
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if children.received:
        raise utils.Interrupted(children.received)
    if failures:
        for text in failures:
            print(text, file=sys.stderr)
        raise utils.TrainingStopped(f"{len(failures)} run(s) failed (above); the others are kept, and the same "
                                    f"command continues the grid")


# ----------------------------------------------------------------------------- the table

def summarise(runs: list[Run], args: argparse.Namespace) -> dict:
    """results.json: per method, dataset and protocol, Rank-1 and mAP per seed, their mean and sample
    standard deviation, and the published value (None where the method's paper gives none)."""
    methods = {}
    for method in args.methods:
        if method == "sci":
            arch, trained = args.arch, "tiny" if args.smoke else args.arch
            source, published = f"SCI {args.arch}, Table I of the paper (METHOD.md section 10)", PUBLISHED[args.arch]
        else:
            arch = trained = registry.method_of(method).archs[0]
            source, published = OTHER_PUBLISHED[method]
            if registry.method_of(method).needs_stage1:  # on SCI's backbone
                arch, trained = args.arch, "tiny" if args.smoke else args.arch
                if PUBLISHED_ARCH.get(method, arch) != arch:  # e.g. CLIP-ReID's row is RN50's
                    source, published = f"{source}; none for {arch}", {}
        table: dict[str, dict] = {}
        for name in args.datasets:
            mine = [r for r in runs if r.dataset == name and r.method == method]
            metrics = [evaluated(r) for r in mine]
            lacking = next((r for r, m in zip(mine, metrics) if m is None), None)
            if lacking is not None:
                raise utils.UserError(f"{lacking.label}: {lacking.folder / 'results.json'} holds no evaluation of "
                                      f"last.pt with every protocol of {name}; see {lacking.folder / 'evaluate.out'}")
            table[name] = {}
            for protocol in PUBLISHED["RN50"][name]:  # Table I's columns
                paper = published.get(name, {}).get(protocol, (None, None))
                table[name][protocol] = {}
                for metric, value in zip(("rank1", "mAP"), paper):
                    seeds = [m[protocol][metric] for m in metrics]
                    table[name][protocol][metric] = {
                        "values": seeds, "mean": round(statistics.fmean(seeds), 4),
                        "std": round(statistics.stdev(seeds), 4) if len(seeds) > 1 else 0.0, "published": value}
        methods[method] = {"arch": arch, "trained_arch": trained, "published_source": source, "datasets": table}
    return {"smoke": args.smoke, "seeds": list(range(1, args.seeds + 1)), "checkpoint": "last.pt",
            "std": "sample standard deviation over the seeds (n - 1); 0 for one seed",
            "note": smoke_note(args) if args.smoke else "",
            "runs": {r.label.replace(" seed ", "/seed"): str(r.folder) for r in runs}, "methods": methods}


def smoke_note(args: argparse.Namespace) -> str:
    return (f"smoke run: every row is the synthetic benchmark under {args.root} (random-init models: SCI's tiny at "
            f"64x32, 1 + 2 epochs; another method its own backbone, 1 epoch) labelled with the requested dataset's "
            f"name to exercise the table; the numbers say nothing about the methods")


def markdown(summary: dict) -> str:
    """Table I's columns for the chosen datasets; per method: this code (mean ± std), the published row
    ("–" where its paper gives none) and the difference."""
    n = len(summary["seeds"])
    first = next(iter(summary["methods"].values()))
    cols = [(d, p) for d, protocols in first["datasets"].items() for p in protocols]

    def ours(v: dict) -> str:
        return f"{v['mean']:.1f} ± {v['std']:.1f}" if n > 1 else f"{v['mean']:.1f}"

    def paper(v: dict) -> str:
        return "–" if v["published"] is None else f"{v['published']:g}"

    def difference(v: dict) -> str:
        return "–" if v["published"] is None else f"{v['mean'] - v['published']:+.1f}"

    lines = [f"Rank-1 / mAP (%) of last.pt, mean ± std over {n} seed(s); published: "
             + "; ".join(m["published_source"] for m in summary["methods"].values()) + ".",
             "", "| | " + " | ".join(f"{LABELS[d]} {LABELS[p]}" for d, p in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in summary["methods"].items():
        label = "" if name == "sci" else f"{name.upper()} "
        row = lambda fmt: " | ".join(f"{fmt(m['datasets'][d][p]['rank1'])} / {fmt(m['datasets'][d][p]['mAP'])}"
                                     for d, p in cols)
        lines += [f"| this code, {label}{m['trained_arch']}, {n} seed(s) | {row(ours)} |",
                  f"| {name.upper() if name != 'sci' else 'SCI'} {m['arch']}, published | {row(paper)} |",
                  f"| difference | {row(difference)} |"]
    if summary["note"]:
        lines += ["", f"*{summary['note']}.*"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.gpus and torch.cuda.device_count() < args.gpus:
        raise utils.UserError(f"--gpus {args.gpus}: this machine shows {torch.cuda.device_count()} CUDA device(s)")
    t0 = time.perf_counter()
    out = Path(args.output_dir)
    runs = plan_runs(args)
    for run in runs:
        check_folder(run)
    runtime = runtime_flags("cuda" if args.gpus else args.device, args.workers)
    todo = [r for r in runs if pending_steps(r, runtime)]
    print(f"{len(runs)} run(s) in {out}: {len(runs) - len(todo)} finished, {len(todo)} to do"
          + (f" on {args.gpus} GPU(s)" if args.gpus and todo else ""), flush=True)
    if args.smoke:
        print(smoke_note(args), flush=True)
    try:
        check_data(todo)
        if args.gpus:
            run_on_gpus(todo, args.gpus, runtime)
        else:
            run_in_process(todo, runtime)
    except (KeyboardInterrupt, utils.Interrupted) as exc:
        print(f"stopped ({exc or 'interrupt'}): the runs keep their checkpoints; run the same command again to "
              f"resume", file=sys.stderr, flush=True)
        return 130

    summary = summarise(runs, args)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    table = markdown(summary)
    utils.write_json(out / "results.json", summary)
    utils.write_atomic(out / "results.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    print(f"\n{table}\n\nwrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
