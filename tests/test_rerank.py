"""k-reciprocal re-ranking (rerank.py, evaluate.py --rerank): equal to a plain dense transcription of the
algorithm, chunk-independent, and wired into the metrics and the CLI."""
import contextlib
import json

import numpy as np
import pytest
import torch

import evaluate
import rerank as reranking
from evaluate import rank_metrics_from_features
from metrics import rank_metrics
from rerank import RerankConfig, rerank
from fake_cuda import fake_cuda
from utils import UserError


def dense_rerank(q, g, k1, k2, lambda_value):
    """The original algorithm (Zhong et al., CVPR 2017, as in the authors' released code), dense and
    step by step: squared Euclidean distances of the L2-normalised features over probe + gallery,
    each row divided by its maximum, a full argsort, loops over every point."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    x = np.concatenate([q, g]).astype(np.float64)
    num_q, n = len(q), len(q) + len(g)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(2)
    dist = np.transpose(dist / np.max(dist, axis=0))
    rank = np.argsort(dist, axis=1)
    half = int(np.around(k1 / 2))

    V = np.zeros((n, n))
    for i in range(n):
        forward = rank[i, :k1 + 1]
        backward = rank[forward, :k1 + 1]
        R = forward[np.where(backward == i)[0]]
        expansion = R
        for c in R:
            c_forward = rank[c, :half + 1]
            c_backward = rank[c_forward, :half + 1]
            c_R = c_forward[np.where(c_backward == c)[0]]
            if len(np.intersect1d(c_R, R)) > 2 / 3 * len(c_R):
                expansion = np.append(expansion, c_R)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)

    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(n):
            V_qe[i] = np.mean(V[rank[i, :k2], :], axis=0)
        V = V_qe

    inverted = [np.where(V[:, j] != 0)[0] for j in range(n)]
    jaccard = np.zeros((num_q, n))
    for i in range(num_q):
        shared = np.zeros(n)
        for j in np.where(V[i] != 0)[0]:
            shared[inverted[j]] += np.minimum(V[i, j], V[inverted[j], j])
        jaccard[i] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lambda_value) + dist[:num_q] * lambda_value
    return final[:, num_q:]


def identity_problem(seed, num_q=30, num_g=80, dim=24, ids=10, noise=0.8, dtype=np.float64):
    """Features around one centroid per identity (so k-reciprocal sets are large and overlap), labels."""
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((ids, dim))
    q_pids, g_pids = rng.integers(0, ids, num_q), rng.integers(0, ids, num_g)
    q = centroids[q_pids] + noise * rng.standard_normal((num_q, dim))
    g = centroids[g_pids] + noise * rng.standard_normal((num_g, dim))
    labels = dict(q_pids=q_pids, g_pids=g_pids, q_camids=rng.integers(0, 3, num_q), g_camids=rng.integers(0, 3, num_g),
                  q_clothes=rng.integers(0, 2, num_q), g_clothes=rng.integers(0, 2, num_g))
    return q.astype(dtype), g.astype(dtype), labels


# ----------------------------------------------------------------------------- the algorithm

@pytest.mark.parametrize("seed,k1,k2,lam", [(0, 20, 6, 0.3), (1, 5, 3, 0.5), (2, 7, 1, 0.3), (3, 1, 1, 0.0),
                                            (4, 3, 10, 0.8), (5, 12, 2, 0.1), (6, 150, 6, 0.3)])
def test_equals_the_dense_transcription(seed, k1, k2, lam):
    q, g, _ = identity_problem(seed)
    ref = dense_rerank(q, g, k1, k2, lam)
    out = rerank(q, g, k1=k1, k2=k2, lambda_value=lam)
    assert out.dtype == torch.float64 and out.shape == (30, 80)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5, rtol=0)
    assert np.abs(out.numpy() - ref).max() < 1e-9  # in float64 the two agree far beyond that


def test_float32_features_match_too():
    q, g, _ = identity_problem(7, num_q=20, num_g=60, dtype=np.float32)
    out = rerank(q, g)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), dense_rerank(q.astype(np.float64), g.astype(np.float64), 20, 6, 0.3),
                               atol=1e-5, rtol=0)


def test_reranking_changes_the_ranking_and_helps_on_identity_structure():
    q, g, lab = identity_problem(8, num_q=40, num_g=160, noise=1.6)
    plain = rank_metrics_from_features(q, g, **lab)
    reranked = rank_metrics_from_features(q, g, **lab, rerank=RerankConfig())
    assert reranked["mAP"] > plain["mAP"]


def test_lambda_one_keeps_the_original_ranking():
    q, g, lab = identity_problem(9)
    out = rerank(q, g, lambda_value=1.0).numpy()
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    original = 1 - qn @ gn.T
    assert np.array_equal(np.argsort(out, axis=1, kind="stable"), np.argsort(original, axis=1, kind="stable"))
    for setting in ("general", "cc", "sc"):
        a = rank_metrics_from_features(q, g, **lab, setting=setting)
        b = rank_metrics_from_features(q, g, **lab, setting=setting, rerank=RerankConfig(lambda_value=1.0))
        assert np.array_equal(a["cmc"], b["cmc"]) and a["mAP"] == pytest.approx(b["mAP"], abs=1e-12)


# ----------------------------------------------------------------------------- chunks and memory

def test_chunks_and_budgets_do_not_change_the_result(monkeypatch):
    q, g, _ = identity_problem(10, num_q=37, num_g=90)
    whole = rerank(q, g, chunk=1000).numpy()
    for chunk in (1, 7, 36):
        np.testing.assert_allclose(rerank(q, g, chunk=chunk).numpy(), whole, atol=1e-12, rtol=0)
    monkeypatch.setattr(reranking, "RERANK_BUDGET", 50)  # every step splits into many small pieces
    np.testing.assert_allclose(rerank(q, g, chunk=5).numpy(), whole, atol=1e-12, rtol=0)


def test_the_metrics_path_equals_the_full_matrix_path():
    q, g, lab = identity_problem(11, num_q=33, num_g=70)
    config = RerankConfig(k1=9, k2=4, lambda_value=0.4)
    dist = rerank(q, g, config.k1, config.k2, config.lambda_value)
    for setting in ("general", "cc", "sc"):
        a = rank_metrics(dist, **lab, setting=setting)
        b = rank_metrics_from_features(q, g, **lab, setting=setting, rerank=config, chunk=8)
        assert np.array_equal(a["cmc"], b["cmc"]) and a["mAP"] == pytest.approx(b["mAP"], abs=1e-12)
        assert a["mINP"] == pytest.approx(b["mINP"], abs=1e-12)


def test_encoding_is_sparse_and_nothing_is_n_by_n(monkeypatch):
    """V keeps about 1.5 k1 non-zeros per row, and no step allocates a (Q + G)^2 array."""
    q, g, _ = identity_problem(12, num_q=60, num_g=400, dim=16, ids=40, dtype=np.float32)
    n, biggest = len(q) + len(g), []
    real_zeros, real_empty = torch.zeros, torch.empty

    def spy(real):
        def make(*size, **kw):
            t = real(*size, **kw)
            biggest.append(t.numel())
            return t
        return make

    monkeypatch.setattr(torch, "zeros", spy(real_zeros))
    monkeypatch.setattr(torch, "empty", spy(real_empty))
    qf, gf = reranking._unit_features(q, g)
    r = reranking._Reranked(qf, gf, RerankConfig(), chunk=16)
    monkeypatch.undo()
    assert max(biggest) < n * n / 10
    nnz = r.v.ptr.diff().float()
    assert nnz.max() < n / 2 and len(r.inverted.col) == int(r.v.ptr[-1] - r.v.ptr[len(q)])
    v0 = reranking._k_reciprocal_vectors(torch.cat([qf, gf]), *reranking._nearest(torch.cat([qf, gf]), 21, 16), 20, 16)
    assert float(v0.ptr.diff().float().mean()) < 1.5 * 20 + 1
    assert torch.allclose(torch.zeros(n).index_add_(0, torch.repeat_interleave(torch.arange(n), r.v.ptr.diff()),
                                                    r.v.val), torch.ones(n), atol=1e-5)  # rows sum to 1


def test_cuda_matches_cpu():
    """The device path (torch GEMM, topk and index ops on the GPU) on a real GPU, else on the look-alike."""
    q, g, lab = identity_problem(15, num_q=25, num_g=70, dtype=np.float32)
    cpu = rerank(q, g, chunk=8)
    cpu_metrics = rank_metrics_from_features(q, g, **lab, rerank=RerankConfig(), chunk=8)
    with contextlib.nullcontext() if torch.cuda.is_available() else fake_cuda():
        out = rerank(torch.as_tensor(q).cuda(), torch.as_tensor(g).cuda(), chunk=8)
        assert out.device.type == "cuda"
        np.testing.assert_allclose(out.cpu().numpy(), cpu.numpy(), atol=1e-5, rtol=0)
        m = rank_metrics_from_features(torch.as_tensor(q).cuda(), torch.as_tensor(g).cuda(), **lab,
                                       rerank=RerankConfig(), chunk=8)
        assert m["mAP"] == pytest.approx(cpu_metrics["mAP"], abs=1e-6)


# ----------------------------------------------------------------------------- API errors

@pytest.mark.parametrize("kwargs,word", [(dict(k1=0), "k1"), (dict(k2=0), "k2"), (dict(k1=2.5), "k1"),
                                         (dict(lambda_value=1.5), "lambda"), (dict(lambda_value=-0.1), "lambda"),
                                         (dict(lambda_value=float("nan")), "lambda")])
def test_bad_parameters_raise_user_error(kwargs, word):
    with pytest.raises(UserError, match=word):
        RerankConfig(**kwargs)
    q, g, _ = identity_problem(13, num_q=3, num_g=5)
    with pytest.raises(UserError, match=word):
        rerank(q, g, **kwargs)


# ----------------------------------------------------------------------------- CLI

def write_features(path, seed=14):
    q, g, lab = identity_problem(seed, num_q=16, num_g=48, noise=1.6, dtype=np.float32)
    arrays = {"protocols": np.array(["general", "cc"]), "mask_settings": np.array(["general", "cc"])}
    for name in ("general", "cc"):
        for part, feats, pre in (("query", q, "q_"), ("gallery", g, "g_")):
            arrays[f"{name}_{part}_feats"] = feats
            for field in ("pids", "camids", "clothes"):
                arrays[f"{name}_{part}_{field}"] = lab[pre + field]
    np.savez(path, **arrays)
    return q, g, lab


def test_cli_rerank_with_a_features_file(tmp_path, capsys):
    q, g, lab = write_features(tmp_path / "feats.npz")
    argv = ["--features", str(tmp_path / "feats.npz"), "--device", "cpu", "--rerank", "--k1", "9", "--k2", "3",
            "--lambda-value", "0.25", "--visualize", "2"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert "re-ranked" in out and "k1 = 9" in out and "Rank-1" in out
    record = json.loads((tmp_path / "results.json").read_text())["evaluate"]
    assert record["rerank"] == {"k1": 9, "k2": 3, "lambda": 0.25}
    dist = rerank(q, g, 9, 3, 0.25)
    for setting in ("general", "cc"):
        r = rank_metrics(dist, **lab, setting=setting)
        assert record["metrics"][setting]["mAP"] == pytest.approx(100 * r["mAP"], abs=1e-4)
        assert record["metrics"][setting]["rank1"] == pytest.approx(100 * r["cmc"][0], abs=1e-4)
    assert (tmp_path / "ranked_cc.png").stat().st_size > 0
    # the defaults, and a plain run records that nothing was re-ranked
    assert evaluate.main(["--features", str(tmp_path / "feats.npz"), "--device", "cpu", "--rerank",
                          "--setting", "cc"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["evaluate"]["rerank"] == \
        {"k1": 20, "k2": 6, "lambda": 0.3}
    capsys.readouterr()
    assert evaluate.main(["--features", str(tmp_path / "feats.npz"), "--device", "cpu"]) == 0
    assert "re-ranked" not in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["evaluate"]["rerank"] is None


@pytest.mark.parametrize("flags,word", [(["--rerank", "--k1", "0"], "--k1"), (["--rerank", "--k2", "-3"], "--k2"),
                                        (["--rerank", "--lambda-value", "1.5"], "--lambda-value"),
                                        (["--rerank", "--lambda-value", "-0.2"], "--lambda-value"),
                                        (["--k1", "10"], "--rerank")])
def test_cli_bad_rerank_flags_give_one_error_line(tmp_path, capsys, flags, word):
    write_features(tmp_path / "feats.npz")
    assert evaluate.main(["--features", str(tmp_path / "feats.npz")] + ["--device", "cpu"] + flags) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and word in err, err
    assert "Rank-1" not in captured.out and not (tmp_path / "results.json").exists()
