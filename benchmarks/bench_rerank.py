"""Time and peak memory of evaluation with k-reciprocal re-ranking (evaluate.py --rerank), with plain
evaluation beside it.

    python benchmarks/bench_rerank.py --queries 493 --gallery 7050 --num-ids 75      # LTCC-sized test set
    python benchmarks/bench_rerank.py --queries 11659 --gallery 82161 --num-ids 3060 # MSMT17-sized
    python benchmarks/bench_rerank.py --queries 200 --gallery 1000 --dim 256         # seconds

Data: bench_metrics.make_data's random features with identity structure (a centroid per identity,
offsets per outfit and camera, Gaussian noise), so that neighbour sets look like real ones.

Each measurement runs in a fresh subprocess that builds the data, records ru_maxrss (peak resident
set, Linux: KiB), runs rank_metrics_from_features (re-ranking, then the metrics of one query chunk
at a time, as the CLI does) and records it again: the difference is what the evaluation itself
added at its peak. On CUDA the peak of torch's allocator is reported as well. The last line is a
Markdown table row.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate  # noqa: E402
import metrics  # noqa: E402
import rerank as reranking  # noqa: E402
from bench_metrics import make_data  # noqa: E402

HEADER = ("| queries x gallery | dim | device | k1 / k2 / λ | plain (s) | re-ranked (s) | peak RSS plain / re-ranked "
          "(MB) | added by the re-ranked evaluation (MB) | GPU peak (MB) | mAP plain → re-ranked "
          "| Rank-1 plain → re-ranked |")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(args: argparse.Namespace) -> dict:
    """One evaluation (plain or re-ranked, per args.child) in this process: seconds, memory, metrics."""
    data = make_data(args.queries, args.gallery, args.dim, args.num_ids or max(10, (args.queries + args.gallery) // 30),
                     args.cameras, args.noise, args.seed)
    q, g = data["query"], data["gallery"]
    device = torch.device(args.device)
    qf, gf = torch.from_numpy(q["feats"]).to(device), torch.from_numpy(g["feats"]).to(device)
    rss_data = max_rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    config = reranking.RerankConfig(args.k1, args.k2, args.lambda_value) if args.child == "rerank" else None
    t0, c0 = time.perf_counter(), time.process_time()
    m = evaluate.rank_metrics_from_features(qf, gf, q["pids"], g["pids"], q["camids"], g["camids"], q["clothes"],
                                            g["clothes"], setting=args.setting, chunk=args.chunk, rerank=config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "rss_data_mb": rss_data,
           "rss_peak_mb": max_rss_mb(), "mAP": m["mAP"], "rank1": float(m["cmc"][0])}
    if device.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def markdown_row(args: argparse.Namespace, plain: dict | None, rr: dict) -> str:
    """The row of HEADER for one size; "-" where the plain evaluation was skipped or there is no GPU."""
    def pair(key: str, fmt: str) -> str:
        return (fmt.format(plain[key]) + " → " if plain else "") + fmt.format(rr[key])

    cells = [f"{args.queries:,} x {args.gallery:,}", str(args.dim), args.device,
             f"{args.k1} / {args.k2} / {args.lambda_value}",
             f"{plain['seconds']:.1f}" if plain else "-", f"{rr['seconds']:.1f}",
             pair("rss_peak_mb", "{:.0f}"), f"{rr['rss_peak_mb'] - rr['rss_data_mb']:.0f}",
             f"{rr['gpu_peak_mb']:.0f}" if "gpu_peak_mb" in rr else "-",
             pair("mAP", "{:.2%}"), pair("rank1", "{:.2%}")]
    return "| " + " | ".join(cells) + " |"


def run_child(mode: str, argv: list[str]) -> dict:
    child = subprocess.run([sys.executable, __file__, "--child", mode, *argv], capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"the {mode} measurement failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=493, help="queries (default: 493, LTCC's test queries)")
    p.add_argument("--gallery", type=int, default=7050, help="gallery images (default: 7,050, LTCC's)")
    p.add_argument("--dim", type=int, default=1024, help="feature width (default: 1024)")
    p.add_argument("--num-ids", type=int, default=None,
                   help="identities (default: one per 30 images, e.g. 3,127 at MSMT17 size)")
    p.add_argument("--cameras", type=int, default=15, help="cameras (default: 15)")
    p.add_argument("--noise", type=float, default=2.4, help="per-image noise norm; higher = lower mAP (default: 2.4)")
    p.add_argument("--setting", choices=metrics.SETTINGS, default="general", help="protocol masks (default: general)")
    p.add_argument("--k1", type=int, default=20, help="re-ranking k1 (default: 20)")
    p.add_argument("--k2", type=int, default=6, help="re-ranking k2 (default: 6)")
    p.add_argument("--lambda-value", type=float, default=0.3, help="re-ranking lambda (default: 0.3)")
    p.add_argument("--chunk", type=int, default=metrics.DEFAULT_CHUNK,
                   help=f"queries (and re-ranking rows) per distance block (default: {metrics.DEFAULT_CHUNK})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to compute (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    p.add_argument("--skip-plain", action="store_true", help="measure the re-ranked evaluation only")
    p.add_argument("--child", choices=("plain", "rerank"), help=argparse.SUPPRESS)  # a measured subprocess
    args = p.parse_args(argv)
    try:
        reranking.RerankConfig(args.k1, args.k2, args.lambda_value)
    except evaluate.UserError as exc:
        p.error(str(exc))
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    print(f"data: {args.queries} queries x {args.gallery} gallery, {args.dim}-d, setting {args.setting}, chunk "
          f"{args.chunk}, device {args.device}, torch threads {torch.get_num_threads()}")
    plain = None if args.skip_plain else run_child("plain", argv)
    rr = run_child("rerank", argv)
    for name, m in (("plain", plain), ("re-ranked", rr)):
        if m is not None:
            print(f"{name + ':':<11}{m['seconds']:8.1f} s wall {m['cpu_seconds']:8.1f} s CPU   peak RSS "
                  f"{m['rss_peak_mb']:.0f} MB (data {m['rss_data_mb']:.0f} MB)   mAP {100 * m['mAP']:.2f}%  "
                  f"Rank-1 {100 * m['rank1']:.2f}%")

    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    print(markdown_row(args, plain, rr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
