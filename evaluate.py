"""Re-ID evaluation: the CAL protocols (METHOD.md section 5), feature extraction, reports and a CLI.

    python evaluate.py --checkpoint runs/sci/best.pt                 # all of the dataset's protocols
    python evaluate.py --checkpoint runs/sci/best.pt --save-features feats.npz --visualize 8
    python evaluate.py --features feats.npz --setting cc              # no model needed
    python evaluate.py --features feats.npz --rerank --k1 20 --k2 6 --lambda-value 0.3   # k-reciprocal re-ranking
    python evaluate.py --checkpoint runs/sci/best.pt --heatmaps 8 --compare runs/base/best.pt --tsne

The table is printed and results.json is written beside the checkpoint (or features file, or into
--out-dir) under the key "evaluate"; the other keys of an existing results.json (the training
run's record) are kept.

Protocol. For each query the gallery is sorted by distance, ascending, ties broken by gallery
order. Gallery images of the query's identity are either *good* (correct matches) or *junk*
(removed from the ranking before anything is counted):
    general  good = other camera                      junk = same camera
    cc       good = other camera and other clothes    junk = same camera or same clothes
    sc       good = other camera and same clothes     junk = same camera or other clothes
Queries without a good image are skipped (and counted). With 1-based ranks r_1 < ... < r_n of
the n good images after junk removal: CMC(k) = [r_1 <= k], AP = (1/n) sum_i i / r_i and
INP = n / r_n (Ye et al., TPAMI 2021); each is averaged over the valid queries.

Features file (.npz, written by --save-features, read by --features), one group of arrays per
protocol NAME listed in `protocols` (str array):
    NAME_query_feats, NAME_gallery_feats    float [N, F]
    NAME_{query,gallery}_pids, _camids      int [N]
    NAME_{query,gallery}_clothes            int [N]  (needed by the cc and sc masks)
    NAME_{query,gallery}_paths              str [N]  (optional; images for --visualize)
and optionally `mask_settings` (str array, which masks each protocol uses; default: the
protocol's own name when it is general/cc/sc, else general) and `dataset` (str, e.g. "prcc").
A folder search's file holds one protocol named "search", its labels only when they were known
(see save_features).

Folder search: your own images, no dataset layout needed (nested folders, any type PIL reads):
    python evaluate.py --checkpoint runs/sci/best.pt --query my/queries --gallery my/gallery --top 10
    python evaluate.py --checkpoint runs/sci/best.pt --query q --gallery g --labels ids.csv --save-features s.npz
writes search.csv (query,rank,gallery_path,distance) and search_*.png to --out-dir; with --labels
(header path,pid[,camid][,clothes]) also the metrics (general, and cc and sc with clothes labels).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from config import DEFAULT_OUTPUT_DIR
from utils import UserError, check_stop, default_workers, write_atomic

SETTINGS = ("general", "cc", "sc")
RANKS = (1, 5, 10, 20)          # the ranks reported in tables and results.json
DEFAULT_CHUNK = 256             # queries per distance block: 256 x 82,161 float32 is 84 MB at MSMT17 scale
CANDIDATE_BUDGET = 1 << 21      # ranked (query, gallery) pairs held at once; bounds memory when rankings are poor
SINGLE_SHOT_DRAWS = 10          # PRCC single-shot: draws of one gallery image per identity


# ----------------------------------------------------------------------------- input checks

def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} cannot be read as an array ({exc}); pass a numpy array or a torch tensor") from None


def _labels(x, name: str, n: int, device: torch.device) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 1 or len(t) != n:
        raise UserError(f"{name} has shape {tuple(t.shape)} but {n} labels were expected (one per "
                        f"{'query' if name.startswith('q') else 'gallery'} row); check that features and labels match")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise UserError(f"{name} has dtype {t.dtype}; labels must be integers")
    return t.to(device=device, dtype=torch.long)


def _check_inputs(num_q: int, num_g: int, device: torch.device, q_pids, g_pids, q_camids, g_camids,
                  q_clothes, g_clothes, setting: str, max_rank: int) -> tuple:
    """Label tensors on `device`, after checking everything the metrics rely on."""
    if setting not in SETTINGS:
        raise UserError(f"unknown setting {setting!r}; use one of {', '.join(SETTINGS)}")
    if num_q == 0:
        raise UserError("the query set is empty; there is nothing to evaluate")
    if num_g == 0:
        raise UserError("the gallery is empty; every query needs a gallery to be ranked against")
    if not isinstance(max_rank, int) or max_rank < 1:
        raise UserError(f"max_rank must be a positive integer, got {max_rank!r}")
    if setting != "general" and (q_clothes is None or g_clothes is None):
        raise UserError(f"setting {setting!r} compares clothes but no clothes labels were given; "
                        "pass q_clothes and g_clothes, or use setting 'general'")
    qp, gp = _labels(q_pids, "q_pids", num_q, device), _labels(g_pids, "g_pids", num_g, device)
    qc, gc = _labels(q_camids, "q_camids", num_q, device), _labels(g_camids, "g_camids", num_g, device)
    qo = _labels(q_clothes, "q_clothes", num_q, device) if q_clothes is not None else None
    go = _labels(g_clothes, "g_clothes", num_g, device) if g_clothes is not None else None
    return qp, gp, qc, gc, qo, go


def _unit_features(q_feats, g_feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery features L2-normalised (as F.normalize does), on one device, after checks."""
    q, g = _as_tensor(q_feats, "q_feats"), _as_tensor(g_feats, "g_feats")
    for t, name in ((q, "query"), (g, "gallery")):
        if t.dim() != 2:
            raise UserError(f"{name} features have shape {tuple(t.shape)}; expected [N, F]")
    if q.shape[1] != g.shape[1]:
        raise UserError(f"query features are {q.shape[1]}-d but gallery features are {g.shape[1]}-d; "
                        "both must come from the same model")
    # half precision would make distances tie far too often: rank in float32 (float64 stays float64)
    dtype = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
    device = g.device if g.device.type != "cpu" else q.device  # compute where the features are
    out = []
    for t, name in ((q, "query"), (g, "gallery")):
        t = t.to(device=device, dtype=dtype)
        norm = t.norm(dim=1, keepdim=True)  # finite exactly when the whole row is (and not absurdly large)
        if not bool(torch.isfinite(norm).all()):
            bad = int((~torch.isfinite(norm)).sum())
            raise UserError(f"{bad} {name} feature rows contain NaN or inf; the model produced invalid "
                            "features (check the checkpoint, or evaluate without --amp)")
        out.append(t / norm.clamp_min(1e-12))
    return out[0], out[1]


# ----------------------------------------------------------------------------- ranking core

def _gallery_index(g_pid: torch.Tensor, g_cam: torch.Tensor, g_clo: torch.Tensor | None) -> dict:
    """Gallery labels plus the gallery sorted by identity, so a query's same-identity images are one slice."""
    order = torch.argsort(g_pid, stable=True)
    return {"pid": g_pid, "cam": g_cam, "clo": g_clo, "order": order, "sorted_pid": g_pid[order]}


