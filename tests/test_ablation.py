"""benchmarks/ablation.py's plumbing and results.json schema, with tiny settings (one seed, one or two
epochs per stage, a 40-person corpus): every row runs, rows that share stage 1 share its run, and a
second call reuses finished runs."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablation  # noqa: E402

SETTINGS = ("general", "cc", "sc")


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    argv = ["--root", data_root, "--output-dir", str(out), "--seeds", "1", "--stage1-epochs", "1",
            "--stage2-epochs", "2", "--pretrain-epochs", "1", "--pretrain-batch-size", "32", "--corpus-people", "40",
            "--batch-size", "16", "--workers", "0", "--tsne-ids", "4", "--heatmap-images", "3"]
    assert ablation.main(argv) == 0
    return out, argv


def test_results_json_schema(run):
    out, _ = run
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"clip", "rows", "seconds", "pixel_share", "units"}
    assert isinstance(res["clip"], list) and [c["seed"] for c in res["clip"]] == [0]  # one CLIP per seed
    for clip_part in res["clip"]:
        assert set(clip_part) == {"seed", "checkpoint", "pretrain_seconds", "zero_shot", "retrieval", "templates"}
        assert set(clip_part["templates"]) == {"clothes", "person"}
        assert all(set(v) == {"r1", "chance"} for v in clip_part["templates"].values())
        assert Path(clip_part["checkpoint"]).is_file() and clip_part["pretrain_seconds"] > 0
        for v in clip_part["zero_shot"].values():
            assert set(v) == {"accuracy", "chance", "kappa"} and 0 <= v["accuracy"] <= 100
        assert set(clip_part["retrieval"]) == {"R1", "R5"}
    assert [r["name"] for r in res["rows"]] == list(ablation.ROW_NAMES)
    for row in res["rows"]:
        assert isinstance(row["flags"], str) and row["seeds"] == [1] and row["clip_seeds"] == [0]
        for s in SETTINGS:
            assert set(row[s]) == {"rank1", "mAP"} and all(0 <= v <= 100 for v in row[s]["rank1"] + row[s]["mAP"])
            assert len(row[s]["mAP"]) == 1
        seek = row["seek"]
        assert set(seek) == {"identity", "clothes", "background"}
        assert sum(seek[k][0] for k in seek) == pytest.approx(1.0, abs=1e-3)
        if row["name"] != "baseline":
            assert set(row["paired"]) == {"cc_mAP", "cc_R1"}
            assert set(row["paired"]["cc_mAP"]) == {"mean", "lo", "hi", "verdict"}
            assert row["paired"]["cc_mAP"]["verdict"] == "one seed: no interval"  # --seeds 1
    assert sum(res["pixel_share"].values()) == pytest.approx(1.0, abs=1e-3)
    by_name = {r["name"]: r for r in res["rows"]}
    assert "paired" not in by_name["baseline"] and "probe" not in by_name["zero-shot"]
    for name in ("baseline", "sci", "sci-norm-matched"):
        probe = by_name[name]["probe"]
        assert set(probe) == {"F_id", "F_clo", "F_ort"} and all(len(v) == 1 for v in probe.values())
        assert 0 <= probe["F_id"][0] <= 1
    assert by_name["baseline"]["probe"]["F_clo"] == [None]  # no clothes prompt without SSE
    assert by_name["baseline"]["probe"]["F_ort"] == by_name["baseline"]["probe"]["F_id"]  # F_ort := F_id
    assert by_name["sci-random-init"]["flags"].endswith("--weights none")


def test_flags_reach_the_runs_and_stage1_is_shared(run):
    out, _ = run
    seed = out / "seed1"
    stage1 = sorted(p.name for p in seed.iterdir() if p.name.startswith("stage1-"))
    # baseline/+sim/+cal share --no-sse; +sse/sci share --ortho paper; the random backbone has its own
    assert stage1 == ["stage1-clothes-prompt-outfit-ortho-gram-schmidt", "stage1-no-sse", "stage1-ortho-gram-schmidt",
                      "stage1-ortho-gram-schmidt-match-norm", "stage1-ortho-paper", "stage1-ortho-paper-match-norm",
                      "stage1-ortho-paper-random"]
    for name in ("sci-norm-matched", "sci-gram-schmidt-norm-matched"):  # the controls' banks are norm-matched
        banks = torch.load(seed / f"stage1-ortho-{'paper' if 'gram' not in name else 'gram-schmidt'}-match-norm"
                           / "stage1.pt", weights_only=True)["banks"]
        assert torch.allclose(banks["F_ort"].norm(dim=1), banks["F_id"].norm(dim=1), rtol=1e-5)
    args = json.loads((seed / "sci-outfit-prompt" / "args_stage2.json").read_text())
    assert args["clothes_prompt"] == "outfit" and args["ortho"] == "gram-schmidt"
    base = json.loads((seed / "baseline" / "args_stage2.json").read_text())
    assert base["no_sse"] and base["no_sim"] and base["no_cal"]
    assert json.loads((seed / "sci-random-init" / "args_stage2.json").read_text())["weights"] == "none"
    for name in ("tsne_baseline.png", "tsne_sci.png", "heatmaps.png", "results.md"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ablation.ROW_NAMES)


def test_a_second_call_reuses_finished_runs(run, capsys, caplog):
    out, argv = run
    caplog.set_level(logging.INFO)
    before = (out / "seed1" / "sci" / "last.pt").stat().st_mtime_ns
    assert ablation.main(argv + ["--rows", "sci"]) == 0
    assert (out / "seed1" / "sci" / "last.pt").stat().st_mtime_ns == before
    assert any("reusing" in m for m in caplog.messages)


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    row, base = [40.0, 42.0, 47.0, 41.0, 45.0], [39.0, 40.0, 44.0, 40.0, 41.0]
    d = [1.0, 2.0, 3.0, 1.0, 4.0]
    mean = sum(d) / 5
    sd = (sum((x - mean) ** 2 for x in d) / 4) ** 0.5  # the sample standard deviation, ddof 1
    half = 2.7764451051977987 * sd / 5 ** 0.5  # Student's t, 4 degrees of freedom, 97.5 % quantile
    out = ablation.paired_difference(row, base)
    assert out["mean"] == pytest.approx(mean, abs=1e-4)
    assert (out["lo"], out["hi"]) == (pytest.approx(mean - half, abs=1e-4), pytest.approx(mean + half, abs=1e-4))
    assert out["verdict"] == "helps"
    assert ablation.paired_difference(base, row)["verdict"] == "hurts"
    assert ablation.paired_difference([1.0, 3.0, 2.0], [2.0, 2.0, 2.0])["verdict"] == "no detectable effect"
    # two seeds: t with 1 degree of freedom (12.706); differences 1 and 3 -> mean 2, sd sqrt(2)
    two = ablation.paired_difference([3.0, 5.0], [2.0, 2.0])
    assert (two["lo"], two["hi"]) == (pytest.approx(2 - 12.7062047 * 2 ** 0.5 / 2 ** 0.5, abs=1e-3),
                                      pytest.approx(2 + 12.7062047, abs=1e-3))


def test_outfit_auc_on_a_bank_whose_outfit_content_is_known():
    """Three identities, two outfits each, in a 6-d text space whose axes are the outfits: a bank row
    that is its own outfits' sum ranks them first (AUC 1); one that is another identity's ranks them
    below those two and level with the third identity's (own 0 vs carried 0.71: 4 pairs lost, own 0
    vs the third's 0: 4 ties), (4 * 0.5) / 8 = 0.25; a zero row ties everything (0.5); a
    hand-worked mixed case too."""
    outfits = torch.eye(6)
    owners = [0, 0, 1, 1, 2, 2]
    own = torch.tensor([[1., 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    assert ablation.outfit_auc(own, outfits, owners) == 1.0
    assert ablation.outfit_auc(own[[1, 2, 0]], outfits, owners) == 0.25  # everyone carries someone else's
    assert ablation.outfit_auc(torch.ones(3, 6) - torch.ones(3, 6), outfits + 0, owners) == 0.5  # all ties
    # identity 0 names one of its outfits and one of identity 1's: own {1, 0} vs others {1, 0, 0, 0}
    # pairs: 1 vs (1,0,0,0) -> 0.5+3; 0 vs (1,0,0,0) -> 0+1.5 => 5/8; identities 1 and 2 as `own`: 1
    mixed = own.clone()
    mixed[0] = torch.tensor([1., 0, 1, 0, 0, 0])
    assert ablation.outfit_auc(mixed, outfits, owners) == pytest.approx((5 / 8 + 1 + 1) / 3, abs=1e-4)


def test_table_mode_reprints_a_run_without_training(run, capsys):
    out, _ = run
    (out / "results.md").unlink()
    assert ablation.main(["--table", str(out / "results.json")]) == 0
    printed = capsys.readouterr().out
    assert "CC mAP − baseline (95% CI)" in printed and "F_id outfit AUC (95% CI)" in printed and (out / "results.md").read_text().strip() in printed
    assert ablation.main(["--table", str(out / "nothing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: --table")
