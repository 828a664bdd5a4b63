"""Stage-2 training throughput (images/s) and peak memory, for CLIP-ReID's baseline configuration
(no SIM, no CAL; identity, image-to-text and triplet losses) beside SCI's (SIM + CAL on top), so the
cost of SIM and CAL shows. It times train_stage2.train_one_epoch itself (forward, every loss term,
CAL's classifier step, backward, optimizer step, mixed precision as chosen) on batches already on
the device: the input pipeline is benchmarks/bench_loader.py's concern.

    python benchmarks/bench_train.py                                        # tiny, 128x64, CPU: seconds
    python benchmarks/bench_train.py --arch RN50 --device cuda --amp        # the README's GPU row
    python benchmarks/bench_train.py --arch ViT-B/16 --device cuda --no-amp

Each configuration runs in a fresh subprocess (so peak memory is its own): random weights (the
cost does not depend on them), random P x K labels with two outfits per identity, --warmup steps
untimed, then --steps timed. Peak memory: torch's allocator peak on CUDA, the process's peak
resident set on CPU. The last lines are a Markdown table.
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
import config  # noqa: E402
import train_stage2  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from losses import CosineClothesClassifier, SCILoss  # noqa: E402
from models import ModelConfig  # noqa: E402
from registry import build_model  # noqa: E402

CONFIGS = {"clipreid": dict(use_sim=False, cal=False), "sci": dict(use_sim=True, cal=True)}
NAMES = {"clipreid": "CLIP-ReID baseline", "sci": "SCI (+ SIM + CAL)"}


def batches(n: int, args: argparse.Namespace, device: torch.device) -> list[tuple]:
    """n P x K batches of random normalised images, with identity and clothes labels, on the device."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        pids = torch.randperm(args.num_ids, generator=g)[:args.batch_size // 4].repeat_interleave(4)
        clothes = 2 * pids + torch.randint(0, 2, pids.shape, generator=g)
        images = torch.randn(args.batch_size, 3, *args.img_size, generator=g)
        out.append((images.to(device), pids, torch.zeros_like(pids), clothes))
    return out


def measure(args: argparse.Namespace) -> dict:
    """One configuration (args.child) in this process: images/s and peak memory."""
    device = torch.device(args.device)
    setup = CONFIGS[args.child]
    torch.manual_seed(0)
    model_config = ModelConfig(arch=args.arch, img_size=list(args.img_size), num_classes=args.num_ids,
                               use_sim=setup["use_sim"])
    bank = torch.randn(args.num_ids, 1024 if args.arch == "RN50" else 512 if args.arch == "ViT-B/16" else 64)
    model = build_model(model_config, bank).to(device).train()
    run = argparse.Namespace(triplet=True, cal_start=0, loss_weight={"id": 1.0}, epochs=1, log_every=10 ** 9,
                             lr=3.5e-4, weight_decay=5e-4, clothes_lr=3.5e-4,
                             bias_lr_factor=config.RECIPES[args.arch]["stage2_bias_lr_factor"])
    clothes_clf = CosineClothesClassifier(model.feature_dim, 2 * args.num_ids) if setup["cal"] else None
    pid2clothes = torch.eye(args.num_ids).repeat_interleave(2, dim=1)  # [ids, clothes]: identity p wears 2p, 2p+1
    losses = SCILoss(model.text_bank, True, clothes_clf, pid2clothes).to(device)
    optimizer, optimizer_cc = train_stage2.build_optimizers(model, losses, run)
    amp = training.MixedPrecision(device, args.amp)
    stop = utils.StopSignal("bench_train.py", [])
    data = batches(args.warmup + args.steps, args, device)

    def epoch(part: list) -> None:
        if train_stage2.train_one_epoch(model, part, losses, optimizer, optimizer_cc, amp, 0, run, stop, "", 1) is None:
            raise SystemExit(130)

    epoch(data[:args.warmup])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    epoch(data[args.warmup:])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    return {"images_per_s": args.steps * args.batch_size / seconds, "peak_mb": peak / 2 ** 20,
            "skipped_steps": amp.take_skipped()}


def python_launcher() -> list[str]:
    """How to start a measured child: this interpreter, under the test suite's CUDA look-alike when
    this process runs under it (`python tests/fake_cuda.py benchmarks/bench_train.py --device cuda`)."""
    fake = sys.modules.get("fake_cuda")
    return [sys.executable] + ([fake.__file__] if fake is not None and fake.is_active() else [])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=config.CLIP_ARCHS, default="tiny", help="CLIP backbone (default: tiny, for a CPU)")
    p.add_argument("--img-size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"),
                   help="input height and width (default: 128 64; SCI trains at 384 192)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step, P x 4 (default: 16; the recipe's 64)")
    p.add_argument("--num-ids", type=int, default=77, help="training identities: classifier and text-bank rows "
                   "(default: 77, LTCC's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision as the training scripts do it (default: on with CUDA, off on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS),
                   help="configurations to measure (default: both)")
    p.add_argument("--child", choices=tuple(CONFIGS), help=argparse.SUPPRESS)  # a measured subprocess
    args = p.parse_args(argv)
    if args.batch_size % 4 or args.batch_size // 4 > args.num_ids or args.steps < 1 or args.warmup < 1:
        p.error("--batch-size must be a multiple of 4 with at most --num-ids identities; --steps and --warmup >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.amp = args.device == "cuda" if args.amp is None else args.amp
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    precision = ("float16 AMP" if args.device == "cuda" else "bfloat16 AMP") if args.amp else "float32"
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.arch} at {args.img_size[0]}x{args.img_size[1]}, batch {args.batch_size}, {precision}, {device}",
          flush=True)
    rows = []
    for name in args.configs:
        child = subprocess.run([*python_launcher(), __file__, *argv, "--child", name], capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"the {name} measurement failed:\n{child.stderr[-3000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{NAMES[name]}: {result['images_per_s']:.1f} images/s, peak {result['peak_mb']:.0f} MB", flush=True)
        rows.append((name, result))
    memory = "GPU peak (MB)" if args.device == "cuda" else "peak RSS (MB)"
    print(f"\n| configuration | arch | input | batch | precision | images/s | {memory} |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {NAMES[name]} | {args.arch} | {args.img_size[0]}x{args.img_size[1]} | {args.batch_size} | "
              f"{precision} | {r['images_per_s']:.1f} | {r['peak_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
