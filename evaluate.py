"""Re-ID evaluation: a checkpoint or a features file under the CAL protocols (metrics.py, METHOD.md
section 5), feature extraction (also across DDP ranks), reports, features files and the CLI.

    python evaluate.py --checkpoint runs/sci/best.pt                 # all of the dataset's protocols
    python evaluate.py --checkpoint runs/sci/best.pt --save-features feats.npz --visualize 8
    python evaluate.py --features feats.npz --setting cc              # no model needed
    python evaluate.py --features feats.npz --rerank --k1 20 --k2 6 --lambda-value 0.3   # k-reciprocal re-ranking

The table is printed and results.json is written beside the checkpoint (or features file, or into
--out-dir) under the key "evaluate"; the other keys of an existing results.json (the training
run's record) are kept.

Features file (.npz, written by --save-features, read by --features), one group of arrays per
protocol NAME listed in `protocols` (str array):
    NAME_query_feats, NAME_gallery_feats    float [N, F]
    NAME_{query,gallery}_pids, _camids      int [N]
    NAME_{query,gallery}_clothes            int [N]  (needed by the cc and sc masks)
    NAME_{query,gallery}_paths              str [N]  (optional; images for --visualize)
and optionally `mask_settings` (str array, which masks each protocol uses; default: the
protocol's own name when it is general/cc/sc, else general) and `dataset` (str, e.g. "prcc").
A folder search's file (tools/search.py) holds one protocol named "search", its labels only when they
were known (see save_features).

Your own images (folder search), Grad-CAM heat maps and t-SNE, export and profiling are tools of their
own: tools/search.py, tools/figures.py, tools/export.py, tools/profile.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import rerank as reranking
from config import DEFAULT_OUTPUT_DIR, EVAL_BATCH_SIZE
from metrics import (DEFAULT_CHUNK, RANKS, SETTINGS, _check_inputs, _cosine_distance, _gallery_index, _rank_chunk,
                     _summarize, _unit_features)
from rerank import RerankConfig, _Reranked
from utils import UserError, check_stop, default_workers, write_atomic

SINGLE_SHOT_DRAWS = 10          # PRCC single-shot: draws of one gallery image per identity
SEARCH = "search"               # a folder search's protocol name in features files (tools/search.py)


# ----------------------------------------------------------------------------- metrics of features

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


# ----------------------------------------------------------------------------- feature extraction

def _shard_loader(loader, rank: int, world: int):
    """A loader over this rank's contiguous share of the dataset (same batch size and workers)."""
    from torch.utils.data import Subset

    n = len(loader.dataset)
    per = -(-n // world)
    shard = Subset(loader.dataset, range(min(rank * per, n), min((rank + 1) * per, n)))
    # the same loader class, so a loaders.WorkerLoader's shard keeps its guarded worker start
    return type(loader)(shard, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                        worker_init_fn=loader.worker_init_fn), per


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
    SIGTERM (loaders._worker_init)."""
    import utils

    # a raising SIGTERM handler (run_cli's) striking mid-shutdown would leave workers that ignore SIGTERM running
    with utils.stop_signals_held():
        if hasattr(batches, "_shutdown_workers"):  # torch's multi-process loader iterator (idempotent)
            batches._shutdown_workers()


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device: torch.device | str, flip: bool = False,
                     amp: bool = False, distributed: bool = True, amp_dtype: str | None = None,
                     progress: str | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, F] float32 on CPU, pids, camids, clothes ids as int64 numpy) in the loader's
    order; the loader yields (img, pid, camid, clothes_id), and may add the extras the model takes by
    name (e.g. {"mask": part masks}, train_stage1.py's views). With `flip`, each feature is the mean
    of the image's and its mirror's. When torch.distributed runs with several processes (and
    `distributed`), each rank extracts a contiguous shard and every rank gets all N rows back;
    pass distributed=False when only one rank calls this. `progress`: show a utils.Progress bar
    on stderr with this name (its batches, images and images/s)."""
    import torch.distributed as dist

    import utils

    device = torch.device(device)
    world = dist.get_world_size() if distributed and dist.is_available() and dist.is_initialized() else 1
    n = len(loader.dataset)
    if world > 1:
        loader, per = _shard_loader(loader, dist.get_rank(), world)
    model.eval()
    feats, labels = [], []
    bar = utils.Progress(len(loader), f"{progress}: {len(loader.dataset)} images", every=max(len(loader) // 10, 1),
                         enabled=progress is not None, unit="batches")
    batches = iter(loader)
    try:
        for step, (img, pid, camid, clothes, *extras) in enumerate(batches, 1):
            utils.check_stop()  # a training script's SIGINT/SIGTERM ends a long extraction within a batch
            img = img.to(device, non_blocking=True)
            extra = {k: v.to(device, non_blocking=True) for k, v in (extras[0] if extras else {}).items()}  # masks
            with utils.autocast(device, amp, amp_dtype):
                f = model(img, **extra).float()
                if flip:
                    f = (f + model(img.flip(3), **{k: v.flip(-1) for k, v in extra.items()}).float()) / 2
            feats.append(f.cpu())
            labels.append(torch.stack([torch.as_tensor(v, dtype=torch.long) for v in (pid, camid, clothes)], 1))
            bar.update(step, len(f))
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
    from loaders import CLIP_NORMALIZATION, build_test_loader  # only needed when a model is evaluated

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

    A dataset writes one protocol per setting (e.g. general, cc, sc). A folder search (tools/search.py)
    writes one protocol named "search" (mask general) with feats and paths, and pids/camids (camids 0 for
    queries and 1 for gallery images where the labels have no camid column) only with --labels, clothes
    only when the labels have a clothes column; its --features evaluates it under general, cc and sc as the
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


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="FILE.pt",
                     help="stage-2 checkpoint: rebuild the model, extract features, evaluate "
                          "(default: runs/sci/best.pt, where train_stage2.py writes by default)")
    src.add_argument("--features", metavar="FILE.npz",
                     help="features .npz from --save-features: recompute the metrics, no model needed")
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
                   help="save ranked lists of N queries per protocol as ranked_<setting>.png (each row: the query, "
                        "labelled with its id, camera and clothes, then its top-10 gallery images with green/red "
                        "frames for right/wrong, junk excluded, and a legend; gray tiles where a features file has "
                        "no image paths) and cmc_curve.png (matching rate against rank, one line per protocol)")
    p.add_argument("--out-dir", help="where results.json and pictures go (default: the folder of the "
                                     "checkpoint or features file)")
    add_extraction_args(p)
    reranking.add_rerank_args(p)
    args = p.parse_args(argv)
    if args.visualize < 0 or args.batch_size < 1 or (args.workers or 0) < 0:
        p.error("--visualize and --workers must be >= 0, --batch-size >= 1")
    if args.features and (args.save_features or args.dataset or args.root or args.flip):
        p.error("--save-features, --dataset, --root and --flip need --checkpoint "
                "(a features file is already extracted)")
    return args


