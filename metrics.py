"""Re-ID metrics: CMC, mAP and mINP of a ranking under the CAL protocols (METHOD.md section 5),
from a distance matrix (`rank_metrics`) or from features (`evaluate.rank_metrics_from_features`), and the
cosine distance of L2-normalised features that every ranking here uses.

Protocol. For each query the gallery is sorted by distance, ascending, ties broken by gallery
order. Gallery images of the query's identity are either *good* (correct matches) or *junk*
(removed from the ranking before anything is counted):
    general  good = other camera                      junk = same camera
    cc       good = other camera and other clothes    junk = same camera or same clothes
    sc       good = other camera and same clothes     junk = same camera or other clothes
Queries without a good image are skipped (and counted). With 1-based ranks r_1 < ... < r_n of
the n good images after junk removal: CMC(k) = [r_1 <= k], AP = (1/n) sum_i i / r_i and
INP = n / r_n (Ye et al., TPAMI 2021); each is averaged over the valid queries.
"""
from __future__ import annotations

import numpy as np
import torch

from utils import UserError, check_stop

SETTINGS = ("general", "cc", "sc")
RANKS = (1, 5, 10, 20)          # the ranks reported in tables and results.json
DEFAULT_CHUNK = 256             # queries per distance block: 256 x 82,161 float32 is 84 MB at MSMT17 scale
CANDIDATE_BUDGET = 1 << 21      # ranked (query, gallery) pairs held at once; bounds memory when rankings are poor


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
