"""The command line of the synthetic world (`python -m synthetic`): make the benchmark, preview it, make
the pretraining corpus."""
from __future__ import annotations

import argparse
import logging
import time

from synthetic.benchmark import SyntheticConfig, config_for, generate_synthetic
from synthetic.corpus import CorpusConfig, generate_corpus
from synthetic.preview import save_preview
from utils import UserError, run_cli

# flag dest -> SyntheticConfig field
FLAGS = {"seed": "seed", "train_ids": "num_train_ids", "test_ids": "num_test_ids", "outfits": "outfits",
         "cameras": "cameras", "img_size": "img_size", "shared_outfits": "shared_outfits"}


def add_parameter_flags(ap: argparse.ArgumentParser) -> None:
    """The flags default to None, so that a flag the user did not give is not a request to regenerate."""
    g = ap.add_argument_group("benchmark parameters",
                              "--make OUT makes the benchmark with these (unset ones take the defaults). "
                              "--preview --root DIR without them shows the benchmark under DIR as it is (the "
                              "default one is generated when there is none); given ones that differ from it "
                              "regenerate it, with a line naming each changed parameter")
    d = SyntheticConfig()
    g.add_argument("--seed", type=int, help=f"seed of everything generated: same seed, same images (default {d.seed})")
    g.add_argument("--train-ids", type=int, help=f"training identities (default {d.num_train_ids})")
    g.add_argument("--test-ids", type=int, help=f"test identities (default {d.num_test_ids})")
    g.add_argument("--outfits", type=int, help=f"outfits per identity, +-1 (default {d.outfits})")
    g.add_argument("--cameras", type=int, help=f"cameras, each with its own background and lighting (default {d.cameras})")
    g.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help=f"height and width of every image (default {d.img_size[0]} {d.img_size[1]})")
    g.add_argument("--shared-outfits", type=float, help=f"chance an outfit is another person's (default {d.shared_outfits})")


def given_params(args: argparse.Namespace) -> dict:
    """SyntheticConfig fields of the parameter flags the user gave (and only those)."""
    given = {field: getattr(args, dest) for dest, field in FLAGS.items() if getattr(args, dest) is not None}
    if "img_size" in given:
        given["img_size"] = tuple(given["img_size"])
    return given


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synthetic", description="Make the synthetic cloth-changing benchmark, or preview it; make the "
                                             "captioned pretraining corpus.")
    ap.add_argument("--make", metavar="OUT", help="write the benchmark to OUT/SYNTH_CC (kept if identical)")
    ap.add_argument("--root", help="with --preview alone: the folder holding SYNTH_CC (or SYNTH_CC itself)")
    ap.add_argument("--preview", metavar="FILE.png", help="save a grid of test identities x outfits x cameras, "
                                                         "and a few images with their part masks and captions")
    ap.add_argument("--corpus", metavar="OUT", help="write the captioned pretraining corpus to OUT/SYNTH_CORPUS "
                                                    "(kept if identical; the benchmark flags do not apply to it)")
    ap.add_argument("--corpus-people", type=int, metavar="N", help=f"people in the corpus (default {CorpusConfig.people})")
    add_parameter_flags(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = given_params(args)
    if args.corpus_people is not None and not args.corpus:
        raise UserError("--corpus-people is given but no --corpus OUT")
    if not (args.make or args.preview):
        if params:  # parameters alone would be silently ignored
            raise UserError(f"parameters ({', '.join(sorted(params))}) are given but nothing uses them: "
                            f"add --make OUT or --preview FILE.png --root DIR")
        if not args.corpus:
            raise UserError("nothing to do: give --make OUT and/or --preview FILE.png (with --root DIR when alone), "
                            "or --corpus OUT")
    elif args.make and args.root:
        raise UserError("--make OUT is the root: drop --root")
    elif args.make:
        t0 = time.time()
        target = generate_synthetic(args.make, SyntheticConfig(**params))  # unset flags: the defaults
        print(f"synthetic benchmark at {target} ({time.time() - t0:.1f} s)")
    elif not args.root:
        raise UserError("--preview needs --root DIR (the folder that holds SYNTH_CC) or --make OUT")
    else:  # a reader: the benchmark that is there, unless explicit flags ask for another one
        target = generate_synthetic(args.root, config_for(args.root, params))
    if args.preview:
        save_preview(target, args.preview)
    if args.corpus:
        t0 = time.time()
        people = {} if args.corpus_people is None else {"people": args.corpus_people}
        folder = generate_corpus(args.corpus, CorpusConfig(**people))
        print(f"pretraining corpus at {folder} ({time.time() - t0:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
