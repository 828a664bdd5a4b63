"""Export a checkpoint's inference path as deployable files; nothing is evaluated.

    python tools/export.py --checkpoint runs/sci/best.pt --out sci.pt2           # torch.export program
    python tools/export.py --checkpoint runs/sci/best.pt --out sci.pt2 --onnx    # and sci.onnx beside it

The program maps normalised images [B, 3, H, W] at the checkpoint's size, any B, to the test features
evaluate.py ranks, before their L2 normalisation; float32 on CPU, whatever device trained it, so the
files load anywhere (torch.export.load(FILE).module()). The extra file config.json holds the input
size and pixel mean/std.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# run as `python tools/export.py`: import the project's modules, not this folder's
ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[0] = str(ROOT)

from utils import UserError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="FILE.pt",
                   help="stage-2 checkpoint (default: runs/sci/best.pt, where train_stage2.py writes by default)")
    p.add_argument("--out", metavar="FILE.pt2", required=True,
                   help="the torch.export program to write (and config.json beside it)")
    p.add_argument("--onnx", action="store_true",
                   help="also write FILE.onnx beside it (input images, output features, dynamic batch; needs the "
                        "onnx package)")
    return p.parse_args(argv)


def export(checkpoint: str, out: str, onnx: bool = False) -> list[Path]:
    """Write the checkpoint's inference path to `out` (and with `onnx` FILE.onnx beside it), exported on
    CPU in float32. Returns the files written."""
    from dataclasses import asdict

    from models import export_inference, export_onnx, import_onnx, load_checkpoint_model

    onnx_path = Path(out).with_suffix(".onnx")
    if onnx and onnx_path == Path(out):
        raise UserError(f"--out {out}: --onnx writes FILE.onnx beside it; name the program FILE.pt2")
    if onnx:
        import_onnx()  # before anything is written
    model, _, config = load_checkpoint_model(checkpoint, "cpu")
    written = [export_inference(model, tuple(config.img_size), out, asdict(config))]
    if onnx:
        written.append(export_onnx(model, tuple(config.img_size), onnx_path))
    print(f"wrote {' and '.join(map(str, written))} (input [B, 3, {config.img_size[0]}, {config.img_size[1]}], "
          f"output [B, {model.feature_dim}])")
    return written


def _run(argv: list[str] | None) -> int:
    import config

    args = parse_args(argv)
    export(args.checkpoint or f"{config.DEFAULT_OUTPUT_DIR}/best.pt", args.out, args.onnx)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input becomes one `error: ...` line on stderr and exit status 2, a stop exit status 130."""
    import utils

    return utils.run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
