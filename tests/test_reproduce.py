"""benchmarks/reproduce.py: the --smoke grid (2 datasets x 2 seeds on the small benchmark) writes the
table with mean ± std and the published column; a second call skips finished runs; a stopped run
resumes with --resume; a folder made with other arguments is refused; bad input is one error line.
--gpus: the command lines it launches, and its scheduler (subprocesses, signals) with a stand-in
for the three scripts, since no GPU is here."""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import reproduce  # noqa: E402
import utils  # noqa: E402


@pytest.fixture(scope="module")
def grid(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    argv = ["--smoke", "--root", data_root, "--datasets", "ltcc", "prcc", "--seeds", "2", "--device", "cpu",
            "--output-dir", str(out)]
    assert reproduce.main(argv) == 0
    return out, argv


def run_files(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("*/tiny/seed*/*") if p.suffix in (".pt", ".json")}


def test_smoke_grid_writes_the_table(grid):
    out, _ = grid
    res = json.loads((out / "results.json").read_text())
    sci = res["methods"]["sci"]
    assert res["smoke"] and sci["arch"] == "RN50" and sci["trained_arch"] == "tiny" and res["seeds"] == [1, 2]
    assert "synthetic" in res["note"] and list(res["methods"]) == ["sci"]
    # Table I's columns, under the protocol names evaluate.py writes
    assert {d: list(p) for d, p in sci["datasets"].items()} == {"ltcc": ["general", "cc"], "prcc": ["sc", "cc"]}
    for dataset, protocols in sci["datasets"].items():
        for protocol, metrics in protocols.items():
            for i, metric in enumerate(("rank1", "mAP")):
                per_seed = [json.loads((out / dataset / "tiny" / f"seed{s}" / "results.json").read_text())
                            ["evaluate"]["metrics"][protocol][metric] for s in (1, 2)]
                v = metrics[metric]
                assert v["values"] == per_seed
                assert v["mean"] == pytest.approx(statistics.fmean(per_seed), abs=1e-4)
                assert v["std"] == pytest.approx(statistics.stdev(per_seed), abs=1e-4)
                assert v["published"] == reproduce.PUBLISHED["RN50"][dataset][protocol][i]
    for seed in (1, 2):  # the synthetic benchmark stands in for each dataset, with the run's seed
        args = json.loads((out / "prcc" / "tiny" / f"seed{seed}" / "args_stage2.json").read_text())
        assert args["dataset"] == "synthetic" and args["seed"] == seed and args["epochs"] == 2
    table = (out / "results.md").read_text()
    assert "| | LTCC general | LTCC CC | PRCC SC | PRCC CC |" in table
    assert "| SCI RN50, published | 75.7 / 40.6 | 42.1 / 18.6 | 99.6 / 97.7 | 59.8 / 56.2 |" in table
    assert re.search(r"\| this code, tiny, 2 seed\(s\) \| \d+\.\d ± \d+\.\d / \d+\.\d ± \d+\.\d \|", table)
    assert "smoke run" in table


def test_another_method_beside_its_published_numbers(data_root, tmp_path):
    """--methods cssc: stage 2 and the evaluation (with its recipe's flip test) on CSSC's own backbone,
    its published row where its paper has one and "–" where not."""
    argv = ["--smoke", "--root", data_root, "--datasets", "prcc", "vcclothes", "--seeds", "1", "--device", "cpu",
            "--methods", "cssc", "--output-dir", str(tmp_path)]
    assert reproduce.main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())["methods"]["cssc"]
    assert res["arch"] == res["trained_arch"] == "resnet50"
    assert res["datasets"]["prcc"]["cc"]["mAP"]["published"] == 63.0
    assert res["datasets"]["vcclothes"]["cc"]["rank1"]["published"] is None
    folder = tmp_path / "prcc" / "cssc" / "seed1"
    assert not (folder / "stage1.pt").exists()
    assert json.loads((folder / "results.json").read_text())["evaluate"]["flip"] is True
    assert json.loads((folder / "args_stage2.json").read_text())["method"] == "cssc"
    table = (tmp_path / "results.md").read_text()
    assert "| CSSC resnet50, published | 100 / 99.1 | 65.5 / 63 | – / – | – / – |" in table
    assert re.search(r"\| this code, CSSC resnet50, 1 seed\(s\) \| \d+\.\d / \d+\.\d \|", table)
    assert reproduce.main(argv) == 0  # finished: nothing to do