def protocol_masks(q_pid, q_cam, q_clo, g_pids: np.ndarray, g_cams: np.ndarray, g_clos: np.ndarray | None,
                   setting: str) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (good, junk) gallery masks of one query: the protocol's definition (module docstring).
    Every same-identity image is one or the other; no other image is either. g_clos (and q_clo) may be
    None for "general" only."""
    if setting not in SETTINGS:
        raise UserError(f"unknown setting {setting!r}; use one of {', '.join(SETTINGS)}")
    same = np.asarray(g_pids) == q_pid
    good = same & (np.asarray(g_cams) != q_cam)
    if setting != "general":
        same_clothes = np.asarray(g_clos) == q_clo
        good &= ~same_clothes if setting == "cc" else same_clothes
    return good, same & ~good


def _same_identity(q_pid, q_cam, q_clo, gal: dict, setting: str) -> tuple[torch.Tensor, ...]:
    """For each query, the gallery images of its identity as a padded [c, K] index matrix, split into
    good and junk. Every same-identity image is one or the other; no other image is either.
    The rules are protocol_masks'; this batched tensor form is the fast core's, kept separate for speed."""
    start = torch.searchsorted(gal["sorted_pid"], q_pid)
    count = torch.searchsorted(gal["sorted_pid"], q_pid, right=True) - start
    k = int(count.max())
    slot = torch.arange(k, device=q_pid.device)
    present = slot < count[:, None]
    idx = gal["order"][(start[:, None] + slot).clamp(max=len(gal["order"]) - 1)]
    good = present & (gal["cam"][idx] != q_cam[:, None])
    if setting == "cc":
        good &= gal["clo"][idx] != q_clo[:, None]
    elif setting == "sc":
        good &= gal["clo"][idx] == q_clo[:, None]
    return idx, good, present & ~good


def _row_pieces(counts: list[int], budget: int, max_rows: int) -> list[tuple[int, int]]:
    """Split rows into consecutive pieces of at most `budget` items (a single row may exceed it) and
    at most `max_rows` rows."""
    pieces, start, total = [], 0, 0
    for row, n in enumerate(counts):
        if (total + n > budget or row - start == max_rows) and row > start:
            pieces.append((start, row))
            start, total = row, 0
        total += n
    pieces.append((start, len(counts)))
    return pieces


def _order_code(d: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 2^32) ordered like `d` and equal exactly where `d` ties: a float32's bit
    pattern made monotone, or (other dtypes) the dense rank among the values."""
    if d.dtype == torch.float32:
        bits = (d + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0: they tie as numbers
        return torch.where(bits < 0, ~bits, bits + (1 << 31))  # negatives count down, positives up
    return torch.unique(d, sorted=True, return_inverse=True)[1]


def _sort_keys(keys: torch.Tensor) -> torch.Tensor:
    if keys.device.type == "cpu":  # numpy's vectorised int64 sort ran ~6x faster than torch.sort on the dev CPU
        return torch.from_numpy(np.sort(keys.numpy()))
    return torch.sort(keys).values


def _rank_chunk(dist: torch.Tensor, q_pid, q_cam, q_clo, gal: dict, setting: str) -> tuple[torch.Tensor, ...]:
    """Per query of a [c, G] distance block: (number of good images, AP, INP, rank of the first good).

    No row is fully sorted. Images ranked after the hardest good match cannot change CMC, AP or INP,
    so only the non-junk images at or below its distance are kept (typically a small part of G).
    Each kept image becomes one int64 key (query | distance | gallery index), so a single sort of
    the keys gives, for every query at once, exactly the stable per-row order.
    """
    c, num_g, device = dist.shape[0], dist.shape[1], dist.device
    idx, good, junk = _same_identity(q_pid, q_cam, q_clo, gal, setting)
    n_good = good.sum(1)
    # ranks[q, i]: rank of query q's (i+1)-th good match, 0 where none; at least one column
    ranks = torch.zeros(c, max(good.shape[1], 1), dtype=torch.long, device=device)
    if bool(good.any()):
        worst = dist.gather(1, idx).masked_fill(~good, float("-inf")).amax(1)  # -inf: no good match, keep nothing
        keep = dist <= worst[:, None]
        keep[junk.nonzero(as_tuple=True)[0], idx[junk]] = False  # junk leaves the ranking
        flat = keep.view(-1).nonzero()[:, 0]                      # kept pairs as row * G + col, ascending
        row_ptr = torch.searchsorted(flat, torch.arange(c + 1, device=device) * num_g)
        per_row = row_ptr.diff()
        good_ptr = n_good.cumsum(0) - n_good                      # where each query's goods start, likewise
        col_bits = max((num_g - 1).bit_length(), 1)  # key layout: row bits | 32 distance bits | col_bits
        for a, b in _row_pieces(per_row.tolist(), CANDIDATE_BUDGET, max_rows=1 << (31 - col_bits)):
            f = flat[row_ptr[a]:row_ptr[b]]
            rows = f // num_g
            cols = f - rows * num_g
            code = _order_code(dist.reshape(-1)[f])
            keys = _sort_keys(((rows - a) << (32 + col_bits)) | (code << col_bits) | cols)
            rows, cols = (keys >> (32 + col_bits)) + a, keys & ((1 << col_bits) - 1)  # by query, distance, index
            rank = torch.arange(len(rows), device=device) - (row_ptr[rows] - row_ptr[a]) + 1  # 1-based, junk removed
            is_good = gal["pid"][cols] == q_pid[rows]              # same identity and not junk
            g_rows, g_rank = rows[is_good], rank[is_good]
            i = torch.arange(len(g_rows), device=device) - (good_ptr[g_rows] - good_ptr[a])  # 0-based, per query
            ranks[g_rows, i] = g_rank
    i = torch.arange(1, ranks.shape[1] + 1, device=device, dtype=torch.float64)
    n = n_good.double()
    ap = torch.where(ranks > 0, i / ranks.clamp(min=1), 0.0).sum(1) / n.clamp(min=1)
    last = ranks.gather(1, (n_good - 1).clamp(min=0)[:, None])[:, 0]
    inp = n / last.clamp(min=1)  # 0 for queries without a good match (n = 0)
    return n_good, ap, inp, ranks[:, 0]


def _summarize(parts: list[tuple[torch.Tensor, ...]], max_rank: int, setting: str) -> dict:
    n_good, ap, inp, first = (torch.cat([p[j] for p in parts]).cpu() for j in range(4))
    valid = n_good > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise UserError(f"no query has a correct match in the gallery under the {setting!r} protocol (all "
                        f"{len(valid)} skipped); check the pid/camera/clothes labels")
    hits = torch.bincount(first[valid].clamp(max=max_rank + 1), minlength=max_rank + 2)[1:max_rank + 1]
    return {"cmc": (hits.cumsum(0).double() / num_valid).numpy(),
            "mAP": float(ap[valid].sum()) / num_valid,
            "mINP": float(inp[valid].sum()) / num_valid,
            "num_valid_queries": num_valid,
            "num_skipped_queries": len(valid) - num_valid}


def rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, q_clothes=None, g_clothes=None,
                 setting: str = "general", max_rank: int = 50) -> dict:
    """CMC (fractions, length max_rank), mAP, mINP and query counts from a [Q, G] distance matrix
    (numpy or torch, any device); see the module docstring for the protocol."""
    dist = _as_tensor(distmat, "distmat")
    if not dist.dtype.is_floating_point:
        dist = dist.double()
    if dist.dim() != 2:
        raise UserError(f"distmat has shape {tuple(dist.shape)}; expected [num_query, num_gallery]")
    labels = _check_inputs(dist.shape[0], dist.shape[1], dist.device, q_pids, g_pids, q_camids, g_camids,
                           q_clothes, g_clothes, setting, max_rank)
    if bool(torch.isnan(dist).any()):
        raise UserError("distmat contains NaN; distances must be comparable numbers")
    qp, gp, qc, gc, qo, go = labels
    gal = _gallery_index(gp, gc, go)
    parts = []
    for s in range(0, dist.shape[0], DEFAULT_CHUNK):
        check_stop()
        e = s + DEFAULT_CHUNK
        parts.append(_rank_chunk(dist[s:e], qp[s:e], qc[s:e], None if qo is None else qo[s:e], gal, setting))
    return _summarize(parts, max_rank, setting)


def _cosine_distance(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """1 - q.g for L2-normalised rows, [len(q), len(g)], in the features' dtype."""
    if q.device.type == "cpu":
        # numpy's OpenBLAS GEMM ran ~1.6x faster than torch's MKL one on the 2-core AMD dev machine
        dist = torch.from_numpy(q.numpy() @ g.numpy().T)
    else:
        dist = q @ g.T
    return dist.neg_().add_(1)  # -x + 1 rounds exactly like 1 - x


def rank_metrics_from_features(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, q_clothes=None,
                               g_clothes=None, setting: str = "general", max_rank: int = 50,
                               chunk: int = DEFAULT_CHUNK, rerank: RerankConfig | None = None) -> dict:
    """rank_metrics on the cosine distance 1 - q.g of L2-normalised features, computed `chunk`
    queries at a time (the full Q x G matrix is never held), on the features' device, in their
    dtype (float64 stays float64; half precision is ranked in float32). A GEMM's last bit depends
    on its block shape, so a different `chunk` or device can reorder distances within one ulp.
    With `rerank`, the distances are k-reciprocal re-ranked ones (`rerank`, Eq. 11), also per block."""
    q, g = _unit_features(q_feats, g_feats)
    if not isinstance(chunk, int) or chunk < 1:
        raise UserError(f"chunk must be a positive integer, got {chunk!r}")
    qp, gp, qc, gc, qo, go = _check_inputs(len(q), len(g), q.device, q_pids, g_pids, q_camids, g_camids,
                                           q_clothes, g_clothes, setting, max_rank)
    gal = _gallery_index(gp, gc, go)
    reranked = _Reranked(q, g, rerank, chunk) if rerank is not None else None
    parts = []
    for s in range(0, len(q), chunk):
        check_stop()
        e = s + chunk
        dist = _cosine_distance(q[s:e], g) if reranked is None else reranked.block(s, e)
        parts.append(_rank_chunk(dist, qp[s:e], qc[s:e], None if qo is None else qo[s:e], gal, setting))
        del dist
    return _summarize(parts, max_rank, setting)


# ----------------------------------------------------------------------------- k-reciprocal re-ranking
#
# Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017.
# Probe and gallery form one set of N = Q + G points. With d the original distance and N(p, k) the
# k nearest points of p (Eq. 2), R(p, k) = {g in N(p, k) : p in N(g, k)} (Eq. 3); R*(p, k1) adds to
# R(p, k1) the R(q, k1/2) of each q in it that mostly lies in R(p, k1) (Eq. 4). V_p puts the weight
# exp(-d(p, g)) on each g in R*(p, k1) (Eq. 7); local query expansion replaces V_p by the mean of the
# V of p's k2 nearest points (Eq. 10); the Jaccard distance of p and g is 1 - sum_j min(V_pj, V_gj) /
# sum_j max(V_pj, V_gj) (Eq. 8-9); the final distance is d* = (1 - lambda) d_J + lambda d (Eq. 11).
#
# Details follow the authors' released code, which produced the paper's numbers (and most re-ranked
# numbers published since): N(p, k) holds k + 1 points (p itself first); R(q, k1/2) uses round(k1/2),
# half to even; q's set is added when strictly more than 2/3 of it lies in R(p, k1) (Eq. 4 writes >=);
# each row of d is divided by its maximum over all N points before anything else, and V_p is
# normalised to sum to 1, so that sum_j max = 2 - sum_j min.
#
# Distance: d = 1 - cos of L2-normalised features, the distance of the rest of this module. The public
# implementations use the squared Euclidean distance of the (normalised) features, 2 - 2 cos = 2 d;
# after the division by the row maximum the two are the same numbers, so nothing depends on the choice.
#
# Memory: nothing N x N exists. The neighbour lists come from `chunk` rows of distances at a time
# (topk, no sort); V (about 1.5 k1 non-zeros per row, a few times that after query expansion) and its
# inverted index are sparse (CSR); the Jaccard distances of a block of queries are accumulated through
# the inverted index, at most RERANK_BUDGET (query, shared point, gallery) triples at once. The only
# dense arrays are [chunk, N] distance blocks and masks, and the [chunk, G] result block, which the
# metrics consume as they do plain distances. Beyond the features, memory grows as N, not N^2.

RERANK_BUDGET = 1 << 22         # elements of the re-ranking's intermediate index arrays held at once (32 MB each)


@dataclass(frozen=True)
class RerankConfig:
    """Parameters of k-reciprocal re-ranking; the defaults are the paper's (and its code's)."""
    k1: int = 20                 # k of the k-reciprocal sets R(p, k1) (Eq. 3-4)
    k2: int = 6                  # neighbours averaged by local query expansion (Eq. 10); 1 = none
    lambda_value: float = 0.3    # weight of the original distance in d* (Eq. 11)

    def __post_init__(self) -> None:
        for name, flag in (("k1", "--k1"), ("k2", "--k2")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"re-ranking {name} ({flag}) must be an integer >= 1, got {value!r}; "
                                f"the paper uses k1 = 20, k2 = 6")
        lam = self.lambda_value
        if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)) or not 0 <= lam <= 1:
            raise UserError(f"re-ranking lambda (--lambda-value) must be a number in [0, 1], got {lam!r}; "
                            "it weighs the original distance against the Jaccard distance (the paper uses 0.3)")

    def to_json(self) -> dict:
        return {"k1": int(self.k1), "k2": int(self.k2), "lambda": float(self.lambda_value)}


class _Sparse(NamedTuple):
    """Compressed sparse rows: row i's entries are col[ptr[i]:ptr[i + 1]] (ascending) and val[...]."""
    ptr: torch.Tensor    # [rows + 1] long
    col: torch.Tensor    # [nnz] long
    val: torch.Tensor    # [nnz] float


