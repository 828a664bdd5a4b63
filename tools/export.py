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
import json
import sys
import warnings
from pathlib import Path

# run as `python tools/export.py`: import the project's modules, not this folder's
ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

from utils import UserError, write_atomic  # noqa: E402

EXPORT_BATCH = 2  # the example batch of the trace: a batch of 1 would be specialised instead of kept dynamic


def export_inference(model: torch.nn.Module, img_size: tuple[int, int], path: str | Path,
                     config: dict | None = None) -> Path:
    """The inference path as a torch.export program, written atomically to `path` (.pt2): normalised
    images [B, 3, H, W] at `img_size`, B dynamic, -> the test feature [B, F], exactly what the model
    returns in eval mode and evaluate.py extracts (ranking L2-normalises it afterwards). `config`
    (the checkpoint's ModelConfig fields: input size, pixel mean and std) is stored beside the
    program as the extra file config.json. Load with torch.export.load(path).module()."""
    model.eval()
    images = torch.zeros(EXPORT_BATCH, 3, *img_size, device=next(model.parameters()).device)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():  # parameters that require grad would be traced as such
        program = torch.export.export(model, (images,), dynamic_shapes=({0: batch},))
    extra = {"config.json": json.dumps(config)} if config is not None else None
    return write_atomic(Path(path), lambda tmp: torch.export.save(program, tmp, extra_files=extra))


def import_onnx():
    """The onnx package, or the error that says how to get it."""
    try:
        import onnx
    except ImportError:
        raise UserError("--onnx needs the onnx package: pip install onnx") from None
    return onnx


def export_onnx(model: torch.nn.Module, img_size: tuple[int, int], path: str | Path) -> Path:
    """The inference path of `export_inference` as ONNX (input "images", output "features", dynamic
    batch), written atomically and checked with onnx.checker. TorchScript-based exporter: the
    torch.export-based one needs the onnxscript package besides onnx."""
    onnx = import_onnx()
    model.eval()
    images = torch.zeros(EXPORT_BATCH, 3, *img_size, device=next(model.parameters()).device)

    def write(tmp: str) -> None:
        # no_grad: the tracer cannot take weights that require grad as constants. The warnings: the exporter's
        # deprecation notice, and tracer notes on the fixed input size that is part of the model anyway
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (images,), tmp, input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=False)
        onnx.checker.check_model(tmp)
    return write_atomic(Path(path), write)



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

    from registry import load_checkpoint_model

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