def test_the_clip_based_methods_run_both_stages_on_scis_backbone(data_root, tmp_path):
    """--methods clipreid ccaf csgn: each its own stage 1 (train_stage1.py --method) and stage 2 on --arch
    (the tiny model in a smoke run), beside its published numbers ("–" where there are none)."""
    argv = ["--smoke", "--root", data_root, "--datasets", "prcc", "--seeds", "1", "--device", "cpu",
            "--methods", "clipreid", "ccaf", "csgn", "--output-dir", str(tmp_path)]
    assert reproduce.main(argv) == 0
    methods = json.loads((tmp_path / "results.json").read_text())["methods"]
    assert [(m["arch"], m["trained_arch"]) for m in methods.values()] == [("RN50", "tiny")] * 3
    assert methods["ccaf"]["datasets"]["prcc"]["cc"]["mAP"]["published"] == 63.7
    assert methods["clipreid"]["datasets"]["prcc"]["cc"]["rank1"]["published"] == 57.0
    assert methods["csgn"]["datasets"]["prcc"]["cc"]["rank1"]["published"] is None
    for method in methods:
        folder = tmp_path / "prcc" / method / "seed1"
        stage1 = json.loads((folder / "args_stage1.json").read_text())
        assert stage1["method"] == method and json.loads((folder / "args_stage2.json").read_text())["method"] == method
    with pytest.raises(utils.UserError, match="expected DATASET=DIR"):
        reproduce.parse_args(["--masks", "nosuch=/x"])
    with pytest.raises(utils.UserError, match="--masks prcc: only ccaf reads part masks"):
        reproduce.parse_args(["--masks", "prcc=/x", "--methods", "sci", "cssc"])


def test_a_second_call_skips_finished_runs(grid, capsys):
    out, argv = grid
    before = run_files(out)
    assert len(before) > 20
    assert reproduce.main(argv) == 0
    assert run_files(out) == before
    assert "4 run(s) in" in (text := capsys.readouterr().out) and "4 finished, 0 to do" in text


def run_of(argv: list[str], dataset: str, seed: int) -> "reproduce.Run":
    return next(r for r in reproduce.plan_runs(reproduce.parse_args(argv)) if (r.dataset, r.seed) == (dataset, seed))


def test_a_stopped_run_resumes(grid, capsys):
    out, argv = grid
    s2, s1 = out / "prcc" / "tiny" / "seed2", out / "ltcc" / "tiny" / "seed1"
    run = run_of(argv, "prcc", 2)
    metrics = reproduce.evaluated(run)
    kept = {p: p.stat().st_mtime_ns for p in (s2 / "last.pt", s1 / "stage1_last.pt", out / "ltcc/tiny/seed2/last.pt")}
    (s2 / "results.json").unlink()  # stage 2 stopped after its last checkpoint
    (s1 / "stage1.pt").unlink()     # stage 1 stopped after its last checkpoint
    assert reproduce.main(argv) == 0
    text = capsys.readouterr().out
    assert "ltcc seed 1: stage 1 (resumed) in" in text and "prcc seed 2: stage 2 (resumed), evaluate in" in text
    assert "resumed from" in (s2 / "stage2.log").read_text() and "resumed from" in (s1 / "stage1.log").read_text()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # resumed at the end: nothing retrained
    assert reproduce.evaluated(run) == metrics and (s1 / "stage1.pt").is_file()