def _row_pointers(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """CSR pointers [num_rows + 1] of entries sorted by row."""
    ptr = torch.zeros(num_rows + 1, dtype=torch.long, device=rows.device)
    ptr[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
    return ptr


def _csr_take(ptr: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored entries of the CSR rows `rows` [R], row after row: (for each entry, which of `rows`
    it belongs to; its position in the col / val arrays)."""
    start, count = ptr[rows], ptr[rows + 1] - ptr[rows]
    owner = torch.repeat_interleave(torch.arange(len(rows), device=ptr.device), count)
    first = count.cumsum(0) - count
    return owner, start[owner] + torch.arange(len(owner), device=ptr.device) - first[owner]


def _rows_within(budget: int, per_row: int, chunk: int) -> int:
    """Rows per step so that a step holds about `budget` elements (at least one row, at most `chunk`)."""
    return max(1, min(chunk, budget // max(per_row, 1)))


def _nearest(x: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the k nearest points of each point, nearest first [N, k]; each point's largest distance [N]) under
    d = 1 - x.x' of unit rows x [N, F], from `chunk` rows of distances at a time (Eq. 2). Ties are
    broken arbitrarily, as by the argsort of the authors' code."""
    n = len(x)
    rank = torch.empty(n, k, dtype=torch.long, device=x.device)
    row_max = torch.empty(n, dtype=x.dtype, device=x.device)
    for s in range(0, n, chunk):
        check_stop()
        d = _cosine_distance(x[s:s + chunk], x)                              # [c, N]
        row_max[s:s + chunk] = d.amax(1)
        rank[s:s + chunk] = d.topk(k, dim=1, largest=False, sorted=True).indices
        del d
    return rank, row_max.clamp_min(torch.finfo(x.dtype).tiny)  # > 0 even when all points coincide


def _reciprocal(rank: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """R(p, k) of every point (Eq. 3) as [N, k + 1] indices: N(p, k) = rank[p, :k + 1] (p itself and its
    k nearest, as in the authors' code), with N, "no point", where g in N(p, k) has p outside N(g, k)."""
    n = len(rank)
    forward = rank[:, :k + 1]                                                # [N, k + 1]
    out = torch.empty_like(forward)
    step = _rows_within(RERANK_BUDGET, forward.shape[1] ** 2, chunk)
    for s in range(0, n, step):
        f = forward[s:s + step]                                              # [c, k + 1]
        me = torch.arange(s, s + len(f), device=rank.device)
        mutual = (forward[f] == me[:, None, None]).any(2)                    # [c, k + 1]: p in N(g, k)
        out[s:s + step] = f.masked_fill(~mutual, n)
    return out


def _expanded_sets(r1: torch.Tensor, rh: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """R*(p, k1) (Eq. 4) of points s..e-1 as a boolean [c, N] mask: R(p, k1) (r1, [N, K1]) plus the
    R(q, k1/2) (rh, [N, Kh]) of every q in R(p, k1) of which strictly more than 2/3 lies in R(p, k1)
    (the authors' code; Eq. 4 writes >=). Index N in r1 / rh means "no point"."""
    n = len(r1)
    r = r1[s:e]                                                              # [c, K1]
    cand = rh[r.clamp(max=n - 1)].masked_fill((r == n)[:, :, None], n)      # [c, K1, Kh]: R(q, k1/2) of each q
    members = torch.zeros(len(r), n + 1, dtype=torch.bool, device=r.device)  # column N collects "no point"
    members.scatter_(1, r, True)
    members[:, n] = False
    inside = members.gather(1, cand.flatten(1)).view_as(cand).sum(2)         # |R(q, k1/2) ∩ R(p, k1)|
    size = (cand < n).sum(2)                                                 # |R(q, k1/2)|
    accept = inside.double() > 2.0 / 3.0 * size.double()                     # [c, K1]
    members.scatter_(1, cand.masked_fill(~accept[:, :, None], n).flatten(1), True)
    return members[:, :n]


def _pair_distances(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """1 - x[rows] . x[cols] for index pairs [P], a piece at a time (never [P, F] at once)."""
    out = torch.empty(len(rows), dtype=x.dtype, device=x.device)
    piece = _rows_within(RERANK_BUDGET, x.shape[1], len(rows))
    for s in range(0, len(rows), piece):
        out[s:s + piece] = 1 - (x[rows[s:s + piece]] * x[cols[s:s + piece]]).sum(1)
    return out


def _k_reciprocal_vectors(x: torch.Tensor, rank: torch.Tensor, row_max: torch.Tensor, k1: int,
                          chunk: int) -> _Sparse:
    """V_p of every point p (Eq. 7) as sparse rows [N, N]: exp(-d(p, g) / max_j d(p, j)) on the points g
    of R*(p, k1), normalised to sum to 1 (the authors' code)."""
    n = len(x)
    r1, rh = _reciprocal(rank, k1, chunk), _reciprocal(rank, round(k1 / 2), chunk)  # round: half to even, as numpy
    rows, cols = [], []
    step = _rows_within(RERANK_BUDGET, r1.shape[1] * rh.shape[1], chunk)
    for s in range(0, n, step):
        check_stop()
        i, j = _expanded_sets(r1, rh, s, min(s + step, n)).nonzero(as_tuple=True)  # by row, columns ascending
        rows.append(i + s)
        cols.append(j)
    rows, cols = torch.cat(rows), torch.cat(cols)
    weight = torch.exp(-(_pair_distances(x, rows, cols) / row_max[rows]))
    weight /= torch.zeros_like(row_max).index_add_(0, rows, weight)[rows]
    return _Sparse(_row_pointers(rows, n), cols, weight)


def _query_expansion(v: _Sparse, neighbours: torch.Tensor, chunk: int) -> _Sparse:
    """Local query expansion (Eq. 10): row p becomes the mean of the rows of its nearest points
    `neighbours` [N, k2] (p itself first)."""
    n, k2 = neighbours.shape
    nnz = v.ptr.diff()
    per_row = nnz[neighbours].sum(1).tolist()
    rows, cols, vals = [], [], []
    for a, b in _row_pieces(per_row, RERANK_BUDGET, max_rows=chunk):
        check_stop()
        owner, pos = _csr_take(v.ptr, neighbours[a:b].reshape(-1))
        key = (owner // k2) * n + v.col[pos]                         # (row within the piece, column)
        key, where = torch.unique(key, sorted=True, return_inverse=True)
        total = torch.zeros(len(key), dtype=v.val.dtype, device=v.val.device).index_add_(0, where, v.val[pos])
        rows.append(key // n + a)
        cols.append(key % n)
        vals.append(total / k2)
    rows = torch.cat(rows)
    return _Sparse(_row_pointers(rows, n), torch.cat(cols), torch.cat(vals))


def _inverted_index(v: _Sparse, first: int) -> _Sparse:
    """The inverted index of rows first.. of V (the gallery): for each point j, the gallery images g with
    V_gj != 0 (numbered from 0) and those values, i.e. V[first:] transposed, as sparse rows."""
    n = len(v.ptr) - 1
    rows = torch.repeat_interleave(torch.arange(n, device=v.col.device), v.ptr.diff())
    keep = rows >= first
    rows, cols, vals = rows[keep] - first, v.col[keep], v.val[keep]
    order = torch.argsort(cols, stable=True)                         # by point j, gallery ascending
    return _Sparse(_row_pointers(cols[order], n), rows[order], vals[order])


def _jaccard(v: _Sparse, inverted: _Sparse, s: int, e: int, num_g: int) -> torch.Tensor:
    """Jaccard distances d_J (Eq. 8-9) of points s..e-1 (queries) to every gallery image, [c, G]:
    1 - m / (2 - m) with m = sum_j min(V_pj, V_gj) (rows of V sum to 1, so sum_j max = 2 - m). The sum
    runs over the points j of V_p only, each met through the inverted index."""
    shared = torch.zeros(e - s, num_g, dtype=v.val.dtype, device=v.val.device)  # m, [c, G]
    local_ptr = v.ptr[s:e + 1] - v.ptr[s]
    cols, vals = v.col[v.ptr[s]:v.ptr[e]], v.val[v.ptr[s]:v.ptr[e]]           # V_p's entries, row after row
    hits = inverted.ptr.diff()[cols]                                          # gallery images sharing each j
    owner = torch.repeat_interleave(torch.arange(e - s, device=cols.device), local_ptr.diff())
    per_row = torch.zeros(e - s, dtype=torch.long, device=cols.device).index_add_(0, owner, hits).tolist()
    for a, b in _row_pieces(per_row, RERANK_BUDGET, max_rows=e - s):
        lo, hi = local_ptr[a], local_ptr[b]
        entry, pos = _csr_take(inverted.ptr, cols[lo:hi])                     # (p, j) entry -> (g, V_gj)
        smaller = torch.minimum(vals[lo:hi][entry], inverted.val[pos])
        shared.view(-1).index_add_(0, owner[lo:hi][entry] * num_g + inverted.col[pos], smaller)
    return shared.div_(2 - shared).neg_().add_(1)   # 1 - m / (2 - m) in place (-x + 1 rounds like 1 - x)


class _Reranked:
    """d* (Eq. 11) of query blocks against the gallery, for unit features q [Q, F], g [G, F] on one device.
    Building it does all the work that involves the N = Q + G points together; `block(s, e)` then costs
    about as much as a plain distance block."""

    def __init__(self, q: torch.Tensor, g: torch.Tensor, config: RerankConfig, chunk: int):
        if not isinstance(config, RerankConfig):
            raise UserError(f"rerank must be a RerankConfig (e.g. RerankConfig(k1=20, k2=6, lambda_value=0.3)), "
                            f"got {config!r}")
        self.q, self.g, self.lam = q, g, float(config.lambda_value)
        x = torch.cat([q, g])                                                 # [N, F]: probe and gallery together
        k = min(max(config.k1 + 1, config.k2), len(x))
        rank, self.row_max = _nearest(x, k, chunk)
        v = _k_reciprocal_vectors(x, rank, self.row_max, config.k1, chunk)
        del x
        if config.k2 > 1:
            v = _query_expansion(v, rank[:, :config.k2], chunk)
        self.v, self.inverted = v, _inverted_index(v, len(q))

    def block(self, s: int, e: int) -> torch.Tensor:
        """d* of queries s..e-1 against every gallery image, [c, G]: the row-normalised original distance
        (as the authors' code) weighted by lambda, plus the Jaccard distance weighted by 1 - lambda."""
        e = min(e, len(self.q))
        d = _cosine_distance(self.q[s:e], self.g).div_(self.row_max[s:e, None])        # [c, G]
        return _jaccard(self.v, self.inverted, s, e, len(self.g)).mul_(1 - self.lam).add_(d.mul_(self.lam))


def rerank(q_feats, g_feats, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
           chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017; Eq. 2-11, see the notes above): the final distance
    d* [Q, G] of query features [Q, F] to gallery features [G, F] (numpy or torch), on their device, in
    the dtype rank_metrics_from_features would use. Memory grows with Q + G, not (Q + G)^2, apart from the
    [Q, G] result itself; rank_metrics_from_features(..., rerank=RerankConfig()) does not even hold that."""
    config = RerankConfig(k1, k2, lambda_value)
    q, g = _unit_features(q_feats, g_feats)
    if not isinstance(chunk, int) or chunk < 1:
        raise UserError(f"chunk must be a positive integer, got {chunk!r}")
    if len(q) == 0 or len(g) == 0:
        raise UserError(f"re-ranking needs queries and gallery images; got {len(q)} and {len(g)}")
    reranked = _Reranked(q, g, config, chunk)
    return torch.cat([reranked.block(s, s + chunk) for s in range(0, len(q), chunk)])


# ----------------------------------------------------------------------------- feature extraction

def _shard_loader(loader, rank: int, world: int):
    """A loader over this rank's contiguous share of the dataset (same batch size and workers)."""
    from torch.utils.data import DataLoader, Subset

    n = len(loader.dataset)
    per = -(-n // world)
    shard = Subset(loader.dataset, range(min(rank * per, n), min((rank + 1) * per, n)))
    return DataLoader(shard, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn), per  # workers leave signals to the main process


def _gather_rows(x: torch.Tensor, per: int, n: int, device: torch.device) -> torch.Tensor:
    """all_gather of each rank's rows (padded to `per`), reassembled in dataset order on every rank."""
    import torch.distributed as dist

    padded = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[:len(x)] = x.to(device)
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(out, padded)
    return torch.cat(out)[:n].cpu()


def _close_batches(batches) -> None:
    """Stop a loader iterator's worker processes now, also when an error (an unreadable image) ends the
    loop early: the re-raised worker error sits in a reference cycle that would keep the iterator, and
    its workers, alive until exit, where multiprocessing would wait forever for workers that ignore
    SIGTERM (datasets._worker_init)."""
    if hasattr(batches, "close"):  # a generator over a loader (_Progress)
        batches.close()
    elif hasattr(batches, "_shutdown_workers"):  # torch's multi-process loader iterator (idempotent)
        batches._shutdown_workers()


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device: torch.device | str, flip: bool = False,
                     amp: bool = False, distributed: bool = True, amp_dtype: str | None = None
                     ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, F] float32 on CPU, pids, camids, clothes ids as int64 numpy) in the loader's
    order; the loader yields (img, pid, camid, clothes_id). With `flip`, each feature is the mean
    of the image's and its mirror's. When torch.distributed runs with several processes (and
    `distributed`), each rank extracts a contiguous shard and every rank gets all N rows back;
    pass distributed=False when only one rank calls this."""
    import torch.distributed as dist

    import utils

    device = torch.device(device)
    world = dist.get_world_size() if distributed and dist.is_available() and dist.is_initialized() else 1
    n = len(loader.dataset)
    if world > 1:
        loader, per = _shard_loader(loader, dist.get_rank(), world)
    model.eval()
    feats, labels = [], []
    batches = iter(loader)
    try:
        for img, pid, camid, clothes in batches:
            utils.check_stop()  # a training script's SIGINT/SIGTERM ends a long extraction within a batch
            img = img.to(device, non_blocking=True)
            with utils.autocast(device, amp, amp_dtype):
                f = model(img).float()
                if flip:
                    f = (f + model(img.flip(3)).float()) / 2
            feats.append(f.cpu())
            labels.append(torch.stack([torch.as_tensor(v, dtype=torch.long) for v in (pid, camid, clothes)], 1))
    finally:
        _close_batches(batches)
    dim = feats[0].shape[1] if feats else 0
    feats = torch.cat(feats) if feats else torch.zeros(0, dim)
    labels = torch.cat(labels) if labels else torch.zeros(0, 3, dtype=torch.long)
    if world > 1:
        nccl = dist.get_backend() == "nccl"  # NCCL moves CUDA tensors only
        comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        width = torch.tensor([dim], device=comm)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)  # a rank with an empty shard does not know F
        feats = feats if dim else torch.zeros(0, int(width))
        feats, labels = _gather_rows(feats, per, n, comm), _gather_rows(labels, per, n, comm)
    labels = labels.numpy()
    return feats, labels[:, 0].copy(), labels[:, 1].copy(), labels[:, 2].copy()


# ----------------------------------------------------------------------------- datasets

def protocol_features(model: torch.nn.Module, protocols: list, img_size: tuple[int, int], batch_size: int,
                      workers: int, device: torch.device | str, flip: bool = False,
                      distributed: bool = False, normalize=None) -> list[dict]:
    """Features for a dataset's protocols [(name, query_items, gallery_items, mask_setting)]: one dict
    per protocol {name, mask, query, gallery}, each split {feats, pids, camids, clothes, paths}.
    A list of items shared by several protocols (e.g. a gallery) is extracted once. `normalize`:
    the (mean, std) the model was trained with (its checkpoint's ModelConfig)."""
    from datasets import CLIP_NORMALIZATION, build_test_loader  # only needed when a model is evaluated

    cache: dict[int, dict] = {}

    def split(items: list) -> dict:
        if id(items) not in cache:
            loader = build_test_loader(items, img_size, batch_size, workers, normalize or CLIP_NORMALIZATION)
            feats, pids, camids, clothes = extract_features(model, loader, device, flip=flip, distributed=distributed)
            cache[id(items)] = {"feats": feats, "pids": pids, "camids": camids, "clothes": clothes,
                                "paths": [str(item[0]) for item in items]}
        return cache[id(items)]

    return [{"name": name, "mask": mask, "query": split(query), "gallery": split(gallery)}
            for name, query, gallery, mask in protocols]


def _metrics(query: dict, gallery: dict, mask: str, max_rank: int = 50, rerank: RerankConfig | None = None) -> dict:
    return rank_metrics_from_features(query["feats"], gallery["feats"], query["pids"], gallery["pids"],
                                      query["camids"], gallery["camids"], query.get("clothes"),
                                      gallery.get("clothes"), setting=mask, max_rank=max_rank, rerank=rerank)


def _single_shot(query: dict, gallery: dict, mask: str, rerank: RerankConfig | None = None) -> dict:
    """PRCC single-shot: one random gallery image per identity, 10 seeded draws, metrics averaged.
    The query counts are the first draw's (each draw keeps every identity, so they do not change)."""
    pids = np.asarray(gallery["pids"])
    runs = []
    for draw in range(SINGLE_SHOT_DRAWS):
        rng = np.random.default_rng(draw)
        keep = np.sort([rng.choice(np.flatnonzero(pids == pid)) for pid in np.unique(pids)])
        sub = {k: (v[torch.as_tensor(keep)] if isinstance(v, torch.Tensor) else np.asarray(v)[keep])
               for k, v in gallery.items() if v is not None}
        runs.append(_metrics(query, sub, mask, rerank=rerank))  # re-ranking sees this draw's gallery only
    out = {k: runs[0][k] for k in ("num_valid_queries", "num_skipped_queries")}
    out["cmc"] = np.mean([r["cmc"] for r in runs], axis=0)
    out.update({k: float(np.mean([r[k] for r in runs])) for k in ("mAP", "mINP")})
    return out


def evaluate_features(protocols: list[dict], single_shot: bool = False, rerank: RerankConfig | None = None) -> dict:
    """setting name -> rank metrics, for protocol dicts as protocol_features returns them; with `rerank`,
    on k-reciprocal re-ranked distances (each protocol's queries and gallery re-ranked together)."""
    return {p["name"]: (_single_shot if single_shot else _metrics)(p["query"], p["gallery"], p["mask"], rerank=rerank)
            for p in protocols}


def evaluate_dataset(model: torch.nn.Module, dataset, img_size: tuple[int, int], batch_size: int, workers: int,
                     device: torch.device | str, flip: bool = False, single_shot: bool = False,
                     distributed: bool = False, normalize=None) -> dict:
    """setting name -> rank metrics for every protocol of `dataset.protocols`. `single_shot` applies
    to PRCC only (METHOD.md section 5). Call it from one process, or with distributed=True from all."""
    protocols = protocol_features(model, dataset.protocols, img_size, batch_size, workers, device, flip, distributed,
                                  normalize)
    return evaluate_features(protocols, single_shot=single_shot and getattr(dataset, "name", None) == "prcc")


# ----------------------------------------------------------------------------- reports

def _at(cmc, k: int) -> float | None:
    return float(cmc[k - 1]) if len(cmc) >= k else None


def format_table(results: dict) -> str:
    """One row per setting: Rank-1/5/10/20, mAP and mINP in percent, then valid/skipped queries."""
    head = f"{'setting':<10}" + "".join(f"{h:>8}" for h in ("Rank-1", "Rank-5", "Rank-10", "Rank-20", "mAP", "mINP"))
    lines = [head + "  queries (valid/skipped)"]
    for name, m in results.items():
        values = [_at(m["cmc"], k) for k in RANKS] + [m["mAP"], m["mINP"]]
        cells = "".join(f"{'-':>8}" if v is None else f"{100 * v:>8.1f}" for v in values)
        lines.append(f"{name:<10}{cells}  {m['num_valid_queries']}/{m['num_skipped_queries']}")
    return "\n".join(lines)


def metrics_to_json(results: dict) -> dict:
    """setting -> {rank1, rank5, rank10, rank20, mAP, mINP} in percent (None where cmc is shorter)."""
    def pct(v):
        return None if v is None else round(100 * float(v), 4)  # 4 decimals: a table's 1-decimal rounding is exact
    return {name: {**{f"rank{k}": pct(_at(m["cmc"], k)) for k in RANKS}, "mAP": pct(m["mAP"]), "mINP": pct(m["mINP"])}
            for name, m in results.items()}


# ----------------------------------------------------------------------------- features files

def save_features(path: str | Path, protocols: list[dict], dataset: str | None = None) -> None:
    """Write protocol features (as protocol_features or folder_search return them) to an .npz that
    --features reads back and numpy.load reads alone. Keys, for each protocol NAME:

        protocols                     str [P]     the protocol names, in order
        mask_settings                 str [P]     the masks each uses: general, cc or sc
        dataset                       str []      the dataset's name (only when known)
        NAME_query_feats              float32 [Q, F]  test features, before L2 normalisation
        NAME_gallery_feats            float32 [G, F]
        NAME_query_paths              str [Q]     image paths (for the figures)
        NAME_gallery_paths            str [G]
        NAME_query_pids, NAME_gallery_pids        int64 [Q], [G]  identities
        NAME_query_camids, NAME_gallery_camids    int64 [Q], [G]  cameras
        NAME_query_clothes, NAME_gallery_clothes  int64 [Q], [G]  outfit ids, shared by query and gallery
        NAME_query_clothes_names, ...             str [Q], [G]    the outfit labels (for the figures; where
                                                                  the dataset or --labels names them)

    A dataset writes one protocol per setting (e.g. general, cc, sc). A folder search (--query/--gallery)
    writes one protocol named "search" (mask general) with feats and paths, and pids/camids (camids 0 for
    queries and 1 for gallery images where the labels have no camid column) only with --labels, clothes
    only when the labels have a clothes column; --features evaluates it under general, cc and sc as the
    search did, or without labels writes search.csv and the sheets again. Absent labels are absent keys:

        z = numpy.load("f.npz"); z["search_query_feats"], z["search_gallery_paths"]"""
    arrays = {"protocols": np.array([p["name"] for p in protocols]),
              "mask_settings": np.array([p["mask"] for p in protocols])}
    if dataset:
        arrays["dataset"] = np.array(dataset)
    for p in protocols:
        for part in ("query", "gallery"):
            for field, value in p[part].items():
                if value is None:
                    continue
                value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                arrays[f"{p['name']}_{part}_{field}"] = value.astype(np.float32) if field == "feats" else value
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: savez adds no .npz to the name, the file is `path` itself
            np.savez(f, **arrays)
    write_atomic(Path(path), write)


def load_features(path: str | Path) -> tuple[list[dict], str | None]:
    """(protocol dicts, dataset name or None) from a features .npz; UserError names what is missing."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"features file {path} does not exist; write one with --save-features or check the path")
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # a truncated zip, a pickle, not an npz at all
        raise UserError(f"cannot read {path} as a features .npz ({type(exc).__name__}: {exc})") from None
    if "protocols" not in arrays:
        raise UserError(f"{path} has no 'protocols' array; it was not written by evaluate.py --save-features "
                        "(see the features-file layout in `python evaluate.py --help`)")
    names = [str(n) for n in np.atleast_1d(arrays["protocols"])]
    masks = [str(m) for m in np.atleast_1d(arrays["mask_settings"])] if "mask_settings" in arrays else \
        [n if n in SETTINGS else "general" for n in names]
    if len(masks) != len(names):
        raise UserError(f"{path}: 'mask_settings' has {len(masks)} entries but 'protocols' has {len(names)}")
    protocols = []
    for name, mask in zip(names, masks):
        if mask not in SETTINGS:
            raise UserError(f"{path}: protocol {name!r} has mask setting {mask!r}; use one of {', '.join(SETTINGS)}")
        p = {"name": name, "mask": mask}
        for part in ("query", "gallery"):
            needed = ("feats", "pids", "camids") + (("clothes",) if mask != "general" else ())
            if name == SEARCH:  # a folder search: its image paths always, labels when it had --labels
                labelled = any(f"{name}_{part}_{f}" in arrays for f in ("pids", "camids"))
                needed = ("feats", "paths") + (("pids", "camids") if labelled else ())
            missing = [f"{name}_{part}_{f}" for f in needed if f"{name}_{part}_{f}" not in arrays]
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)}, needed by protocol {name!r} ({mask} masks)")
            fields = ("feats", "pids", "camids", "clothes", "clothes_names", "paths")
            p[part] = {f: arrays.get(f"{name}_{part}_{f}") for f in fields}
            n = len(p[part]["feats"])
            for f in fields[1:]:
                if p[part][f] is not None and len(p[part][f]) != n:
                    raise UserError(f"{path}: {name}_{part}_{f} has {len(p[part][f])} entries but "
                                    f"{name}_{part}_feats has {n} rows; features and labels must match")
        protocols.append(p)
    dataset = str(arrays["dataset"]) if "dataset" in arrays else None
    return protocols, dataset


# ----------------------------------------------------------------------------- pictures (drawn by visualize.py)

RANKED_TOP = 10                 # gallery images shown per query in ranked lists
RIGHT_TEXT = {"general": "correct: same identity, other camera",
              "cc": "correct: same identity, other camera, other clothes",
              "sc": "correct: same identity, other camera, same clothes"}
JUNK_TEXT = {"general": "same camera", "cc": "same camera or same clothes", "sc": "same camera or other clothes"}


def _who(labels: dict, i: int, sep: str = "\n", width: int = 24) -> str:
    """Camera and clothes (where known: the dataset's own label, cut to `width` characters, else the
    clothes id) of row i of a split's labels. On a tile (sep ", ") 'id P, cam C' then the clothes line;
    beside a query 'id P', 'cam C', 'clothes ...' each on its own line."""
    import visualize

    clothes = labels.get("clothes_names")
    clothes = clothes if clothes is not None else labels.get("clothes")
    head = f"id {labels['pids'][i]}{sep}cam {labels['camids'][i]}"
    return head + (f"\nclothes {visualize.short_text(str(clothes[i]), width)}" if clothes is not None else "")


def _path_of(labels: dict, j: int) -> str | None:
    return None if labels.get("paths") is None else str(labels["paths"][j])


def ranked_lists(protocol: dict, num_queries: int, path: str | Path, top: int = RANKED_TOP,
                 rerank: RerankConfig | None = None, source: str = "") -> None:
    """PNG with one row per query, labelled with its row in the features (from 1, as search_*.png) and its
    id, camera and clothes: the query, then its top gallery images after junk removal, framed green where correct and
    red where wrong under the protocol's masks, with their labels and distances (gray tiles where a
    features file has no image paths); the legend explains the colours. Queries are spread evenly
    over those with a correct match. With `rerank`, the lists are ranked by the re-ranked distances.
    `source` (the checkpoint or features file) goes into the title."""
    import visualize

    q, g, mask = protocol["query"], protocol["gallery"], protocol["mask"]
    qf, gf = _unit_features(q["feats"], g["feats"])
    ql, gl = ({k: None if v is None else np.asarray(v) for k, v in d.items() if k != "feats"} for d in (q, g))

    def good_and_junk(i: int) -> tuple[np.ndarray, np.ndarray]:
        q_clo = None if ql.get("clothes") is None else ql["clothes"][i]  # load_features made sure cc/sc have both
        return protocol_masks(ql["pids"][i], ql["camids"][i], q_clo, gl["pids"], gl["camids"], gl.get("clothes"), mask)

    valid = [i for i in range(len(qf)) if good_and_junk(i)[0].any()]
    if not valid:
        return
    spread = np.linspace(0, len(valid) - 1, min(num_queries, len(valid))).round().astype(int)
    reranked = _Reranked(qf, gf, rerank, DEFAULT_CHUNK) if rerank is not None else None
    rows = []
    for i in (valid[j] for j in np.unique(spread)):
        good, junk = good_and_junk(i)
        dist = _cosine_distance(qf[i:i + 1], gf) if reranked is None else reranked.block(i, i + 1)
        dist = dist[0].cpu().numpy()
        order = np.argsort(dist, kind="stable")
        order = order[~junk[order]][:top]
        matches = [visualize.Match(_path_of(gl, j), f"{r}. {_who(gl, j, ', ', width=16)}\nd {visualize.distance_text(dist[j])}",
                                   "right" if good[j] else "wrong") for r, j in enumerate(order, 1)]
        rows.append(visualize.RankedRow(_path_of(ql, i), f"query {i + 1}\n{_who(ql, i)}", matches))
    title = (f"ranked lists, {protocol['name']} protocol{' (re-ranked)' if rerank is not None else ''}: top {top} "
             f"after junk removal (same identity, {JUNK_TEXT[mask]}), d = distance\n{source}")
    visualize.ranked_figure(rows, path, title, {"query": "query", "right": RIGHT_TEXT[mask],
                                                "wrong": "wrong: another identity"}, always=("query", "right", "wrong"))


def cmc_curve(results: dict, path: str | Path, source: str = "", reranked: bool = False) -> None:
    """PNG: the CMC curve of every setting in `results` (matching rate in % against rank), titled with
    `source` (the checkpoint or features file)."""
    import visualize

    visualize.cmc_figure(results, path, f"CMC curve{' (re-ranked)' if reranked else ''}\n{source}")


# ----------------------------------------------------------------------------- folder search
#
# --query DIR --gallery DIR: the images under two folders (subfolders too) are read with the checkpoint's test
# transform, each query's gallery is ranked by the metrics' distance, and search.csv plus the sheets
# search_*.png are written; with --labels CSV the usual metrics too. In a features file the search is one
# protocol named SEARCH (its labels only when they were given).

SEARCH = "search"               # a folder search's protocol name in features files
SEARCH_TOP = 10                 # --top: gallery images listed per query
SHEET_QUERIES = 8               # queries per search_*.png sheet
LABEL_COLUMNS = ("path", "pid", "camid", "clothes")


def image_extensions() -> tuple[str, ...]:
    """File extensions (lower case) of the image formats PIL can read: its registered extensions whose
    format has an opener (.pdf, say, is registered for writing only)."""
    from PIL import Image

    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def folder_images(folder: str | Path, flag: str) -> list[str]:
    """Absolute paths of the images under `folder` and its subfolders (by extension, image_extensions()),
    sorted; hidden files and folders are left out, other files ignored (and counted)."""
    import os

    if not Path(folder).is_dir():
        raise UserError(f"{flag} {folder} is not a folder; pass a folder of images (subfolders are searched too)")
    extensions = set(image_extensions())
    found, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):  # .DS_Store & co.
                (found if Path(name).suffix.lower() in extensions else others).append(os.path.join(dirpath, name))
    if others:
        print(f"{flag} {folder}: ignored {len(others)} files that are not images by their extension "
              f"(e.g. {sorted(others)[0]})")
    if not found:
        raise UserError(f"{flag} {folder} holds no images (searched its subfolders too, for the extensions PIL "
                        f"reads: .jpg, .png, .bmp, .webp, .tif, ...); point it at a folder of images")
    return sorted(os.path.abspath(p) for p in found)


def read_labels(csv_path: str | Path, paths: list[str]) -> tuple[dict, bool, bool]:
    """--labels: ({absolute path: (line, pid, camid or None, clothes text or None)}, whether a camid column
    and a clothes column are given). Header `path,pid[,camid][,clothes]`; paths relative to the CSV's
    folder or absolute; every image of `paths` needs a row (UserError naming the first without one)."""
    import csv
    import os

    from datasets import parse_int

    where = f"--labels {csv_path}"
    if not Path(csv_path).is_file():
        raise UserError(f"{where}: no such file; give a CSV with the header path,pid[,camid][,clothes] and one row "
                        f"per query and gallery image")
    base, rows = os.path.dirname(os.path.abspath(csv_path)), {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            header = [v.strip().lower() for v in next(reader, [])]
            if not {"path", "pid"} <= set(header) or set(header) - set(LABEL_COLUMNS) or len(set(header)) < len(header):
                raise UserError(f"{where} line 1 must be the header path,pid[,camid][,clothes] (any order); found "
                                f"{','.join(header) if header else 'an empty file'!r}")
            column = {name: i for i, name in enumerate(header)}
            for fields in reader:
                if not any(v.strip() for v in fields):
                    continue  # blank lines are allowed
                line = f"{where} line {reader.line_num}"
                if len(fields) != len(header):
                    raise UserError(f"{line} has {len(fields)} values but the header names {len(header)} columns")
                value = {name: fields[i].strip() for name, i in column.items()}
                number = {name: parse_int(value[name]) for name in ("pid", "camid") if name in value}
                for name, n in number.items():
                    if n is None:
                        raise UserError(f"{line}: {name} {value[name]!r} is not an integer")
                if not value["path"] or ("clothes" in value and not value["clothes"]):
                    raise UserError(f"{line} has an empty {'path' if not value['path'] else 'clothes label'}; "
                                    f"fill in every column of every row")
                path = os.path.abspath(os.path.join(base, value["path"]))  # an absolute one stays
                if path in rows:
                    raise UserError(f"{line} repeats the image of line {rows[path][0]} ({value['path']}); list each "
                                    f"image once")
                rows[path] = (reader.line_num, number["pid"], number.get("camid"), value.get("clothes"))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"{where} cannot be read as CSV text ({exc}); save it as CSV in UTF-8") from None
    check_labelled(csv_path, rows, paths)
    return rows, "camid" in column, "clothes" in column


def check_labelled(csv_path: str | Path, rows: dict, paths: list[str]) -> None:
    """UserError naming the first of `paths` without a row in read_labels' `rows`."""
    import os

    missing = next((p for p in paths if p not in rows), None)
    if missing is not None:
        raise UserError(f"--labels {csv_path} has no row for {missing}; label every query and gallery image (paths "
                        f"relative to {os.path.dirname(os.path.abspath(csv_path))} or absolute)")


def _add_labels(query: dict, gallery: dict, rows: dict, has_clothes: bool) -> None:
    """pids, camids and clothes ids (one mapping of the (pid, clothes text) keys over both splits, as the
    custom dataset's) of the splits' paths, from read_labels. Without a camid column queries are camera 0
    and gallery images camera 1, except that an image in both splits has a camera of its own (2, 3, ...)
    in both: its match with itself is junk, its matches with the other images count."""
    keys = sorted({(rows[p][1], rows[p][3]) for split in (query, gallery) for p in split["paths"]})
    clothes_id = {key: i for i, key in enumerate(keys)}
    own = {p: 2 + i for i, p in enumerate(sorted(set(query["paths"]) & set(gallery["paths"])))}
    for split, default_cam in ((query, 0), (gallery, 1)):
        mine = [rows[p] for p in split["paths"]]
        split["pids"] = np.array([r[1] for r in mine], dtype=np.int64)
        split["camids"] = np.array([own.get(p, default_cam) if r[2] is None else r[2]
                                    for p, r in zip(split["paths"], mine)], dtype=np.int64)
        split["clothes"] = np.array([clothes_id[(r[1], r[3])] for r in mine], dtype=np.int64) if has_clothes else None
        split["clothes_names"] = np.array([r[3] for r in mine]) if has_clothes else None  # the CSV's own labels


class _FolderImages(torch.utils.data.Dataset):
    """A folder search's images with the test transform: (image, index, 0, 0); with skip_bad, a file
    that cannot be read gives (zeros, index, 1, 0) (the camid slot flags it through extract_features),
    else it is an error naming the file."""

    def __init__(self, paths: list[str], transform, img_size: tuple[int, int], skip_bad: bool):
        self.paths, self.transform, self.img_size, self.skip_bad = paths, transform, img_size, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # convert() loads the pixels, so truncated files fail here
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            if not self.skip_bad:
                raise UserError(f"cannot read image {path} ({exc}); replace or remove the file, or pass --skip-bad "
                                f"to skip unreadable files") from None
            return torch.zeros(3, *self.img_size), index, 1, 0
        return self.transform(img), index, 0, 0


class _Progress:
    """A loader that prints `desc: done/total images` on stderr as it goes (in place on a terminal,
    about every tenth elsewhere); extract_features reads it like the loader."""

    def __init__(self, loader, desc: str):
        self.loader, self.dataset, self.desc = loader, loader.dataset, desc

    def __iter__(self):
        total, done, shown, tty = len(self.dataset), 0, 0, sys.stderr.isatty()
        batches = iter(self.loader)
        try:
            for batch in batches:
                yield batch
                done += len(batch[0])
                if tty or done == total or done - shown >= total / 10:
                    shown, start = done, "\r" if tty else ""
                    print(f"{start}{self.desc}: {done}/{total} images", end="\n" if done == total or not tty else "",
                          file=sys.stderr, flush=True)
        finally:
            _close_batches(batches)


def folder_search(model: torch.nn.Module, config, args: argparse.Namespace, device: torch.device) -> dict:
    """--query/--gallery: the search protocol {name SEARCH, mask "general", query, gallery} of the images
    under the two folders, each split {feats, paths} plus, with --labels, {pids, camids, clothes} (clothes
    None without a clothes column). Unreadable files are an error, or skipped and counted with --skip-bad."""
    from torch.utils.data import DataLoader

    from datasets import _worker_init, build_transforms

    found = {"query": folder_images(args.query, "--query"), "gallery": folder_images(args.gallery, "--gallery")}
    # with --skip-bad only the readable images need labels: checked once they are known
    rows, has_camid, has_clothes = read_labels(args.labels, [] if args.skip_bad else found["query"] + found["gallery"]) \
        if args.labels else (None, False, False)
    shared = len(set(found["query"]) & set(found["gallery"]))
    if shared:
        print(f"note: {shared} images are in both --query and --gallery; each such query is also ranked against "
              f"itself (distance 0)")
    img_size = tuple(config.img_size)
    transform = build_transforms(img_size, False, (config.pixel_mean, config.pixel_std))
    splits, skipped = {}, {}
    for part, paths in found.items():
        loader = DataLoader(_FolderImages(paths, transform, img_size, args.skip_bad), batch_size=args.batch_size,
                            shuffle=False, num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=_worker_init)
        feats, _, bad, _ = extract_features(model, _Progress(loader, f"{part} features"), device, flip=args.flip,
                                            distributed=False)
        ok = bad == 0
        skipped[part] = [p for p, k in zip(paths, ok) if not k]
        if not ok.any():
            raise UserError(f"none of the {len(paths)} images under --{part} {getattr(args, part)} can be read; "
                            f"check the files")
        splits[part] = {"feats": feats[torch.from_numpy(ok)], "paths": [p for p, k in zip(paths, ok) if k]}
    if skipped["query"] or skipped["gallery"]:
        first = (skipped["query"] + skipped["gallery"])[0]
        print(f"skipped {len(skipped['query']) + len(skipped['gallery'])} unreadable files ({len(skipped['query'])} "
              f"query, {len(skipped['gallery'])} gallery; --skip-bad), e.g. {first}")
    if rows is not None:
        check_labelled(args.labels, rows, splits["query"]["paths"] + splits["gallery"]["paths"])
        _add_labels(splits["query"], splits["gallery"], rows, has_clothes)
        if not has_camid:
            print("labels: no camid column, so queries count as camera 0 and gallery images as camera 1 (every gallery "
                  "image of a query's identity is a correct match), except that an image in both folders has a "
                  "camera of its own, so its match with itself is junk (not counted)")
    return {"name": SEARCH, "mask": "general", **splits}


def search_protocols(search: dict) -> list[dict]:
    """The protocols a labelled folder search is evaluated under: general, plus cc and sc when it has
    clothes labels and some query can be matched under them (left out with a note, as the custom
    dataset does); [] without labels."""
    q, g = search["query"], search["gallery"]
    if q.get("pids") is None or g.get("pids") is None:
        return []
    names = ["general"]
    if q.get("clothes") is not None and g.get("clothes") is not None:
        qp, qc, qo = (np.asarray(q[k]) for k in ("pids", "camids", "clothes"))
        gp, gc, go = (np.asarray(g[k]) for k in ("pids", "camids", "clothes"))
        for setting, what in (("cc", "in other clothes"), ("sc", "in the same clothes")):
            if any(protocol_masks(qp[i], qc[i], qo[i], gp, gc, go, setting)[0].any() for i in range(len(qp))):
                names.append(setting)
            else:
                print(f"the {setting} protocol is left out: no query has a gallery image of its identity {what} "
                      f"from another camera")
    return [{"name": name, "mask": name, "query": q, "gallery": g} for name in names]


def search_ranking(q_feats, g_feats, top: int, rerank: RerankConfig | None = None,
                   chunk: int = DEFAULT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The `top` nearest gallery images of each query under the metrics' distance (the cosine distance
    of L2-normalised features, or with `rerank` the re-ranked d*), nearest first, ties in gallery order:
    (gallery indices, distances), both [Q, min(top, G)] (int64, float64)."""
    q, g = _unit_features(q_feats, g_feats)
    k = min(top, len(g))
    reranked = _Reranked(q, g, rerank, chunk) if rerank is not None else None
    indices, distances = [], []
    for s in range(0, len(q), chunk):
        check_stop()
        dist = _cosine_distance(q[s:s + chunk], g) if reranked is None else reranked.block(s, s + chunk)
        order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        indices.append(order.cpu())
        distances.append(dist.gather(1, order).double().cpu())
    return torch.cat(indices).numpy(), torch.cat(distances).numpy()


def write_search(search: dict, top: int, out_dir: Path, source: str, rerank: RerankConfig | None = None) -> list[Path]:
    """search.csv (query,rank,gallery_path,distance: each query's `top` nearest gallery images, nearest
    first, by search_ranking) and the sheets search_1.png, ... (SHEET_QUERIES queries each: the query,
    then its top images with their distances; with labels framed green / orange / red for same identity
    from another camera / from the same camera / another identity) in out_dir. Returns the files written."""
    import csv

    import visualize

    q, g = search["query"], search["gallery"]
    indices, distances = search_ranking(q["feats"], g["feats"], top, rerank)
    q_paths, g_paths = [str(p) for p in q["paths"]], [str(p) for p in g["paths"]]
    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["query", "rank", "gallery_path", "distance"])
            for i, query in enumerate(q_paths):
                writer.writerows([query, r, g_paths[j], f"{d:.6g}"]
                                 for r, (j, d) in enumerate(zip(indices[i], distances[i]), 1))
    write_atomic(out_dir / "search.csv", write_csv)
    labelled = q.get("pids") is not None and g.get("pids") is not None
    ql, gl = ({k: np.asarray(v) for k, v in d.items() if k in ("pids", "camids", "clothes", "clothes_names")
               and v is not None} for d in (q, g))
    rows = []
    for i, query in enumerate(q_paths):
        if labelled:
            good, junk = protocol_masks(ql["pids"][i], ql["camids"][i], None, gl["pids"], gl["camids"], None, "general")
        matches = []
        for r, (j, d) in enumerate(zip(indices[i], distances[i]), 1):
            kind = "plain" if not labelled else "right" if good[j] else "junk" if junk[j] else "wrong"
            caption = (f"{r}. d {visualize.distance_text(d)}\n{visualize.short_text(Path(g_paths[j]).parent.name, 14)}/"
                       f"\n{visualize.short_text(Path(g_paths[j]).name, 14)}")
            matches.append(visualize.Match(g_paths[j], caption + (f"\nid {gl['pids'][j]}, cam {gl['camids'][j]}"
                                                                  if labelled else ""), kind))
        label = f"query {i + 1}\n{visualize.short_text(Path(query).parent.name, 20)}/\n{visualize.short_text(Path(query).name, 20)}"
        rows.append(visualize.RankedRow(query, label + (f"\n{_who(ql, i)}" if labelled else ""), matches))
    sheets = -(-len(rows) // SHEET_QUERIES)
    legend = {"query": "query", "plain": "gallery image (no labels)",
              "right": "same identity, other camera (correct)", "junk": "same identity, same camera (not counted)",
              "wrong": "another identity"}
    written = [out_dir / "search.csv"]
    for s in range(sheets):
        written.append(out_dir / f"search_{s + 1:0{len(str(sheets))}d}.png")
        title = (f"folder search: top {indices.shape[1]} of {len(g_paths)} gallery images"
                 f"{' (re-ranked)' if rerank is not None else ''}, d = distance\nqueries {s * SHEET_QUERIES + 1}-"
                 f"{min((s + 1) * SHEET_QUERIES, len(rows))} of {len(rows)} (sheet {s + 1}/{sheets})\n{source}")
        visualize.ranked_figure(rows[s * SHEET_QUERIES:(s + 1) * SHEET_QUERIES], written[-1], title, legend)
    return written


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="FILE.pt",
                     help="stage-2 checkpoint: rebuild the model, extract features, evaluate "
                          "(default: runs/sci/best.pt, where train_stage2.py writes by default)")
    src.add_argument("--profile", action="store_true",
                     help="print parameters and GFLOPs of the inference path (SCI Table IV) for --arch at "
                          "--img-size, with and without SIM; no checkpoint or data needed")
    src.add_argument("--features", metavar="FILE.npz",
                     help="features .npz from --save-features: recompute the metrics, no model needed")
    p.add_argument("--export", metavar="FILE.pt2",
                   help="instead of evaluating: write the checkpoint's inference path as a torch.export program "
                        "(normalised images [B, 3, H, W] at its size, any B -> the test features this script "
                        "ranks, before their L2 normalisation), float32 on CPU; load with "
                        "torch.export.load(FILE).module(). The extra file config.json holds the input size and "
                        "pixel mean/std")
    p.add_argument("--onnx", action="store_true",
                   help="with --export: also write FILE.onnx beside it (input images, output features, dynamic "
                        "batch; needs the onnx package)")
    p.add_argument("--arch", choices=("RN50", "ViT-B/16", "tiny", "all"), default="all",
                   help="with --profile: the backbone (default: all = RN50 and ViT-B/16)")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), default=[384, 192],
                   help="with --profile: input size (default: 384 192)")
    p.add_argument("--num-ids", type=int, default=77,
                   help="with --profile: identities in the text bank SIM attends to (default: 77, LTCC's)")
    p.add_argument("--dataset", help="dataset name (default: the one stored in the checkpoint)")
    p.add_argument("--root", help="folder holding the dataset's own folder (default: the checkpoint's)")
    p.add_argument("--query", metavar="DIR",
                   help="folder search, with --gallery (instead of a dataset): rank the images under --gallery DIR "
                        "for each image under this folder (subfolders too, any image type PIL reads) with "
                        "--checkpoint's model; writes search.csv (query,rank,gallery_path,distance) and the sheets "
                        "search_*.png (8 queries each) to --out-dir")
    p.add_argument("--gallery", metavar="DIR", help="folder search: the folder of images to search in")
    p.add_argument("--top", type=int, metavar="K",
                   help="folder search (or --features of one): gallery images listed per query (default: 10)")
    p.add_argument("--labels", metavar="CSV",
                   help="folder search: identities of the images, header path,pid[,camid][,clothes] (paths relative "
                        "to the CSV or absolute; every query and gallery image needs a row): adds the metrics "
                        "(general; cc and sc with clothes) and green/red frames. Without camid, queries count as "
                        "camera 0 and gallery images as camera 1")
    p.add_argument("--skip-bad", action="store_true",
                   help="folder search: skip (and count) files that cannot be read as images instead of stopping")
    p.add_argument("--setting", choices=("all", *SETTINGS), default="all",
                   help="evaluate only the protocol of this name (default: all of the dataset's protocols)")
    p.add_argument("--single-shot", action="store_true",
                   help="PRCC only: one random gallery image per identity, mean over 10 seeded draws "
                        "(default: multi-shot, all of camera A, as CAL and SCI report)")
    p.add_argument("--save-features", metavar="FILE.npz",
                   help="with --checkpoint: also save the features and labels of every protocol to this file")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="save ranked lists of N queries per protocol as ranked_<setting>.png (each row: the query, "
                        "labelled with its id, camera and clothes, then its top-10 gallery images with green/red "
                        "frames for right/wrong, junk excluded, and a legend; gray tiles where a features file has "
                        "no image paths) and cmc_curve.png (matching rate against rank, one line per protocol)")
    p.add_argument("--heatmaps", type=int, default=0, metavar="N",
                   help="with --checkpoint: Grad-CAM of the test feature for N test images (queries first, spread "
                        "over identities) as heatmaps.png; on the synthetic benchmark also the seek fractions (share "
                        "of the heat on identity parts, clothes, background) of all query and gallery images, "
                        "printed and saved in results.json under \"seek\"")
    p.add_argument("--compare", metavar="CKPT",
                   help="with --heatmaps: a second checkpoint (e.g. the baseline) whose row is added to "
                        "heatmaps.png and whose seek fractions go under \"seek_compare\"")
    p.add_argument("--heatmap-layer", choices=("layer1", "layer2", "layer3", "layer4"), default=None,
                   help="ResNet feature map for --heatmaps (default: layer4, the last); at small inputs an earlier "
                        "one resolves parts (benchmarks/ablation.py uses layer1 at 64x32, where layer4 is 4x2)")
    p.add_argument("--tsne", action="store_true",
                   help="save a t-SNE of the gallery features (colour = identity, marker = outfit) as tsne.png")
    p.add_argument("--out-dir", help="where results.json and pictures go (default: the folder of the "
                                     "checkpoint or features file)")
    p.add_argument("--flip", action="store_true", help="average each feature with its horizontally flipped image's")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: 128)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"data-loading processes (default: up to 8 on CUDA, 2 on CPU, at most the CPUs; here "
                        f"{default_workers('cuda')} on CUDA, {default_workers('cpu')} on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs and distances are computed (default: auto = cuda when visible)")
    p.add_argument("--rerank", action="store_true",
                   help="rank by k-reciprocal re-ranked distances (Zhong et al., CVPR 2017), every protocol's "
                        "queries and gallery re-ranked together; the table and results.json (evaluate.rerank) "
                        "say so. Memory grows with the number of images, not its square")
    p.add_argument("--k1", type=int, default=None,
                   help="with --rerank: k of the k-reciprocal neighbour sets (default: 20, the paper's)")
    p.add_argument("--k2", type=int, default=None,
                   help="with --rerank: neighbours averaged by local query expansion, 1 = none (default: 6)")
    p.add_argument("--lambda-value", type=float, default=None,
                   help="with --rerank: weight in [0, 1] of the original distance against the Jaccard "
                        "distance (default: 0.3)")
    args = p.parse_args(argv)
    if args.visualize < 0 or args.heatmaps < 0 or args.batch_size < 1 or (args.workers or 0) < 0:
        p.error("--visualize, --heatmaps and --workers must be >= 0, --batch-size >= 1")
    if args.features and (args.save_features or args.dataset or args.root or args.flip):
        p.error("--save-features, --dataset, --root and --flip need --checkpoint "
                "(a features file is already extracted)")
    if args.onnx and not args.export:
        p.error("--onnx writes FILE.onnx beside --export FILE.pt2; pass --export too")
    if args.top is not None and args.top < 1:
        p.error("--top must be >= 1")
    return args


def check_search_flags(args: argparse.Namespace) -> None:
    """Folder search (--query/--gallery): the flags it takes and those it refuses, before any work starts."""
    if bool(args.query) != bool(args.gallery):
        raise UserError("a folder search needs both --query DIR and --gallery DIR (each query image is ranked "
                        "against the gallery's images)")
    if not args.query:
        given = [flag for flag, value in (("--labels", args.labels), ("--skip-bad", args.skip_bad),
                                          ("--top", args.top is not None and not args.features)) if value]
        if given:
            raise UserError(f"{', '.join(given)} belong to a folder search; add --query DIR --gallery DIR (--top also "
                            f"works with --features of a folder search's file)")
        return
    given = [flag for flag, value in (("--dataset", args.dataset), ("--root", args.root), ("--features", args.features),
                                      ("--profile", args.profile), ("--export", args.export),
                                      ("--single-shot", args.single_shot), ("--heatmaps", args.heatmaps),
                                      ("--compare", args.compare)) if value]
    if given:
        raise UserError(f"--query/--gallery search two folders of images with --checkpoint's model; {', '.join(given)} "
                        f"cannot be combined with it: drop them, or run them separately")
    unlabelled_refusals(args, "pass --labels CSV with the folder search")


def unlabelled_refusals(args: argparse.Namespace, remedy: str) -> None:
    """A folder search without labels has no metrics: refuse the flags that need identities."""
    given = [flag for flag, value in (("--setting", args.setting != "all"), ("--visualize", args.visualize),
                                      ("--tsne", args.tsne), ("--single-shot", args.single_shot)) if value]
    if given and not args.labels:
        raise UserError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} the images' identities; {remedy} (the search alone writes "
                        f"search.csv and search_*.png)")


def rerank_config(args: argparse.Namespace) -> RerankConfig | None:
    """--rerank with --k1/--k2/--lambda-value (defaults: RerankConfig's), checked before any work starts."""
    given = [flag for flag, value in (("--k1", args.k1), ("--k2", args.k2), ("--lambda-value", args.lambda_value))
             if value is not None]
    if not args.rerank:
        if given:
            raise UserError(f"{', '.join(given)} set re-ranking parameters but --rerank is not given; add --rerank "
                            "to re-rank, or drop them")
        return None
    if args.profile:
        raise UserError("--rerank re-ranks evaluation distances and --profile evaluates nothing; drop one of them")
    default = RerankConfig()
    return RerankConfig(default.k1 if args.k1 is None else args.k1, default.k2 if args.k2 is None else args.k2,
                        default.lambda_value if args.lambda_value is None else args.lambda_value)


def _select(protocols: list, setting: str, name_of) -> list:
    if setting == "all":
        return protocols
    chosen = [p for p in protocols if name_of(p) == setting]
    if not chosen:
        raise UserError(f"--setting {setting}: this dataset has no such protocol; it has "
                        f"{', '.join(name_of(p) for p in protocols)}")
    return chosen


def profile(arch: str, img_size: tuple[int, int], num_ids: int) -> int:
    """Parameters and GFLOPs of the inference path (image encoder, SIM, test feature), as SCI's
    Table IV, from randomly initialised models (the counts do not depend on the weights)."""
    from models import SCIReID, build_clip, inference_cost

    archs = ("RN50", "ViT-B/16") if arch == "all" else (arch,)
    print(f"inference path at {img_size[0]}x{img_size[1]}, text bank of {num_ids} identities")
    print(f"{'model':<22}{'params (M)':>12}{'GFLOPs':>10}{'GMACs':>10}   (1 multiply-add = 2 FLOPs)")
    for name in archs:
        clip_model = build_clip(name, "none", img_size)
        bank = torch.zeros(num_ids, clip_model.visual.output_dim)
        for use_sim in (False, True):
            params, gflops = inference_cost(SCIReID(clip_model, num_ids, bank, use_sim=use_sim), img_size)
            print(f"{name + (' + SIM' if use_sim else ''):<22}{params:>12.2f}{gflops:>10.3f}{gflops / 2:>10.3f}")
    return 0


def _tsne(protocol: dict, path: Path, source: str) -> None:
    """--tsne: the gallery features of the first protocol, colour = identity, marker = outfit."""
    import visualize

    g = protocol["gallery"]
    clothes = g["clothes"] if g.get("clothes") is not None else np.zeros(len(g["pids"]), dtype=np.int64)
    visualize.tsne_figure(torch.as_tensor(g["feats"]).float().cpu().numpy(), np.asarray(g["pids"]),
                          np.asarray(clothes), path, f"t-SNE of the gallery features\n{source}")
    print(f"wrote {path}")


EVALUATION_ONLY = ("dataset", "root", "setting", "single_shot", "save_features", "visualize", "heatmaps", "compare",
                   "heatmap_layer", "tsne", "out_dir", "flip", "rerank")  # flags --export would ignore: refused


def export(args: argparse.Namespace) -> int:
    """--export (and --onnx): the checkpoint's inference path as deployable files; nothing is evaluated.
    Exported on CPU in float32, whatever --device says, so the files load anywhere."""
    from dataclasses import asdict

    from models import export_inference, export_onnx, import_onnx, load_checkpoint_model

    given = [f"--{k.replace('_', '-')}" for k in EVALUATION_ONLY
             if getattr(args, k, None) not in (None, False, 0, "all")]
    if given:
        raise UserError(f"--export writes the model and evaluates nothing, so {', '.join(given)} would be ignored; "
                        f"drop them, or evaluate in a separate run")
    onnx_path = Path(args.export).with_suffix(".onnx")
    if args.onnx and onnx_path == Path(args.export):
        raise UserError(f"--export {args.export}: --onnx writes FILE.onnx beside it; name the program FILE.pt2")
    if args.onnx:
        import_onnx()  # before anything is written
    model, _, config = load_checkpoint_model(args.checkpoint, "cpu")
    written = [export_inference(model, tuple(config.img_size), args.export, asdict(config))]
    if args.onnx:
        written.append(export_onnx(model, tuple(config.img_size), onnx_path))
    print(f"wrote {' and '.join(map(str, written))} (input [B, 3, {config.img_size[0]}, {config.img_size[1]}], "
          f"output [B, {model.feature_dim}])")
    return 0


def _run(argv: list[str] | None) -> int:
    import utils

    args = parse_args(argv)
    rerank = rerank_config(args)
    check_search_flags(args)
    if (args.heatmaps or args.compare) and (args.features or args.profile):
        raise UserError("--heatmaps and --compare need --checkpoint: Grad-CAM explains a model, and a features "
                        "file or --profile has none")
    if args.compare and not args.heatmaps:
        raise UserError("--compare adds a row to the --heatmaps figure; pass --heatmaps N too")
    if args.export and (args.features or args.profile):
        raise UserError("--export writes a model and needs --checkpoint; a features file or --profile has none")
    if args.profile:
        return profile(args.arch, tuple(args.img_size), args.num_ids)
    args.checkpoint = args.checkpoint if args.features else (args.checkpoint or f"{DEFAULT_OUTPUT_DIR}/best.pt")
    if args.export:
        return export(args)
    device = utils.select_device(args.device)
    args.workers = utils.default_workers(device.type) if args.workers is None else args.workers
    seek: dict = {}  # --heatmaps' seek fractions, for results.json
    search = None    # a folder search's protocol (--query/--gallery, or --features of its file)
    if args.features:
        label = f"features file {Path(args.features).name}"
        protocols, dataset = load_features(args.features)
        search = next((p for p in protocols if p["name"] == SEARCH), None)
        if search is None and args.top is not None:
            raise UserError(f"--top sets how many matches a folder search lists, but {args.features} holds a dataset's "
                            f"protocols; drop --top (a dataset's ranked lists: --visualize N)")
        protocols = [search] if search is not None else _select(protocols, args.setting, lambda p: p["name"])
        out_dir = Path(args.out_dir or Path(args.features).parent)
    elif args.query:
        from models import load_checkpoint_model
        from visualize import run_label

        model, ckpt_args, config = load_checkpoint_model(args.checkpoint, device)
        search, dataset = folder_search(model, config, args, device), None
        out_dir = Path(args.out_dir or Path(args.checkpoint).parent)
        label = f"{run_label(args.checkpoint, ckpt_args)}; query {args.query}, gallery {args.gallery}"
        if args.save_features:
            save_features(args.save_features, [search])
            print(f"wrote {args.save_features}")
    else:
        from datasets import build_dataset
        from models import load_checkpoint_model
        from visualize import explain, run_label

        model, ckpt_args, config = load_checkpoint_model(args.checkpoint, device)
        dataset = args.dataset or ckpt_args["dataset"]
        data = build_dataset(dataset, args.root or ckpt_args["root"])
        chosen = _select(data.protocols, args.setting, lambda p: p[0])
        protocols = protocol_features(model, chosen, tuple(config.img_size), args.batch_size, args.workers, device,
                                      flip=args.flip, normalize=(config.pixel_mean, config.pixel_std))
        names = data.clothes_names()  # the dataset's own outfit labels (a custom CSV's text), for the figures
        for part in (p[part] for p in protocols for part in ("query", "gallery")) if names else ():
            part["clothes_names"] = np.array([names[c] for c in np.asarray(part["clothes"]).tolist()])
        out_dir = Path(args.out_dir or Path(args.checkpoint).parent)
        label = run_label(args.checkpoint, ckpt_args)
        if args.heatmaps:
            runs = [(args.checkpoint, model, config, ckpt_args)]
            if args.compare:
                other, other_args, other_config = load_checkpoint_model(args.compare, device)
                runs.append((args.compare, other, other_config, other_args))
            out_dir.mkdir(parents=True, exist_ok=True)
            seek = explain(runs, chosen, args.heatmaps, out_dir / "heatmaps.png", device, min(args.batch_size, 64),
                           data.name, args.heatmap_layer, names)
        if args.save_features:
            save_features(args.save_features, protocols, dataset)
            print(f"wrote {args.save_features}")
    if device.type == "cuda":  # extracted (on the CPU) or loaded features are ranked on the device
        for p in [search] if search is not None else protocols:
            for part in ("query", "gallery"):
                p[part]["feats"] = torch.as_tensor(p[part]["feats"]).to(device)
    if search is not None:
        protocols = search_protocols(search)
        if not protocols:  # no labels: nothing to evaluate
            unlabelled_refusals(args, "this features file has none: search again with --labels CSV")
        else:
            protocols = _select(protocols, args.setting, lambda p: p["name"])
        written = write_search(search, args.top or SEARCH_TOP, out_dir, label, rerank)
        print(f"wrote {', '.join(p.name for p in written[:3])}{' ...' if len(written) > 3 else ''} to {out_dir}")
        if not protocols:
            return 0
    if args.single_shot and dataset != "prcc":
        raise UserError(f"--single-shot is PRCC's protocol; this dataset is {dataset or 'not recorded in the file'}")
    results = evaluate_features(protocols, single_shot=args.single_shot, rerank=rerank)
    if rerank is not None:
        print(f"re-ranked: k-reciprocal encoding (Zhong et al., CVPR 2017), k1 = {rerank.k1}, k2 = {rerank.k2}, "
              f"lambda = {rerank.lambda_value}")
    print(format_table(results))

    # results.json beside a checkpoint is usually the training run's record: add to it, never replace it
    path = out_dir / "results.json"
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        record = {}
    record = record if isinstance(record, dict) else {}
    record["evaluate"] = {"source": str(args.checkpoint or args.features), "dataset": dataset,
                          "single_shot": args.single_shot,
                          **({"query": args.query, "gallery": args.gallery, "labels": args.labels}
                             if args.query else {}),
                          **({"flip": args.flip} if args.checkpoint else {}),
                          "rerank": None if rerank is None else rerank.to_json(), "metrics": metrics_to_json(results)}
    if args.heatmaps:  # this run's seek fractions replace an earlier run's (none: masks were missing)
        record = {k: v for k, v in record.items() if k not in ("seek", "seek_compare")} | seek
    utils.write_json(path, record)
    print(f"wrote {path}")

    if args.visualize:
        for p in protocols:
            ranked_lists(p, args.visualize, out_dir / f"ranked_{p['name']}.png", rerank=rerank, source=label)
        cmc_curve(results, out_dir / "cmc_curve.png", source=label, reranked=rerank is not None)
        print(f"wrote ranked_*.png and cmc_curve.png to {out_dir}")
    if args.tsne:
        _tsne(protocols[0], out_dir / "tsne.png", label)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input becomes one `error: ...` line on stderr and exit status 2."""
    import utils

    return utils.run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
