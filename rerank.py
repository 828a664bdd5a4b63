"""k-reciprocal re-ranking (Zhong et al., CVPR 2017): the re-ranked distance d* of queries to a gallery
(`rerank`), by blocks of queries for the metrics (`evaluate.rank_metrics_from_features(..., rerank=...)`),
and the --rerank/--k1/--k2/--lambda-value flags of the scripts that rank (evaluate.py, tools/search.py)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from metrics import DEFAULT_CHUNK, _cosine_distance, _row_pieces, _unit_features
from utils import UserError, check_stop


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


# ----------------------------------------------------------------------------- flags

def add_rerank_args(p: argparse.ArgumentParser) -> None:
    """--rerank and its parameters, as evaluate.py and tools/search.py take them."""
    p.add_argument("--rerank", action="store_true",
                   help="rank by k-reciprocal re-ranked distances (Zhong et al., CVPR 2017), every protocol's "
                        "queries and gallery re-ranked together; the table and results.json (rerank.rerank) "
                        "say so. Memory grows with the number of images, not its square")
    p.add_argument("--k1", type=int, default=None,
                   help=f"with --rerank: k of the k-reciprocal neighbour sets (default: {RerankConfig.k1}, the paper's)")
    p.add_argument("--k2", type=int, default=None,
                   help=f"with --rerank: neighbours averaged by local query expansion, 1 = none (default: {RerankConfig.k2})")
    p.add_argument("--lambda-value", type=float, default=None,
                   help="with --rerank: weight in [0, 1] of the original distance against the Jaccard "
                        f"distance (default: {RerankConfig.lambda_value})")


def rerank_config(args: argparse.Namespace) -> RerankConfig | None:
    """--rerank with --k1/--k2/--lambda-value (defaults: RerankConfig's), checked before any work starts."""
    given = [flag for flag, value in (("--k1", args.k1), ("--k2", args.k2), ("--lambda-value", args.lambda_value))
             if value is not None]
    if not args.rerank:
        if given:
            raise UserError(f"{', '.join(given)} set re-ranking parameters but --rerank is not given; add --rerank "
                            "to re-rank, or drop them")
        return None
    default = RerankConfig()
    return RerankConfig(default.k1 if args.k1 is None else args.k1, default.k2 if args.k2 is None else args.k2,
                        default.lambda_value if args.lambda_value is None else args.lambda_value)