def select(protocols: list, setting: str, name_of) -> list:
    """--setting: the protocols of that name (all for "all"); UserError naming those there are."""
    if setting == "all":
        return protocols
    chosen = [p for p in protocols if name_of(p) == setting]
    if not chosen:
        raise UserError(f"--setting {setting}: this dataset has no such protocol; it has "
                        f"{', '.join(name_of(p) for p in protocols)}")
    return chosen


def resolve_flip(flip: bool | None, ckpt_args: dict) -> bool:
    """--flip, or where not given the checkpoint's run's own test protocol (its --flip-test)."""
    return bool(ckpt_args.get("flip_test")) if flip is None else flip


def add_extraction_args(p: argparse.ArgumentParser) -> None:
    """How features are extracted and ranked: the flags evaluate.py and tools/*.py share."""
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average each feature with its horizontally flipped image's (default: as the checkpoint's "
                        "run evaluated, its --flip-test: on for CSSC's recipe, off for CLIP-ReID's)")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE,
                   help="images per forward pass (default: %(default)s, config.EVAL_BATCH_SIZE)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"data-loading processes (default: up to 8 on CUDA, 2 on CPU, at most the CPUs; here "
                        f"{default_workers('cuda')} on CUDA, {default_workers('cpu')} on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs and distances are computed (default: auto = cuda when visible)")


def to_device(protocols: list[dict], device: torch.device) -> None:
    """On CUDA, extracted (on the CPU) or loaded features are ranked on the device."""
    if device.type == "cuda":
        for p in protocols:
            for part in ("query", "gallery"):
                p[part]["feats"] = torch.as_tensor(p[part]["feats"]).to(device)


def checkpoint_label(path: str | Path, ckpt_args: dict) -> str:
    """A figure's name for a checkpoint (visualize.run_label): its run folder, architecture and the
    flags of its run that differ from the training scripts' defaults."""
    import visualize

    return visualize.run_label(path, ckpt_args, _method_defaults())


def _method_defaults() -> dict:
    """The defaults of the flags that set what a run trains, as its checkpoint's args name them: the
    prompt properties (config.add_prompt_args) and train_stage2.py's own flags, without the shared data,
    optimisation and run flags, those filled from the recipe (default None) and evaluation plumbing."""
    import config

    prompts, stage2, shared = argparse.ArgumentParser(), argparse.ArgumentParser(), argparse.ArgumentParser()
    config.add_prompt_args(prompts)
    config.add_stage2_args(stage2)
    config.add_common_args(shared, "stage2")
    plumbing = {a.dest for a in shared._actions} | {"stage1", "eval_every", "eval_before", "flip_test", "given"}
    defaults = {**vars(prompts.parse_args([])), **vars(stage2.parse_args([]))}
    return {k: v for k, v in defaults.items() if v is not None and k not in plumbing}


