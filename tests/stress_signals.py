"""Stress check for stops (not collected by pytest): runs `train_stage2.py` (or `evaluate.py`) with real
DataLoader workers many times and signals the whole process group at random moments, then counts
the outcomes. A clean stop is exit status 130 with no "Traceback" and no "Exception ignored" on stderr.

    python tests/stress_signals.py --runs 40                  # stage 2, signals around an epoch start
    python tests/stress_signals.py --runs 40 --script evaluate

Group signals right after an epoch's metrics line land while the next epoch's workers start
(stage 2 starts new workers every epoch), the window that issue 19's flaky test hit.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

COMMON = ["--dataset", "synthetic", "--arch", "tiny", "--img-size", "64", "32", "--device", "cpu", "--seed", "5",
          "--log-every", "1000"]


def prepare(work: Path) -> tuple[str, Path, Path]:
    """The small benchmark, a stage-1 file and a 1-epoch stage-2 checkpoint (for evaluate.py)."""
    import torch

    import synthetic
    import train_stage1
    import train_stage2
    from conftest import SMALL_BENCHMARK

    torch.set_num_threads(1)
    root = work / "data"
    synthetic.generate_synthetic(str(root), synthetic.SyntheticConfig(**SMALL_BENCHMARK), workers=1)
    argv = COMMON + ["--root", str(root), "--workers", "0", "--warmup-epochs", "1", "--batch-size", "16"]
    assert train_stage1.main(argv + ["--output-dir", str(work / "s1"), "--epochs", "2"]) == 0
    assert train_stage2.main(argv + ["--output-dir", str(work / "s2"), "--stage1", str(work / "s1" / "stage1.pt"),
                                     "--epochs", "1", "--num-instances", "4", "--eval-every", "1000"]) == 0
    return str(root), work / "s1" / "stage1.pt", work / "s2" / "last.pt"


def one_run(args, root: str, stage1: Path, ckpt: Path, out: Path) -> str:
    if args.script == "stage2":
        cmd = ["train_stage2.py"] + COMMON + [
            "--root", root, "--output-dir", str(out), "--stage1", str(stage1), "--workers", str(args.workers),
            "--epochs", "6", "--batch-size", "16", "--num-instances", "4", "--warmup-epochs", "1",
            "--milestones", "3", "--cal-start", "1", "--eval-every", "1000"]
        ready = out / "metrics_stage2.jsonl"
    else:
        cmd = ["evaluate.py", "--checkpoint", str(ckpt), "--workers", str(args.workers), "--device", "cpu",
               "--batch-size", "4", "--out-dir", str(out)]
        ready = None
    proc = subprocess.Popen([sys.executable] + cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    if ready is not None:  # the first epoch ended: the second one's workers start now
        while proc.poll() is None and time.time() < deadline and not (ready.exists() and ready.read_text()):
            time.sleep(0.005)
    else:  # evaluate.py: once its 2 DataLoader workers exist (forks: same command line; an import's helper
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")  # process is one until it runs its program)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()

        def forked() -> bool:
            try:
                return sum(Path(f"/proc/{c}/cmdline").read_bytes() == cmdline for c in children.read_text().split()) >= 2
            except OSError:
                return False

        while proc.poll() is None and time.time() < deadline and not forked():
            time.sleep(0.005)
    time.sleep(random.uniform(0, args.spread))
    sent = 0
    for sig in args.signals:
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, getattr(signal, sig))
        sent += 1
        time.sleep(random.uniform(0, args.gap))
    _, err = proc.communicate(timeout=120)
    if not sent:
        return "finished before the signal"
    if "Exception ignored" in err:
        kind = "exception ignored"
    elif "Traceback" in err:
        kind = "traceback"
    else:
        kind = "clean"
    if kind != "clean" and args.show:
        print(f"--- exit {proc.returncode}\n{err[-2500:]}", file=sys.stderr)
    return f"exit {proc.returncode}, {kind}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--script", choices=("stage2", "evaluate"), default="stage2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--spread", type=float, default=0.05, help="random delay before the first signal (s)")
    ap.add_argument("--gap", type=float, default=0.2, help="random pause after each signal (s)")
    ap.add_argument("--signals", nargs="+", default=["SIGTERM", "SIGTERM", "SIGINT", "SIGTERM"])
    ap.add_argument("--work", default=None, help="reuse this folder's data (made there when missing)")
    ap.add_argument("--show", action="store_true", help="print the stderr of unclean runs")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stress_signals_"))
    if (work / "s2" / "last.pt").exists():
        root, stage1, ckpt = str(work / "data"), work / "s1" / "stage1.pt", work / "s2" / "last.pt"
    else:
        root, stage1, ckpt = prepare(work)
    outcomes = collections.Counter()
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(dir=work) as out:
            outcome = one_run(args, root, stage1, ckpt, Path(out))
        outcomes[outcome] += 1
        print(f"run {i + 1}: {outcome}", flush=True)
    print(dict(outcomes))
    return 0 if set(outcomes) <= {"exit 130, clean", "finished before the signal"} else 1


if __name__ == "__main__":
    sys.exit(main())
