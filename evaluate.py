"""Re-ID evaluation: the CAL protocols (METHOD.md section 5), feature extraction, reports and a CLI.

    python evaluate.py --checkpoint runs/sci/best.pt                 # all of the dataset's protocols
    python evaluate.py --checkpoint runs/sci/best.pt --save-features feats.npz --visualize 8
    python evaluate.py --features feats.npz --setting cc              # no model needed
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
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from utils import UserError, check_stop

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
                               chunk: int = DEFAULT_CHUNK) -> dict:
    """rank_metrics on the cosine distance 1 - q.g of L2-normalised features, computed `chunk`
    queries at a time (the full Q x G matrix is never held), on the features' device, in their
    dtype (float64 stays float64; half precision is ranked in float32). A GEMM's last bit depends
    on its block shape, so a different `chunk` or device can reorder distances within one ulp."""
    q, g = _unit_features(q_feats, g_feats)
    if not isinstance(chunk, int) or chunk < 1:
        raise UserError(f"chunk must be a positive integer, got {chunk!r}")
    qp, gp, qc, gc, qo, go = _check_inputs(len(q), len(g), q.device, q_pids, g_pids, q_camids, g_camids,
                                           q_clothes, g_clothes, setting, max_rank)
    gal = _gallery_index(gp, gc, go)
    parts = []
    for s in range(0, len(q), chunk):
        check_stop()
        e = s + chunk
        dist = _cosine_distance(q[s:e], g)
        parts.append(_rank_chunk(dist, qp[s:e], qc[s:e], None if qo is None else qo[s:e], gal, setting))
        del dist
    return _summarize(parts, max_rank, setting)


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
    for img, pid, camid, clothes in loader:
        utils.check_stop()  # a training script's SIGINT/SIGTERM ends a long extraction within a batch
        img = img.to(device, non_blocking=True)
        with utils.autocast(device, amp, amp_dtype):
            f = model(img).float()
            if flip:
                f = (f + model(img.flip(3)).float()) / 2
        feats.append(f.cpu())
        labels.append(torch.stack([torch.as_tensor(v, dtype=torch.long) for v in (pid, camid, clothes)], 1))
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


def _metrics(query: dict, gallery: dict, mask: str, max_rank: int = 50) -> dict:
    return rank_metrics_from_features(query["feats"], gallery["feats"], query["pids"], gallery["pids"],
                                      query["camids"], gallery["camids"], query.get("clothes"),
                                      gallery.get("clothes"), setting=mask, max_rank=max_rank)


def _single_shot(query: dict, gallery: dict, mask: str) -> dict:
    """PRCC single-shot: one random gallery image per identity, 10 seeded draws, metrics averaged.
    The query counts are the first draw's (each draw keeps every identity, so they do not change)."""
    pids = np.asarray(gallery["pids"])
    runs = []
    for draw in range(SINGLE_SHOT_DRAWS):
        rng = np.random.default_rng(draw)
        keep = np.sort([rng.choice(np.flatnonzero(pids == pid)) for pid in np.unique(pids)])
        sub = {k: (v[torch.as_tensor(keep)] if isinstance(v, torch.Tensor) else np.asarray(v)[keep])
               for k, v in gallery.items() if v is not None}
        runs.append(_metrics(query, sub, mask))
    out = {k: runs[0][k] for k in ("num_valid_queries", "num_skipped_queries")}
    out["cmc"] = np.mean([r["cmc"] for r in runs], axis=0)
    out.update({k: float(np.mean([r[k] for r in runs])) for k in ("mAP", "mINP")})
    return out


def evaluate_features(protocols: list[dict], single_shot: bool = False) -> dict:
    """setting name -> rank metrics, for protocol dicts as protocol_features returns them."""
    return {p["name"]: (_single_shot if single_shot else _metrics)(p["query"], p["gallery"], p["mask"])
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
    """Write protocol features in the .npz layout of the module docstring."""
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


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
            missing = [f"{name}_{part}_{f}" for f in needed if f"{name}_{part}_{f}" not in arrays]
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)}, needed by protocol {name!r} ({mask} masks)")
            p[part] = {f: arrays.get(f"{name}_{part}_{f}") for f in ("feats", "pids", "camids", "clothes", "paths")}
            n = len(p[part]["feats"])
            for f in ("pids", "camids", "clothes", "paths"):
                if p[part][f] is not None and len(p[part][f]) != n:
                    raise UserError(f"{path}: {name}_{part}_{f} has {len(p[part][f])} entries but "
                                    f"{name}_{part}_feats has {n} rows; features and labels must match")
        protocols.append(p)
    dataset = str(arrays["dataset"]) if "dataset" in arrays else None
    return protocols, dataset


