"""Parameters and GFLOPs of the inference path (image encoder, SIM, test feature), as SCI's Table IV,
from randomly initialised models (the counts do not depend on the weights); no checkpoint or data needed.

    python tools/profile.py                                   # RN50 and ViT-B/16 at their recipe's size, LTCC's 77 ids
    python tools/profile.py --arch tiny --img-size 64 32 --num-ids 5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# run as `python tools/profile.py`: import the project's modules, not this folder's (this file is not the
# standard library's profile module)
ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

import config  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=(*config.CLIP_ARCHS, "all"), default="all",
                   help="the backbone (default: all = RN50 and ViT-B/16)")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help=f"input size (default: the recipe's, config.RECIPES: {config.recipe_help('img_size')})")
    p.add_argument("--num-ids", type=int, default=config.PROFILE_NUM_IDS,
                   help="identities in the text bank SIM attends to (default: %(default)s, LTCC's training ids)")
    return p.parse_args(argv)


def profile(arch: str, img_size: tuple[int, int] | None, num_ids: int) -> int:
    """Print the parameters and GFLOPs of each backbone's inference path, with and without SIM, at
    `img_size` (None: each backbone's recipe input size)."""
    from models import SCIReID, build_clip, inference_cost

    archs = ("RN50", "ViT-B/16") if arch == "all" else (arch,)
    sizes = {name: tuple(img_size or config.RECIPES[name]["img_size"]) for name in archs}
    shown = ", ".join(dict.fromkeys(f"{h}x{w}" for h, w in sizes.values()))
    print(f"inference path at {shown}, text bank of {num_ids} identities")
    print(f"{'model':<22}{'params (M)':>12}{'GFLOPs':>10}{'GMACs':>10}   (1 multiply-add = 2 FLOPs)")
    for name in archs:
        clip_model = build_clip(name, "none", sizes[name])
        bank = torch.zeros(num_ids, clip_model.visual.output_dim)
        for use_sim in (False, True):
            params, gflops = inference_cost(SCIReID(clip_model, num_ids, bank, use_sim=use_sim), sizes[name])
            print(f"{name + (' + SIM' if use_sim else ''):<22}{params:>12.2f}{gflops:>10.3f}{gflops / 2:>10.3f}")
    return 0


def _run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    return profile(args.arch, args.img_size and tuple(args.img_size), args.num_ids)


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input becomes one `error: ...` line on stderr and exit status 2, a stop exit status 130."""
    import utils

    return utils.run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
