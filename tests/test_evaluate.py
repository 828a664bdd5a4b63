"""evaluate.py: the CAL protocols on hand-checked cases, the chunked feature path against a plain
per-query reference, bad input, feature extraction (plain and 2-process gloo) and the --features CLI."""
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import metrics
from evaluate import rank_metrics_from_features
from metrics import rank_metrics
from tools import profile as profile_tool
from fake_cuda import fake_cuda
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- a plain reference

def reference(dist, qp, gp, qc, gc, qo, go, setting, max_rank=50):
    """Per query: good/junk masks, stable argsort, drop junk, read off CMC, AP and INP."""
    dist, qp, gp, qc, gc = (np.asarray(x) for x in (dist, qp, gp, qc, gc))
    cmc, aps, inps, skipped = np.zeros(max_rank), [], [], 0
    for i in range(len(qp)):
        same = gp == qp[i]
        good = same & (gc != qc[i])
        if setting == "cc":
            good &= np.asarray(go) != qo[i]
        elif setting == "sc":
            good &= np.asarray(go) == qo[i]
        junk = same & ~good
        if not good.any():
            skipped += 1
            continue
        order = np.argsort(dist[i], kind="stable")
        order = order[~junk[order]]
        ranks = np.flatnonzero(good[order]) + 1
        cmc[ranks[0] - 1:] += 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
    return {"cmc": cmc / len(aps), "mAP": np.mean(aps), "mINP": np.mean(inps),
            "num_valid_queries": len(aps), "num_skipped_queries": skipped}


def assert_same(m, r, tol=1e-12):
    assert np.array_equal(m["cmc"], r["cmc"])
    assert abs(m["mAP"] - r["mAP"]) < tol and abs(m["mINP"] - r["mINP"]) < tol
    assert (m["num_valid_queries"], m["num_skipped_queries"]) == (r["num_valid_queries"], r["num_skipped_queries"])