def read_results(path: Path) -> dict:
    """results.json as a dict, {} where there is none (or it is not a JSON object): the file beside a
    checkpoint is usually the training run's record, added to and never replaced."""
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        record = {}
    return record if isinstance(record, dict) else {}


def report(protocols: list[dict], out_dir: Path, label: str, source: str, dataset: str | None,
           rerank: RerankConfig | None, single_shot: bool = False, extra: dict | None = None,
           visualize: int = 0) -> dict:
    """Evaluate `protocols`, print the table, add the record under "evaluate" to out_dir/results.json
    (`extra`: the keys a run adds, e.g. flip) and draw `visualize` queries of ranked lists and the CMC
    curve when asked. Returns the metrics."""
    import utils

    results = evaluate_features(protocols, single_shot=single_shot, rerank=rerank)
    if rerank is not None:
        print(f"re-ranked: k-reciprocal encoding (Zhong et al., CVPR 2017), k1 = {rerank.k1}, k2 = {rerank.k2}, "
              f"lambda = {rerank.lambda_value}")
    print(format_table(results))

    path = out_dir / "results.json"
    record = read_results(path)
    record["evaluate"] = {"source": source, "dataset": dataset, "single_shot": single_shot, **(extra or {}),
                          "rerank": None if rerank is None else rerank.to_json(), "metrics": metrics_to_json(results)}
    utils.write_json(path, record)
    print(f"wrote {path}")

    if visualize:
        import visualize as draw

        for p in protocols:
            draw.ranked_lists(p, visualize, out_dir / f"ranked_{p['name']}.png", rerank=rerank, source=label)
        draw.cmc_curve(results, out_dir / "cmc_curve.png", source=label, reranked=rerank is not None)
        print(f"wrote ranked_*.png and cmc_curve.png to {out_dir}")
    return results


def _run(argv: list[str] | None) -> int:
    import utils

    args = parse_args(argv)
    rerank = reranking.rerank_config(args)
    args.checkpoint = args.checkpoint if args.features else (args.checkpoint or f"{DEFAULT_OUTPUT_DIR}/best.pt")
    device = utils.select_device(args.device)
    args.workers = utils.default_workers(device.type) if args.workers is None else args.workers
    if args.features:
        label = f"features file {Path(args.features).name}"
        protocols, dataset = load_features(args.features)
        if any(p["name"] == SEARCH for p in protocols):
            raise UserError(f"{args.features} holds a folder search; rank or evaluate it with "
                            f"python tools/search.py --features {args.features}")
        protocols = select(protocols, args.setting, lambda p: p["name"])
        out_dir = Path(args.out_dir or Path(args.features).parent)
    else:
        from datasets import build_dataset
        from registry import load_checkpoint_model

        model, ckpt_args, config = load_checkpoint_model(args.checkpoint, device)
        args.flip = resolve_flip(args.flip, ckpt_args)
        dataset = args.dataset or ckpt_args["dataset"]
        data = build_dataset(dataset, args.root or ckpt_args["root"])
        chosen = select(data.protocols, args.setting, lambda p: p[0])
        protocols = protocol_features(model, chosen, tuple(config.img_size), args.batch_size, args.workers, device,
                                      flip=args.flip, normalize=(config.pixel_mean, config.pixel_std))
        names = data.clothes_names()  # the dataset's own outfit labels (a custom CSV's text), for the figures
        for part in (p[part] for p in protocols for part in ("query", "gallery")) if names else ():
            part["clothes_names"] = np.array([names[c] for c in np.asarray(part["clothes"]).tolist()])
        out_dir = Path(args.out_dir or Path(args.checkpoint).parent)
        label = checkpoint_label(args.checkpoint, ckpt_args)
        if args.save_features:
            save_features(args.save_features, protocols, dataset)
            print(f"wrote {args.save_features}")
    to_device(protocols, device)
    if args.single_shot and dataset != "prcc":
        raise UserError(f"--single-shot is PRCC's protocol; this dataset is {dataset or 'not recorded in the file'}")
    report(protocols, out_dir, label, str(args.checkpoint or args.features), dataset, rerank,
           single_shot=args.single_shot, extra={"flip": args.flip} if args.checkpoint else {},
           visualize=args.visualize)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input becomes one `error: ...` line on stderr and exit status 2."""
    import utils

    return utils.run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