# ----------------------------------------------------------------------------- pictures (PIL only)

TILE_W, TILE_H, BORDER, GAP = 64, 128, 4, 6
GREEN, RED, BLUE, GRAY = (40, 170, 60), (210, 40, 40), (40, 90, 210), (150, 150, 150)
CURVE_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _tile(path: str | None, pid: int, color: tuple[int, int, int]):
    """An image (or a gray placeholder when it cannot be read) inside a coloured border."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (TILE_W + 2 * BORDER, TILE_H + 2 * BORDER), color)
    try:
        img = Image.open(path).convert("RGB").resize((TILE_W, TILE_H))
    except Exception:  # no paths in a features file, or a moved image: still show the ranking
        img = Image.new("RGB", (TILE_W, TILE_H), GRAY)
    ImageDraw.Draw(img).text((3, TILE_H - 13), f"id {pid}", fill=(255, 255, 255))
    tile.paste(img, (BORDER, BORDER))
    return tile


def ranked_lists(protocol: dict, num_queries: int, path: str | Path, top: int = 10) -> None:
    """PNG with one row per query: the query (blue) then its top gallery images after junk removal,
    green where correct, red where wrong. Queries are spread evenly over those with a correct match."""
    from PIL import Image

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
    picks = [valid[j] for j in np.unique(spread)]
    step_x, step_y = TILE_W + 2 * BORDER + GAP, TILE_H + 2 * BORDER + GAP
    canvas = Image.new("RGB", (GAP + (top + 1) * step_x + GAP, GAP + len(picks) * step_y), (255, 255, 255))

    def path_of(labels: dict, j: int) -> str | None:
        return None if labels.get("paths") is None else str(labels["paths"][j])

    for row, i in enumerate(picks):
        good, junk = good_and_junk(i)
        order = np.argsort(_cosine_distance(qf[i:i + 1], gf)[0].cpu().numpy(), kind="stable")
        order = order[~junk[order]][:top]
        y = GAP + row * step_y
        canvas.paste(_tile(path_of(ql, i), ql["pids"][i], BLUE), (GAP, y))
        for j, gi in enumerate(order):  # a gap after the query, then the ranked gallery
            canvas.paste(_tile(path_of(gl, gi), gl["pids"][gi], GREEN if good[gi] else RED),
                         (2 * GAP + (j + 1) * step_x, y))
    canvas.save(path)


def cmc_curve(results: dict, path: str | Path, size: tuple[int, int] = (640, 440)) -> None:
    """CMC curves (Rank-k accuracy in %, k = 1..max_rank) of every setting in one PNG."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 56, 20, 20, 44
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    kmax = max(len(m["cmc"]) for m in results.values())
    lo = 10 * int(min(100 * float(m["cmc"][0]) for m in results.values()) // 10)  # y axis from below the lowest Rank-1

    def xy(k: float, v: float) -> tuple[float, float]:
        x = left + (k - 1) / max(kmax - 1, 1) * (w - left - right)
        return x, top + (100 - v) / max(100 - lo, 1) * (h - top - bottom)

    for v in range(lo, 101, 10):
        draw.line([xy(1, v), xy(kmax, v)], fill=(225, 225, 225))
        draw.text((xy(1, v)[0] - 30, xy(1, v)[1] - 6), f"{v}%", fill=(0, 0, 0))
    for k in sorted({1, *range(10, kmax + 1, 10), kmax}):
        x, y = xy(k, lo)
        draw.line([(x, y), (x, y + 4)], fill=(0, 0, 0))
        draw.text((x - 6, y + 6), str(k), fill=(0, 0, 0))
    draw.rectangle([xy(1, 100), xy(kmax, lo)], outline=(0, 0, 0))
    draw.text((w // 2 - 20, h - 16), "rank k", fill=(0, 0, 0))
    for n, (name, m) in enumerate(results.items()):
        color = CURVE_COLORS[n % len(CURVE_COLORS)]
        points = [xy(k + 1, 100 * float(v)) for k, v in enumerate(m["cmc"])]
        draw.line(points, fill=color, width=2) if len(points) > 1 else draw.point(points, fill=color)
        lx, ly = w - right - 190, h - bottom - 18 * (len(results) - n) - 6
        draw.line([(lx, ly + 6), (lx + 20, ly + 6)], fill=color, width=3)
        draw.text((lx + 26, ly), f"{name}: R1 {100 * float(m['cmc'][0]):.1f}%  mAP {100 * m['mAP']:.1f}%",
                  fill=(0, 0, 0))
    img.save(path)


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
    p.add_argument("--arch", choices=("RN50", "ViT-B/16", "tiny", "all"), default="all",
                   help="with --profile: the backbone (default: all = RN50 and ViT-B/16)")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), default=[384, 192],
                   help="with --profile: input size (default: 384 192)")
    p.add_argument("--num-ids", type=int, default=77,
                   help="with --profile: identities in the text bank SIM attends to (default: 77, LTCC's)")
    p.add_argument("--dataset", help="dataset name (default: the one stored in the checkpoint)")
    p.add_argument("--root", help="folder holding the dataset's own folder (default: the checkpoint's)")
    p.add_argument("--setting", choices=("all", *SETTINGS), default="all",
                   help="evaluate only the protocol of this name (default: all of the dataset's protocols)")
    p.add_argument("--single-shot", action="store_true",
                   help="PRCC only: one random gallery image per identity, mean over 10 seeded draws "
                        "(default: multi-shot, all of camera A, as CAL and SCI report)")
    p.add_argument("--save-features", metavar="FILE.npz",
                   help="with --checkpoint: also save the features and labels of every protocol to this file")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="save ranked lists of N queries per protocol as ranked_<setting>.png (query, then its "
                        "top-10 gallery images with green/red borders for right/wrong, junk excluded; gray "
                        "tiles where a features file has no image paths) and cmc_curve.png")
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
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (default: 4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs and distances are computed (default: auto = cuda when visible)")
    args = p.parse_args(argv)
    if args.visualize < 0 or args.heatmaps < 0 or args.batch_size < 1 or args.workers < 0:
        p.error("--visualize, --heatmaps and --workers must be >= 0, --batch-size >= 1")
    if args.features and (args.save_features or args.dataset or args.root or args.flip):
        p.error("--save-features, --dataset, --root and --flip need --checkpoint "
                "(a features file is already extracted)")
    return args


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


def _run(argv: list[str] | None) -> int:
    import utils

    args = parse_args(argv)
    if (args.heatmaps or args.compare) and (args.features or args.profile):
        raise UserError("--heatmaps and --compare need --checkpoint: Grad-CAM explains a model, and a features "
                        "file or --profile has none")
    if args.compare and not args.heatmaps:
        raise UserError("--compare adds a row to the --heatmaps figure; pass --heatmaps N too")
    if args.profile:
        return profile(args.arch, tuple(args.img_size), args.num_ids)
    args.checkpoint = args.checkpoint if args.features else (args.checkpoint or f"{utils.DEFAULT_OUTPUT_DIR}/best.pt")
    device = utils.select_device(args.device)
    seek: dict = {}  # --heatmaps' seek fractions, for results.json
    if args.features:
        label = f"features file {Path(args.features).name}"
        protocols, dataset = load_features(args.features)
        protocols = _select(protocols, args.setting, lambda p: p["name"])
        out_dir = Path(args.out_dir or Path(args.features).parent)
        if device.type == "cuda":
            for p in protocols:
                for part in ("query", "gallery"):
                    p[part]["feats"] = torch.as_tensor(p[part]["feats"]).to(device)
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
        out_dir = Path(args.out_dir or Path(args.checkpoint).parent)
        label = run_label(args.checkpoint, ckpt_args)
        if args.heatmaps:
            runs = [(args.checkpoint, model, config, ckpt_args)]
            if args.compare:
                other, other_args, other_config = load_checkpoint_model(args.compare, device)
                runs.append((args.compare, other, other_config, other_args))
            out_dir.mkdir(parents=True, exist_ok=True)
            seek = explain(runs, chosen, args.heatmaps, out_dir / "heatmaps.png", device, min(args.batch_size, 64),
                           data.name, args.heatmap_layer)
        if args.save_features:
            save_features(args.save_features, protocols, dataset)
            print(f"wrote {args.save_features}")
    if args.single_shot and dataset != "prcc":
        raise UserError(f"--single-shot is PRCC's protocol; this dataset is {dataset or 'not recorded in the file'}")
    results = evaluate_features(protocols, single_shot=args.single_shot)
    print(format_table(results))

    # results.json beside a checkpoint is usually the training run's record: add to it, never replace it
    path = out_dir / "results.json"
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        record = {}
    record = record if isinstance(record, dict) else {}
    record["evaluate"] = {"source": str(args.checkpoint or args.features), "single_shot": args.single_shot,
                          **({"flip": args.flip} if args.checkpoint else {}), "metrics": metrics_to_json(results)}
    if args.heatmaps:  # this run's seek fractions replace an earlier run's (none: masks were missing)
        record = {k: v for k, v in record.items() if k not in ("seek", "seek_compare")} | seek
    utils.write_json(path, record)
    print(f"wrote {path}")

    if args.visualize:
        for p in protocols:
            ranked_lists(p, args.visualize, out_dir / f"ranked_{p['name']}.png")
        cmc_curve(results, out_dir / "cmc_curve.png")
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
