"""benchmarks/compare.py: what each row trains with (the flags its method reads, CSSC's input and triplet
start, CSGN's second encoder), and its tables printed again from the committed run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import ablation  # noqa: E402
import compare  # noqa: E402


def test_each_row_trains_with_the_flags_its_method_reads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablation, "_run", lambda main, folder, argv, *rest: calls.append((folder.name, argv)))
    monkeypatch.setattr(ablation, "run_stage1", lambda row, *rest: tmp_path / f"stage1-{row.name}.pt")
    args = compare.parse_args(["--seeds", "1", "--root", str(tmp_path)])
    rows = {r.name: r for r in compare.ROWS}
    for name in ("clipreid", "ccaf", "csgn", "cssc-random-init"):
        compare.run_row(rows[name], 1, "w.pt", "vit.pt", args, tmp_path, {})
    argv = dict(calls)
    assert "--cal-start" in argv["clipreid"] and "--cal-start" in argv["ccaf"]  # CAL's start, CCAF's CFM
    assert "--cal-start" not in argv["csgn"] and "--cal-start" not in argv["cssc-random-init"]  # they read none
    assert argv["csgn"][argv["csgn"].index("--vss-weights") + 1] == "vit.pt"
    cssc = argv["cssc-random-init"]
    assert "--stage1" not in cssc and cssc[-5:] == ["--arch", "resnet50", "--img-size", "128", "32"]
    assert cssc[cssc.index("--tri-start") + 1] == "1"  # 35 of 120 epochs, scaled to 6 as CAL's start
    assert rows["ccaf"].flags == "--method ccaf" and rows["cssc-random-init"].flags.endswith("--weights none")


def test_the_committed_run_prints_its_tables(tmp_path, capsys):
    results = (REPO / "benchmarks" / "results" / "compare" / "results.json").read_text()
    (tmp_path / "results.json").write_text(results)
    assert compare.main(["--table", str(tmp_path / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "| ccaf | `--method ccaf` |" in out and "cssc-random-init − clipreid-random-init" in out
    assert (tmp_path / "results.md").read_text().strip() in out
    assert compare.main(["--table", str(tmp_path / "nosuch.json")]) == 2
    assert "not a results.json of benchmarks/compare.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--seeds", "0"])