def test_a_later_partial_evaluation_is_not_the_runs(grid, capsys):
    """evaluate.py --setting cc on last.pt (or an evaluation of another dataset, or a folder search)
    replaces results.json's "evaluate" entry: the grid evaluates the run again instead of using it."""
    import evaluate

    out, argv = grid
    run = run_of(argv, "prcc", 1)
    metrics = reproduce.evaluated(run)
    assert set(metrics) >= {"sc", "cc"}
    assert evaluate.main(["--checkpoint", str(run.folder / "last.pt"), "--setting", "cc", "--device", "cpu"]) == 0
    assert reproduce.evaluated(run) is None
    assert reproduce.main(argv) == 0
    assert "prcc seed 1: evaluate in" in capsys.readouterr().out
    assert reproduce.evaluated(run) == metrics
    results = json.loads((run.folder / "results.json").read_text())
    for change in ({"dataset": "ltcc"}, {"query": "q", "gallery": "g", "labels": "l.csv"}):
        (run.folder / "results.json").write_text(json.dumps(results | {"evaluate": results["evaluate"] | change}))
        assert reproduce.evaluated(run) is None
    (run.folder / "results.json").write_text(json.dumps(results))
    assert reproduce.evaluated(run) == metrics


def test_a_folder_made_with_other_arguments_is_refused(grid, tmp_path, capsys):
    out, argv = grid
    other = argv[:argv.index("--root") + 1] + [str(tmp_path)] + argv[argv.index("--root") + 2:]
    before = run_files(out)
    assert reproduce.main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out / 'ltcc' / 'tiny' / 'seed1'} holds a run made with "
                                               "other arguments") and "--root" in err[0]
    assert run_files(out) == before
    foreign = tmp_path / "out" / "ltcc" / "tiny" / "seed1"
    foreign.mkdir(parents=True)
    (foreign / "last.pt").touch()
    assert reproduce.main(["--smoke", "--root", str(tmp_path), "--datasets", "ltcc", "--seeds", "1",
                           "--output-dir", str(tmp_path / "out")]) == 2
    assert "did not make" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--smoke", "--datasets", "ltcc", "market1501"], ["--smoke", "--seeds", "0"],
                                  ["--smoke", "--gpus", "0"], ["--smoke", "--gpus", "1", "--device", "cpu"],
                                  ["--datasets", "ltcc"], ["--smoke", "--gpus", "2"]])