def random_problem(seed, num_q=30, num_g=120, dim=16, ids=12, dtype=np.float32):
    """Random features and labels whose float64 distances are at least 2e-6 apart within each row,
    so float32 rounding or BLAS blocking cannot reorder them (the test would say so if it did)."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        q, g = rng.standard_normal((num_q, dim)), rng.standard_normal((num_g, dim))
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        gaps = np.diff(np.sort(1 - qn @ gn.T, axis=1), axis=1)
        if gaps.min() > 2e-6:
            break
    else:
        raise AssertionError("no well-separated draw found")
    labels = dict(q_pids=rng.integers(0, ids, num_q), g_pids=rng.integers(0, ids, num_g),
                  q_camids=rng.integers(0, 3, num_q), g_camids=rng.integers(0, 3, num_g),
                  q_clothes=rng.integers(0, 2, num_q), g_clothes=rng.integers(0, 2, num_g))
    return q.astype(dtype), g.astype(dtype), 1 - qn @ gn.T, labels


def ref_from(dist, lab, setting):
    return reference(dist, lab["q_pids"], lab["g_pids"], lab["q_camids"], lab["g_camids"],
                     lab["q_clothes"], lab["g_clothes"], setting)


# ----------------------------------------------------------------------------- protocol masks

@pytest.mark.parametrize("setting", ["general", "cc", "sc"])
def test_protocol_masks_match_the_fast_core(setting):
    """protocol_masks (shared by ranked_lists and benchmarks/) and _same_identity (the ranking core's
    batched form) apply the same rules."""
    _, _, _, lab = random_problem(0)
    gp, gc, go = (torch.as_tensor(lab[k]) for k in ("g_pids", "g_camids", "g_clothes"))
    qp, qc, qo = (torch.as_tensor(lab[k]) for k in ("q_pids", "q_camids", "q_clothes"))
    idx, good, junk = metrics._same_identity(qp, qc, qo, metrics._gallery_index(gp, gc, go), setting)
    for i in range(len(qp)):
        g_mask, j_mask = metrics.protocol_masks(lab["q_pids"][i], lab["q_camids"][i], lab["q_clothes"][i],
                                                 lab["g_pids"], lab["g_camids"], lab["g_clothes"], setting)
        assert set(idx[i][good[i]].tolist()) == set(np.flatnonzero(g_mask))
        assert set(idx[i][junk[i]].tolist()) == set(np.flatnonzero(j_mask))
        assert not (g_mask & j_mask).any() and ((g_mask | j_mask) == (lab["g_pids"] == lab["q_pids"][i])).all()
    with pytest.raises(UserError, match="unknown setting"):
        metrics.protocol_masks(0, 0, 0, lab["g_pids"], lab["g_camids"], lab["g_clothes"], "xx")


# ----------------------------------------------------------------------------- hand-checked cases

def test_general_junk_removed_and_query_without_match_skipped():
    # query 0 (id 1, cam 0): gallery 1 is junk (same camera); goods 2 and 4 rank 2 and 4 after removal
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                     [0.1, 0.2, 0.3, 0.4, 0.5]])
    m = rank_metrics(dist, q_pids=[1, 5], g_pids=[2, 1, 1, 3, 1], q_camids=[0, 0], g_camids=[1, 0, 1, 1, 2])
    assert m["num_valid_queries"] == 1 and m["num_skipped_queries"] == 1   # id 5 has no gallery image
    assert m["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)                   # 0.367 if junk were kept
    assert m["mINP"] == pytest.approx(2 / 4)
    assert m["cmc"][:3].tolist() == [0.0, 1.0, 1.0] and len(m["cmc"]) == 50
    assert m["cmc"].dtype == np.float64 and isinstance(m["mAP"], float)


def test_map_and_minp_by_hand():
    # goods at distances ranking 1, 3 and 6: AP = (1/1 + 2/3 + 3/6) / 3, INP = 3/6
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    m = rank_metrics(dist, [7], [7, 0, 7, 0, 0, 7], [0], [1, 1, 1, 1, 1, 1], max_rank=4)
    assert m["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    assert m["mINP"] == pytest.approx(0.5)
    assert m["cmc"].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_ties_are_broken_by_gallery_order():
    # the wrong image and the good one tie: whichever comes first in the gallery ranks first
    m = rank_metrics([[0.5, 0.5]], [1], [2, 1], [0], [1, 1])
    assert m["mAP"] == 0.5 and m["cmc"][0] == 0.0
    m = rank_metrics([[0.5, 0.5]], [1], [1, 2], [0], [1, 1])
    assert m["mAP"] == 1.0 and m["cmc"][0] == 1.0
    # same through the feature path: identical gallery vectors give exactly equal distances
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    g = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    m = rank_metrics_from_features(q, g, [1], [2, 1, 3], [0], [1, 1, 1])
    assert m["mAP"] == 0.5 and m["cmc"][0] == 0.0


# query 0: id 1, cam 0, clothes 10. Gallery (distance: id, cam, clothes -> role):
#   0 (0.10: 1, 1, 10) cc junk / sc good     1 (0.20: 2, 1, 20) wrong
#   2 (0.30: 1, 1, 11) cc good / sc junk     3 (0.05: 1, 0, 11) junk (same camera)
#   4 (0.40: 3, 2, 30) wrong                 5 (0.50: 1, 2, 11) cc good / sc junk
#   6 (0.90: 4, 1, 40) query 1's only image: same clothes, so junk under cc
CC_CASE = dict(distmat=np.array([[0.10, 0.20, 0.30, 0.05, 0.40, 0.50, 0.90],
                                 [0.10, 0.20, 0.30, 0.05, 0.40, 0.50, 0.90]]),
               q_pids=[1, 4], g_pids=[1, 2, 1, 1, 3, 1, 4], q_camids=[0, 0], g_camids=[1, 1, 1, 0, 2, 2, 1],
               q_clothes=[10, 40], g_clothes=[10, 20, 11, 11, 30, 11, 40])


@pytest.mark.parametrize("setting, ap0, inp0, first0, valid", [
    ("general", (1 + 2 / 3 + 3 / 5) / 3, 3 / 5, 1, 2),   # goods 0, 2, 5 at ranks 1, 3, 5
    ("cc", (1 / 2 + 2 / 4) / 2, 2 / 4, 2, 1),            # 1, 2, 4, 5 remain: goods 2, 5 at ranks 2, 4
    ("sc", 1.0, 1.0, 1, 2),                              # 0, 1, 4 remain: good 0 at rank 1
])
def test_clothes_protocols_by_hand(setting, ap0, inp0, first0, valid):
    m = rank_metrics(**CC_CASE, setting=setting)
    assert m["num_valid_queries"] == valid and m["num_skipped_queries"] == 2 - valid
    # query 1 (id 4) has no junk under general and sc: its one image is good and ranks last, 7th
    ap1 = {"general": 1 / 7, "cc": None, "sc": 1 / 7}[setting]
    aps, inps = [ap0] + ([ap1] if ap1 else []), [inp0] + ([ap1] if ap1 else [])
    assert m["mAP"] == pytest.approx(np.mean(aps))
    assert m["mINP"] == pytest.approx(np.mean(inps))
    assert m["cmc"][0] == pytest.approx((first0 == 1) / valid)
    assert_same(m, reference(setting=setting, qp=CC_CASE["q_pids"], gp=CC_CASE["g_pids"], qc=CC_CASE["q_camids"],
                             gc=CC_CASE["g_camids"], qo=CC_CASE["q_clothes"], go=CC_CASE["g_clothes"],
                             dist=CC_CASE["distmat"]))


def test_max_rank_beyond_gallery_saturates():
    m = rank_metrics([[0.3, 0.1, 0.2]], [1], [1, 0, 0], [0], [1, 1, 1], max_rank=10)
    assert m["cmc"].tolist() == [0.0, 0.0, 1.0] + [1.0] * 7


# ----------------------------------------------------------------------------- random data, all paths

@pytest.mark.parametrize("setting", metrics.SETTINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feature_path_equals_distance_matrix_path(setting, dtype):
    q, g, dist, lab = random_problem(1, dtype=dtype)
    r = ref_from(dist, lab, setting)
    assert_same(rank_metrics(dist, **lab, setting=setting), r)
    for chunk in (1, 7, len(q)):
        assert_same(rank_metrics_from_features(q, g, **lab, setting=setting, chunk=chunk), r)
    # torch tensors in, the same numbers out
    tl = {k: torch.as_tensor(v) for k, v in lab.items()}
    assert_same(rank_metrics_from_features(torch.as_tensor(q), torch.as_tensor(g), **tl, setting=setting), r)


@pytest.mark.parametrize("seed", range(4))
def test_heavy_ties_match_reference(seed, monkeypatch):
    # integer distances tie everywhere; a tiny candidate budget forces many pieces per chunk
    monkeypatch.setattr(metrics, "CANDIDATE_BUDGET", 5)
    rng = np.random.default_rng(seed)
    lab = dict(q_pids=rng.integers(0, 8, 30), g_pids=rng.integers(0, 8, 90), q_camids=rng.integers(0, 3, 30),
               g_camids=rng.integers(0, 3, 90), q_clothes=rng.integers(0, 2, 30), g_clothes=rng.integers(0, 2, 90))
    for dtype in (np.float32, np.float64, np.int64):
        dist = rng.integers(0, 6, (30, 90)).astype(dtype)
        for setting in metrics.SETTINGS:
            assert_same(rank_metrics(dist, **lab, setting=setting), ref_from(dist, lab, setting))


def test_exact_features_with_ties_match_reference():
    # entries +-1 on 4 of 16 coordinates: unit vectors have entries +-0.5, every dot product is exact
    rng = np.random.default_rng(3)

    def vectors(n):
        v = np.zeros((n, 16), dtype=np.float32)
        for row in v:
            row[rng.choice(16, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
        return v

    q, g = vectors(25), vectors(120)
    dist = 1 - (q / 2) @ (g / 2).T
    lab = dict(q_pids=rng.integers(0, 6, 25), g_pids=rng.integers(0, 6, 120), q_camids=rng.integers(0, 2, 25),
               g_camids=rng.integers(0, 2, 120), q_clothes=rng.integers(0, 2, 25), g_clothes=rng.integers(0, 2, 120))
    for setting in metrics.SETTINGS:
        for chunk in (1, 7, 25):
            assert_same(rank_metrics_from_features(q, g, **lab, setting=setting, chunk=chunk),
                        ref_from(dist, lab, setting))


def test_half_precision_features_are_ranked_in_float32():
    q, g, _, lab = random_problem(2)
    qh, gh = torch.as_tensor(q).half(), torch.as_tensor(g).half()
    m = rank_metrics_from_features(qh, gh, **lab)
    assert_same(m, rank_metrics_from_features(qh.float(), gh.float(), **lab))


def test_cuda_matches_cpu():
    """The CUDA code path (torch GEMM and sort on the device) on a real GPU, else on the look-alike."""
    q, g, dist, lab = random_problem(4)
    with contextlib.nullcontext() if torch.cuda.is_available() else fake_cuda():
        for setting in metrics.SETTINGS:
            m = rank_metrics_from_features(torch.as_tensor(q).cuda(), torch.as_tensor(g).cuda(), **lab,
                                           setting=setting)
            assert_same(m, ref_from(dist, lab, setting))


# ----------------------------------------------------------------------------- bad input

def bad_inputs():
    q, g, dist, lab = random_problem(5, num_q=6, num_g=20)
    nan_q = q.copy()
    nan_q[2, 3] = np.nan
    inf_g = g.copy()
    inf_g[0, 0] = np.inf
    nan_dist = dist.copy()
    nan_dist[1, 1] = np.nan
    no_clothes = {**lab, "q_clothes": None, "g_clothes": None}
    return {
        "labels shorter than features": lambda: rank_metrics_from_features(q, g, **{**lab, "q_pids": lab["q_pids"][:-1]}),
        "gallery labels longer": lambda: rank_metrics(dist, **{**lab, "g_camids": np.r_[lab["g_camids"], 0]}),
        "empty gallery": lambda: rank_metrics_from_features(q, g[:0], **{**lab, "g_pids": [], "g_camids": [],
                                                                            "g_clothes": []}),
        "empty query": lambda: rank_metrics(dist[:0], **{**lab, "q_pids": [], "q_camids": [], "q_clothes": []}),
        "NaN feature": lambda: rank_metrics_from_features(nan_q, g, **lab),
        "inf feature": lambda: rank_metrics_from_features(q, inf_g, **lab),
        "NaN distance": lambda: rank_metrics(nan_dist, **lab),
        "cc without clothes": lambda: rank_metrics_from_features(q, g, **no_clothes, setting="cc"),
        "sc without clothes": lambda: rank_metrics(dist, **no_clothes, setting="sc"),
        "unknown setting": lambda: rank_metrics(dist, **lab, setting="CC"),
        "feature widths differ": lambda: rank_metrics_from_features(q, g[:, :5], **lab),
        "float labels": lambda: rank_metrics(dist, **{**lab, "q_pids": lab["q_pids"] * 1.0}),
        "no valid query": lambda: rank_metrics(dist, **{**lab, "q_pids": np.full(6, 99)}),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_raises_user_error(case):
    with pytest.raises(UserError):
        bad_inputs()[case]()


# ----------------------------------------------------------------------------- feature extraction

class TinySet(torch.utils.data.Dataset):
    def __init__(self, n=11):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 4, 2, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 100 + i, i % 3, 7 * i


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24, 5))


def test_extract_features_order_labels_and_flip():
    data, model = TinySet(), tiny_model()
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    feats, pids, camids, clothes = evaluate.extract_features(model.train(), loader, "cpu")
    assert not model.training
    assert feats.dtype == torch.float32 and feats.shape == (11, 5) and feats.device.type == "cpu"
    assert torch.allclose(feats, model(data.images), atol=1e-6)
    assert pids.dtype == np.int64 and pids.tolist() == list(range(100, 111))
    assert camids.tolist() == [i % 3 for i in range(11)] and clothes.tolist() == [7 * i for i in range(11)]
    flipped, *_ = evaluate.extract_features(model, loader, "cpu", flip=True)
    assert torch.allclose(flipped, (model(data.images) + model(data.images.flip(3))) / 2, atol=1e-6)


def _gather_worker(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    loader = torch.utils.data.DataLoader(TinySet(), batch_size=2)
    feats, pids, camids, clothes = evaluate.extract_features(tiny_model(), loader, "cpu")
    torch.save({"feats": feats, "pids": pids, "camids": camids, "clothes": clothes}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_extract_features_gathers_shards_across_two_processes(tmp_path):
    # 11 images over 2 ranks: shards of 6 and 5, padded for all_gather, reassembled in order
    torch.multiprocessing.spawn(_gather_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2)
    data = TinySet()
    expected = tiny_model()(data.images).detach()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert torch.allclose(got["feats"], expected, atol=1e-6)
        assert got["pids"].tolist() == list(range(100, 111)) and got["clothes"].tolist() == [7 * i for i in range(11)]


# ----------------------------------------------------------------------------- protocols and reports

def protocol(q, g, lab, name="general", mask="general"):
    return {"name": name, "mask": mask,
            "query": {"feats": q, "pids": lab["q_pids"], "camids": lab["q_camids"], "clothes": lab["q_clothes"]},
            "gallery": {"feats": g, "pids": lab["g_pids"], "camids": lab["g_camids"], "clothes": lab["g_clothes"]}}


def test_single_shot_keeps_one_gallery_image_per_identity():
    q, g, dist, lab = random_problem(6, num_g=60)
    multi = evaluate.evaluate_features([protocol(q, g, lab)])["general"]
    single = evaluate.evaluate_features([protocol(q, g, lab)], single_shot=True)["general"]
    assert_same(single, evaluate.evaluate_features([protocol(q, g, lab)], single_shot=True)["general"])  # seeded
    assert single["mAP"] != pytest.approx(multi["mAP"])
    # with one image per identity every draw is the full gallery
    _, first = np.unique(lab["g_pids"], return_index=True)
    lab1 = {**lab, **{k: lab[k][first] for k in ("g_pids", "g_camids", "g_clothes")}}
    one = evaluate.evaluate_features([protocol(q, g[first], lab1)], single_shot=True)["general"]
    full = evaluate.evaluate_features([protocol(q, g[first], lab1)])["general"]
    assert np.allclose(one["cmc"], full["cmc"]) and one["mAP"] == pytest.approx(full["mAP"])  # a mean of 10 equal runs


def test_table_and_json():
    results = {"cc": {"cmc": np.linspace(0.4, 1.0, 50), "mAP": 0.1234, "mINP": 0.05,
                      "num_valid_queries": 10, "num_skipped_queries": 2}}
    table = evaluate.format_table(results)
    assert "Rank-20" in table and "40.0" in table and "12.3" in table and "10/2" in table
    js = evaluate.metrics_to_json(results)
    assert js == {"cc": {"rank1": 40.0, "rank5": pytest.approx(100 * (0.4 + 4 * 0.6 / 49), abs=0.01),
                         "rank10": pytest.approx(100 * (0.4 + 9 * 0.6 / 49), abs=0.01),
                         "rank20": pytest.approx(100 * (0.4 + 19 * 0.6 / 49), abs=0.01), "mAP": 12.34, "mINP": 5.0}}
    json.dumps(js)


# ----------------------------------------------------------------------------- CLI (--features)

def write_npz(path, with_clothes=True, with_images=False):
    """Two protocols over one random problem; `with_images`: tiny image files for the general one."""
    from PIL import Image

    q, g, dist, lab = random_problem(7, num_q=12, num_g=50)
    arrays = {"protocols": np.array(["general", "cc"]), "mask_settings": np.array(["general", "cc"])}
    if with_images:
        for part, n in (("query", len(q)), ("gallery", len(g))):
            paths = [str(path.parent / f"{part}_{i}.png") for i in range(n)]
            for i, p in enumerate(paths):
                Image.new("RGB", (8, 16), (20 * (i % 12), 90, 160)).save(p)
            arrays[f"general_{part}_paths"] = np.array(paths)
    for name in ("general", "cc"):
        for part, feats, pre in (("query", q, "q_"), ("gallery", g, "g_")):
            arrays[f"{name}_{part}_feats"] = feats
            arrays[f"{name}_{part}_pids"] = lab[pre + "pids"]
            arrays[f"{name}_{part}_camids"] = lab[pre + "camids"]
            if with_clothes:
                arrays[f"{name}_{part}_clothes"] = lab[pre + "clothes"]
    np.savez(path, **arrays)
    return dist, lab


def test_cli_features_end_to_end(tmp_path, capsys):
    dist, lab = write_npz(tmp_path / "feats.npz", with_images=True)
    assert evaluate.main(["--features", str(tmp_path / "feats.npz"), "--visualize", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Rank-1" in out and "cc" in out
    record = json.loads((tmp_path / "results.json").read_text())["evaluate"]
    for setting in ("general", "cc"):
        r = ref_from(dist, lab, setting)
        assert record["metrics"][setting]["mAP"] == pytest.approx(100 * r["mAP"], abs=0.006)
        assert record["metrics"][setting]["rank1"] == pytest.approx(100 * r["cmc"][0], abs=0.006)
    for name in ("ranked_general.png", "ranked_cc.png", "cmc_curve.png"):
        assert (tmp_path / name).stat().st_size > 0
    # results.json that is already there (a training run's) keeps its own keys
    (tmp_path / "results.json").write_text(json.dumps({"best_epoch": 3}))
    assert evaluate.main(["--features", str(tmp_path / "feats.npz"), "--setting", "cc", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["best_epoch"] == 3 and list(record["evaluate"]["metrics"]) == ["cc"]


def test_save_and_load_features_round_trip(tmp_path, capsys):
    q, g, _, lab = random_problem(8, num_q=10, num_g=40)
    protocols = [protocol(torch.as_tensor(q), torch.as_tensor(g), lab, "sc", "general"),
                 protocol(torch.as_tensor(q[:4]), torch.as_tensor(g), lab | {"q_pids": lab["q_pids"][:4],
                          "q_camids": lab["q_camids"][:4], "q_clothes": lab["q_clothes"][:4]}, "cc", "general")]
    protocols[0]["query"]["paths"] = [f"q{i}.png" for i in range(10)]
    evaluate.save_features(tmp_path / "prcc.npz", protocols, "prcc")
    loaded, dataset = evaluate.load_features(tmp_path / "prcc.npz")
    assert dataset == "prcc" and [(p["name"], p["mask"]) for p in loaded] == [("sc", "general"), ("cc", "general")]
    assert np.array_equal(loaded[0]["query"]["feats"], q) and loaded[0]["query"]["paths"].tolist()[3] == "q3.png"
    assert loaded[1]["query"]["pids"].tolist() == lab["q_pids"][:4].tolist() and loaded[1]["query"]["paths"] is None
    # PRCC's single-shot protocol is available from the file; for other datasets it is refused
    assert evaluate.main(["--features", str(tmp_path / "prcc.npz"), "--single-shot", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["evaluate"]["single_shot"] is True
    evaluate.save_features(tmp_path / "ltcc.npz", protocols, "ltcc")
    assert evaluate.main(["--features", str(tmp_path / "ltcc.npz"), "--single-shot", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --single-shot")


def test_cli_bad_features_files(tmp_path, capsys):
    write_npz(tmp_path / "no_clothes.npz", with_clothes=False)
    np.savez(tmp_path / "short.npz", protocols=np.array(["general"]), general_query_feats=np.ones((3, 4)),
             general_query_pids=np.arange(2), general_query_camids=np.arange(3),
             general_gallery_feats=np.ones((3, 4)), general_gallery_pids=np.arange(3),
             general_gallery_camids=np.arange(3))
    (tmp_path / "junk.npz").write_text("not a zip")
    for name in ("missing.npz", "no_clothes.npz", "short.npz", "junk.npz"):
        assert evaluate.main(["--features", str(tmp_path / name), "--device", "cpu"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_cli_subprocess_bad_npz_exits_2(tmp_path):
    nan = tmp_path / "nan.npz"
    np.savez(nan, protocols=np.array(["general"]), general_query_feats=np.full((2, 3), np.nan),
             general_query_pids=np.arange(2), general_query_camids=np.zeros(2, int),
             general_gallery_feats=np.ones((2, 3)), general_gallery_pids=np.arange(2),
             general_gallery_camids=np.ones(2, int))
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--features", str(nan), "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_profile_prints_parameters_and_flops_with_and_without_sim(capsys):
    assert profile_tool.main(["--arch", "tiny", "--img-size", "64", "32", "--num-ids", "5"]) == 0
    rows = {line.split()[0] + (" +SIM" if "+ SIM" in line else ""): line.split()
            for line in capsys.readouterr().out.splitlines() if line.startswith("tiny")}
    plain, with_sim = rows["tiny"], rows["tiny +SIM"]
    assert float(with_sim[-3]) > float(plain[-3]) > 0  # parameters (M)
    assert float(with_sim[-2]) >= float(plain[-2]) > 0  # GFLOPs (SIM adds little: it refines token 0 only)


def test_shard_loaders_keep_the_worker_set_up():
    """Under DDP each rank extracts a shard; its workers must still leave SIGINT/SIGTERM to the main
    process (loaders._worker_init), or a group signal kills them and crashes the run."""
    import loaders
    loader = loaders.build_test_loader([("x.png", 0, 0, 0)] * 5, (16, 8), batch_size=2, workers=2)
    shard, per = evaluate._shard_loader(loader, rank=1, world=2)
    assert shard.worker_init_fn is loader.worker_init_fn is loaders._worker_init
    assert isinstance(shard, loaders.WorkerLoader)  # its workers start with the stop signals held
    assert per == 3 and len(shard.dataset) == 2 and shard.num_workers == 2
