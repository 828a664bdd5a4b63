"""The throughput benchmarks run end to end with tiny settings and print what they measured."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and "---" not in line][1:]


def test_bench_loader_measures_each_worker_count():
    out = run("benchmarks/bench_loader.py", "--workers", "0", "1", "--batches", "2", "--ids", "24", "--per-id", "8",
              "--img-size", "96", "48", "--source-size", "64", "32", "--batch-size", "16")
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["0 (main process)", "1"]
    assert all(float(r[1]) > 0 for r in rows) and "CLIP-ReID's configuration uses 8 workers" in out


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bench_train_reports_both_configurations(device):
    launcher = ["tests/fake_cuda.py"] if device == "cuda" else []  # the CUDA look-alike (tests/fake_cuda.py)
    out = run(*launcher, "benchmarks/bench_train.py", "--device", device, "--steps", "1", "--warmup", "1",
              "--img-size", "64", "32", "--batch-size", "8")
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["CLIP-ReID baseline", "SCI (+ SIM + CAL)"]
    assert all(float(r[5]) > 0 for r in rows)
    assert {r[4] for r in rows} == {"float16 AMP" if device == "cuda" else "float32"}  # the device's default