def test_bad_input_is_one_error_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce.torch.cuda, "device_count", lambda: 0)
    assert reproduce.main(argv + ["--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_gpu_command_lines(tmp_path):
    args = reproduce.parse_args(["--root", "/data", "--datasets", "prcc", "--seeds", "2", "--gpus", "2",
                                 "--output-dir", str(tmp_path)])
    runs = reproduce.plan_runs(args)
    assert [r.folder for r in runs] == [tmp_path / "prcc" / "RN50" / f"seed{s}" for s in (1, 2)]
    run, runtime = runs[1], reproduce.runtime_flags("cuda", None)
    folder, env0 = str(runs[1].folder), {"PATH": "/bin"}
    cmds = [reproduce.gpu_command(s, 1, env0, gpus=2) for s in reproduce.pending_steps(run, runtime)]
    assert [c for c, _ in cmds] == [
        [sys.executable, str(REPO / "train_stage1.py"), "--dataset", "prcc", "--root", "/data", "--arch", "RN50",
         "--seed", "2", "--output-dir", folder, "--device", "cuda"],
        [sys.executable, str(REPO / "train_stage2.py"), "--seed", "2", "--output-dir", folder, "--device", "cuda"],
        [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(run.folder / "last.pt"), "--device", "cuda"]]
    assert all(env["CUDA_VISIBLE_DEVICES"] == "1" and env["PATH"] == "/bin" and env["OMP_NUM_THREADS"]
               for _, env in cmds)
    # GPU indices count among the visible ones
    assert reproduce.gpu_command(reproduce.pending_steps(run, runtime)[0], 1, {"CUDA_VISIBLE_DEVICES": "4,5"},
                                 gpus=2)[1]["CUDA_VISIBLE_DEVICES"] == "5"
    # stopped stages resume: stage 1 from stage1_last.pt, stage 2 from last.pt
    run.folder.mkdir(parents=True)
    (run.folder / "stage1_last.pt").touch()
    steps = reproduce.pending_steps(run, reproduce.runtime_flags("cuda", 3))
    assert steps[0].argv[-3:] == ("--workers", "3", "--resume") and "--resume" not in steps[1].argv
    (run.folder / "stage1.pt").touch()
    (run.folder / "last.pt").touch()
    assert [(s.name, s.argv[-1]) for s in reproduce.pending_steps(run, runtime)] == [("stage 2", "--resume"),
                                                                                     ("evaluate", "cuda")]
    vit = reproduce.plan_runs(reproduce.parse_args(["--root", "/data", "--arch", "ViT-B/16", "--datasets", "ltcc",
                                                    "--seeds", "1", "--output-dir", str(tmp_path)]))
    assert vit[0].folder == tmp_path / "ltcc" / "ViT-B-16" / "seed1" and "ViT-B/16" in vit[0].stage1


# Stands in for train_stage1.py, train_stage2.py and evaluate.py under --gpus: records its call and
# writes what the script would; with STUB_HOLD, stage 2 waits for a signal (exit 130, as the scripts)
STUB = r'''
import json, os, signal, sys, time
from pathlib import Path
script, argv = Path(sys.argv[1]).name, sys.argv[2:]
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
with open(os.environ["STUB_CALLS"], "a") as f:
    f.write(json.dumps({"script": script, "argv": argv, "gpu": os.environ["CUDA_VISIBLE_DEVICES"]}) + "\n")
value = lambda flag: argv[argv.index(flag) + 1]
if script == "train_stage1.py":
    Path(value("--output-dir"), "stage1.pt").write_text("")
elif script == "train_stage2.py":
    out = Path(value("--output-dir"))
    (out / "last.pt").write_text("")
    if os.environ.get("STUB_HOLD") and "--resume" not in argv:
        Path(os.environ["STUB_HOLD"]).write_text("")
        time.sleep(30)
        sys.exit(1)
    (out / "results.json").write_text(json.dumps({"metrics": {}}))
else:
    ckpt = Path(value("--checkpoint"))
    seed = int(ckpt.parent.name.removeprefix("seed"))
    metrics = {p: {"rank1": 50.0 + seed, "mAP": 30.0 + seed} for p in ("general", "cc", "sc")}
    record = json.loads((ckpt.parent / "results.json").read_text())
    record["evaluate"] = {"source": str(ckpt), "dataset": "synthetic", "single_shot": False, "rerank": None,
                          "metrics": metrics}
    (ckpt.parent / "results.json").write_text(json.dumps(record))
'''


def test_gpu_scheduler_stops_and_resumes(data_root, tmp_path, monkeypatch, capsys):
    stub, calls, hold = tmp_path / "stub.py", tmp_path / "calls.jsonl", tmp_path / "holding"
    stub.write_text(STUB)
    monkeypatch.setattr(reproduce, "PYTHON", (sys.executable, str(stub)))
    monkeypatch.setattr(reproduce.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("STUB_CALLS", str(calls))
    monkeypatch.setenv("STUB_HOLD", str(hold))
    argv = ["--smoke", "--root", data_root, "--datasets", "vcclothes", "--seeds", "2", "--gpus", "2",
            "--output-dir", str(tmp_path / "out")]

    def interrupt():  # Ctrl-C once a stage 2 runs: reproduce.py passes it on to its children
        deadline = time.monotonic() + 20
        while not hold.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if hold.exists():
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    assert reproduce.main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    first = [json.loads(line) for line in calls.read_text().splitlines()]
    assert {c["script"] for c in first} <= {"train_stage1.py", "train_stage2.py"}
    assert not (tmp_path / "out" / "results.json").exists()

    monkeypatch.delenv("STUB_HOLD")
    assert reproduce.main(argv) == 0
    second = [json.loads(line) for line in calls.read_text().splitlines()][len(first):]
    assert all(c["gpu"] in ("0", "1") and c["argv"][c["argv"].index("--device") + 1] == "cuda" for c in first + second)
    assert all(c["argv"][-1] == "--resume" for c in second if c["script"] == "train_stage2.py")
    assert sorted(c["script"] for c in second if c["script"] == "evaluate.py") == ["evaluate.py"] * 2
    assert (tmp_path / "out" / "vcclothes" / "tiny" / "seed1" / "train_stage2.out").is_file()
    res = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["sci"]["datasets"]["vcclothes"]
    assert list(res) == ["general", "cc"]
    assert res["cc"]["rank1"] == {"values": [51.0, 52.0], "mean": 51.5, "std": pytest.approx(0.7071, abs=1e-4),
                                  "published": 89.2}
