"""Speed, exactness and memory of evaluate.rank_metrics_from_features at MSMT17 scale.

    python benchmarks/bench_metrics.py                                    # 11,659 x 82,161, 1,024-d
    python benchmarks/bench_metrics.py --num-query 500 --num-gallery 5000 --setting cc   # seconds

Data: random features with identity structure (a centroid per identity, an offset per outfit and
per camera, Gaussian noise), 3,060 identities, 15 cameras, 2-3 outfits per identity, so that the
metrics land in a realistic range rather than near 0 or 100%.

Reference: what most public re-ID code does (CAL's `evaluate`): per query, a full stable argsort of
the gallery, then set operations (np.isin) to drop junk and find the good images. Its distances
use the same normalisation and the same BLAS call on the same query blocks as the fast path, so
both rank bitwise-identical numbers and any difference in the metrics is a ranking bug.
(A GEMM's last bit depends on the block shape, so distances from other block sizes differ by an
ulp and can reorder near-ties.) The stable sort matters: at this scale many float32 distances tie.

Memory: the fast path runs in a fresh subprocess that builds the same data, records ru_maxrss
(peak resident set) once the data exists, runs the metrics, and records it again; the report
gives both, so the fast path's own share is the difference.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import metrics  # noqa: E402


def make_data(num_query: int, num_gallery: int, dim: int, num_ids: int, cameras: int, noise: float,
              seed: int) -> dict:
    """Features (float32) and labels; generated block by block so no float64 copy of the gallery exists."""
    rng = np.random.default_rng(seed)

    def unit(n: int) -> np.ndarray:  # n random directions
        x = rng.standard_normal((n, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centroids, cam_shift = unit(num_ids), 0.7 * unit(cameras)  # same-camera strangers look alike
    outfits = rng.integers(2, 4, num_ids)                 # 2-3 outfits per identity
    outfit_shift = 0.6 * unit(3 * num_ids)                # clothes change the look a lot (cloth-changing)
    data = {}
    for part, n in (("query", num_query), ("gallery", num_gallery)):
        pids = rng.integers(0, num_ids, n)
        clothes = 3 * pids + (rng.random(n) * outfits[pids]).astype(np.int64)
        camids = rng.integers(0, cameras, n)
        feats = np.empty((n, dim), dtype=np.float32)
        for s in range(0, n, 8192):
            e = min(s + 8192, n)
            feats[s:e] = (centroids[pids[s:e]] + outfit_shift[clothes[s:e]] + cam_shift[camids[s:e]]
                          + noise / np.sqrt(dim) * rng.standard_normal((e - s, dim), dtype=np.float32))
        data[part] = {"feats": feats, "pids": pids, "camids": camids, "clothes": clothes}
    return data


def reference(data: dict, setting: str, chunk: int, max_rank: int = 50) -> dict:
    """Straightforward per-query evaluation (CAL's evaluate / evaluate_with_clothes, stable sort)."""
    q, g = data["query"], data["gallery"]
    qn = F.normalize(torch.from_numpy(q["feats"]), dim=1).numpy()
    gn = F.normalize(torch.from_numpy(g["feats"]), dim=1).numpy()
    cmc, aps, inps, skipped = np.zeros(max_rank), [], [], 0
    for s in range(0, len(qn), chunk):
        dist = 1 - qn[s:s + chunk] @ gn.T
        for r in range(len(dist)):
            i = s + r
            same_id = np.argwhere(g["pids"] == q["pids"][i]).flatten()
            same_cam = np.argwhere(g["camids"] == q["camids"][i]).flatten()
            same_clothes = np.argwhere(g["clothes"] == q["clothes"][i]).flatten()
            good = np.setdiff1d(same_id, same_cam, assume_unique=True)
            junk = np.intersect1d(same_id, same_cam)
            if setting == "cc":
                good = np.setdiff1d(good, same_clothes, assume_unique=True)
                junk = np.union1d(junk, np.intersect1d(same_id, same_clothes))
            elif setting == "sc":
                good = np.intersect1d(good, same_clothes)
                junk = np.union1d(junk, np.setdiff1d(same_id, same_clothes, assume_unique=True))
            if good.size == 0:
                skipped += 1
                continue
            order = np.argsort(dist[r], kind="stable")
            order = order[np.isin(order, junk, invert=True)]
            hits = np.flatnonzero(np.isin(order, good))     # 0-based positions of the good images
            row = np.zeros(max_rank)
            row[hits[0]:] = 1
            cmc += row
            aps.append(np.mean(np.arange(1, len(hits) + 1) / (hits + 1)))
            inps.append(len(hits) / (hits[-1] + 1))
    n = len(aps)
    return {"cmc": cmc / n, "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)),
            "num_valid_queries": n, "num_skipped_queries": skipped}


def fast(data: dict, setting: str, chunk: int) -> dict:
    q, g = data["query"], data["gallery"]
    return evaluate.rank_metrics_from_features(q["feats"], g["feats"], q["pids"], g["pids"], q["camids"],
                                               g["camids"], q["clothes"], g["clothes"], setting=setting, chunk=chunk)


def summary(m: dict) -> str:
    return (f"mAP {100 * m['mAP']:.2f}%  Rank-1 {100 * m['cmc'][0]:.2f}%  mINP {100 * m['mINP']:.2f}%  "
            f"valid/skipped {m['num_valid_queries']}/{m['num_skipped_queries']}")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-query", type=int, default=11659, help="queries (default: MSMT17's 11,659)")
    p.add_argument("--num-gallery", type=int, default=82161, help="gallery images (default: MSMT17's 82,161)")
    p.add_argument("--dim", type=int, default=1024, help="feature width (default: 1024)")
    p.add_argument("--num-ids", type=int, default=3060, help="identities (default: MSMT17's 3,060 test ids)")
    p.add_argument("--cameras", type=int, default=15, help="cameras (default: 15)")
    p.add_argument("--noise", type=float, default=2.4, help="per-image noise norm; higher = lower mAP (default: 2.4)")
    p.add_argument("--setting", choices=metrics.SETTINGS, default="general", help="protocol masks (default: general)")
    p.add_argument("--chunk", type=int, default=metrics.DEFAULT_CHUNK,
                   help=f"queries per distance block, both paths (default: {metrics.DEFAULT_CHUNK})")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    p.add_argument("--skip-reference", action="store_true", help="time the fast path only")
    p.add_argument("--fast-child", action="store_true", help=argparse.SUPPRESS)  # the measured subprocess
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    data_args = (args.num_query, args.num_gallery, args.dim, args.num_ids, args.cameras, args.noise, args.seed)

    if args.fast_child:  # fresh process: its peak RSS is the data plus the fast path, nothing else
        data = make_data(*data_args)
        rss_data = max_rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        m = fast(data, args.setting, args.chunk)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_data_mb": rss_data, "rss_peak_mb": max_rss_mb(),
                          **{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in m.items()}}))
        return 0

    print(f"data: {args.num_query} queries x {args.num_gallery} gallery, {args.dim}-d, {args.num_ids} ids, "
          f"{args.cameras} cameras, setting {args.setting}, chunk {args.chunk}, torch threads {torch.get_num_threads()}")
    child = subprocess.run([sys.executable, __file__, "--fast-child", *(argv if argv is not None else sys.argv[1:])],
                           capture_output=True, text=True)
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
        return 1
    m = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"fast:      {m['seconds']:8.1f} s wall {m['cpu_seconds']:8.1f} s CPU   {summary(m)}")
    print(f"memory:    peak RSS {m['rss_peak_mb']:.0f} MB (data alone {m['rss_data_mb']:.0f} MB, so the fast path "
          f"adds {m['rss_peak_mb'] - m['rss_data_mb']:.0f} MB)")
    if args.skip_reference:
        return 0

    data = make_data(*data_args)
    t0, c0 = time.perf_counter(), time.process_time()
    r = reference(data, args.setting, args.chunk)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    same = (np.array_equal(np.asarray(m["cmc"]), r["cmc"]) and abs(m["mAP"] - r["mAP"]) <= 1e-9
            and abs(m["mINP"] - r["mINP"]) <= 1e-9
            and (m["num_valid_queries"], m["num_skipped_queries"]) == (r["num_valid_queries"], r["num_skipped_queries"]))
    print(f"reference: {seconds:8.1f} s wall {cpu:8.1f} s CPU   {summary(r)}")
    print(f"speedup:   {seconds / m['seconds']:.1f}x wall, {cpu / m['cpu_seconds']:.1f}x CPU (2-core machine: "
          f"the CPU ratio is steadier when other work shares the cores)")
    print(f"identical: {same} (cmc exactly equal: {np.array_equal(np.asarray(m['cmc']), r['cmc'])}, "
          f"|dmAP| = {abs(m['mAP'] - r['mAP']):.1e}, |dmINP| = {abs(m['mINP'] - r['mINP']):.1e})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
