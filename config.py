"""The defaults a researcher changes: the recipe table (every default that depends on the
architecture or the dataset, each with its source), the argument groups both training scripts share,
and how a run's flags are filled from the table or restored from a saved run (--resume).

    python -c "import config; print(config.recipe_markdown())"     # the table as the README shows it
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from datasets import DATASETS
from methods.cssc import IMAGENET_WEIGHTS
from models import CLIP_ARCHS
from registry import METHODS
from utils import AMP_DTYPES, UserError, default_workers

DEFAULT_OUTPUT_DIR = "runs/sci"
DEFAULT_DATA_ROOT = "data"
ARCHS = (*CLIP_ARCHS, "resnet50")  # resnet50: torchvision's, for CSSC

# Evaluation and profiling settings (evaluate.py, tools/*.py); their --help shows these values. The input
# size a checkpoint is tested at is its own (ModelConfig.img_size), and tools/profile.py's is the recipe's.
EVAL_BATCH_SIZE = 128           # test images per forward pass: no gradients, so larger than a training batch
PROFILE_NUM_IDS = 77            # text-bank rows in tools/profile.py's count: LTCC's 77 training identities


# ----------------------------------------------------------------------------- the recipe table

# Every default that depends on the architecture or the dataset lives here, and only here. A value
# applies where its flag is not given; `--help` and the README show this table. Sources:
#   SCI       the paper, section IV-B (settings for RN50 only; its ViT-B/16 results come without them)
#   CLIP-ReID configs/person/cnn_clipreid.yml (RN50) and configs/person/vit_clipreid.yml (ViT-B/16)
#   CAL       Simple-CCReID configs/default_img.py and main.py
#   CSSC      CSSC-CCReID utils/arguments.py, main.py and data_process/transform.py (--method cssc, --arch resnet50)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STAGE1_KEYS = ("stage1_epochs", "stage1_batch_size", "stage1_lr", "stage1_weight_decay", "stage1_warmup_epochs",
               "stage1_warmup_lr", "stage1_min_lr")
CLIP_REID_STAGE2 = {                  # stage-2 settings CLIP-ReID keeps for both backbones
    "stage2_num_instances": 4,        # CLIP-ReID: DATALOADER.NUM_INSTANCE
    "stage2_tri_start": 0,            # CLIP-ReID: the triplet from the first epoch
    "stage2_bias_lr_factor": 2.0,     # CLIP-ReID: SOLVER.BIAS_LR_FACTOR (biases at twice the rate)
    "stage2_schedule_from": 1,        # CLIP-ReID: its scheduler steps before each epoch (1 in the first)
    "stage2_augmentation": "clip-reid",  # CLIP-ReID: bicubic resize, timm's pixel-noise erasing (loaders.py)
    "stage2_flip_test": False,        # CLIP-ReID: TEST has no flip
    "stage2_amp": None,               # CLIP-ReID: autocast + GradScaler on its GPUs (None: on with CUDA, off on CPU)
    "stage2_eval_every": 10,          # CLIP-ReID evaluates at its last epoch only; every 10 here, so best.pt can choose
}
RECIPES: dict[str, dict[str, Any]] = {
    "RN50": {
        "img_size": [384, 192],       # SCI IV-B
        "pixel_mean": IMAGENET_MEAN,  # CLIP-ReID cnn: INPUT.PIXEL_MEAN
        "pixel_std": IMAGENET_STD,    # CLIP-ReID cnn: INPUT.PIXEL_STD
        "stage1_epochs": 60,          # SCI IV-B
        "stage1_batch_size": 64,      # CLIP-ReID cnn: STAGE1.IMS_PER_BATCH
        "stage1_lr": 3.5e-4,          # CLIP-ReID cnn: STAGE1.BASE_LR
        "stage1_weight_decay": 1e-4,  # CLIP-ReID cnn: STAGE1.WEIGHT_DECAY
        "stage1_warmup_epochs": 5,    # CLIP-ReID cnn: STAGE1.WARMUP_EPOCHS
        "stage1_warmup_lr": 1e-5,     # CLIP-ReID cnn: STAGE1.WARMUP_LR_INIT
        "stage1_min_lr": 1e-6,        # CLIP-ReID cnn: STAGE1.LR_MIN
        "stage2_epochs": 120,         # SCI IV-B
        "stage2_batch_size": 64,      # SCI IV-B (16 identities x 4 images)
        "stage2_lr": 3.5e-4,          # SCI IV-B; CLIP-ReID cnn: STAGE2.BASE_LR
        "stage2_weight_decay": 5e-4,  # CLIP-ReID cnn: STAGE2.WEIGHT_DECAY
        "stage2_warmup_epochs": 10,   # CLIP-ReID cnn: STAGE2.WARMUP_ITERS (stepped per epoch)
        "stage2_warmup_factor": 0.01,  # CLIP-ReID cnn: STAGE2.WARMUP_FACTOR
        "stage2_milestones": [40, 70],  # SCI IV-B; CLIP-ReID cnn: STAGE2.STEPS
        "id_loss_weight": 1.0,        # CLIP-ReID cnn: MODEL.ID_LOSS_WEIGHT
        "clothes_lr": 3.5e-4,         # CAL: the clothes classifier's Adam at TRAIN.OPTIMIZER.LR, never decayed
        "stage2_cal_start": 25,       # CAL: TRAIN.START_EPOCH_CC / START_EPOCH_ADV
        **CLIP_REID_STAGE2,
    },
    "ViT-B/16": {
        "img_size": [384, 192],       # SCI IV-B's input size (CLIP-ReID's ViT config uses 256x128)
        "pixel_mean": (0.5, 0.5, 0.5),  # CLIP-ReID vit: INPUT.PIXEL_MEAN
        "pixel_std": (0.5, 0.5, 0.5),   # CLIP-ReID vit: INPUT.PIXEL_STD
        "stage1_epochs": 120,         # CLIP-ReID vit: STAGE1.MAX_EPOCHS
        "stage1_batch_size": 64,      # CLIP-ReID vit: STAGE1.IMS_PER_BATCH
        "stage1_lr": 3.5e-4,          # CLIP-ReID vit: STAGE1.BASE_LR
        "stage1_weight_decay": 1e-4,  # CLIP-ReID vit: STAGE1.WEIGHT_DECAY
        "stage1_warmup_epochs": 5,    # CLIP-ReID vit: STAGE1.WARMUP_EPOCHS
        "stage1_warmup_lr": 1e-5,     # CLIP-ReID vit: STAGE1.WARMUP_LR_INIT
        "stage1_min_lr": 1e-6,        # CLIP-ReID vit: STAGE1.LR_MIN
        "stage2_epochs": 60,          # CLIP-ReID vit: STAGE2.MAX_EPOCHS
        "stage2_batch_size": 64,      # CLIP-ReID vit: STAGE2.IMS_PER_BATCH
        "stage2_lr": 5e-6,            # CLIP-ReID vit: STAGE2.BASE_LR
        "stage2_weight_decay": 1e-4,  # CLIP-ReID vit: STAGE2.WEIGHT_DECAY
        "stage2_warmup_epochs": 10,   # CLIP-ReID vit: STAGE2.WARMUP_ITERS (stepped per epoch)
        "stage2_warmup_factor": 0.1,  # CLIP-ReID vit: STAGE2.WARMUP_FACTOR
        "stage2_milestones": [30, 50],  # CLIP-ReID vit: STAGE2.STEPS
        "id_loss_weight": 0.25,       # CLIP-ReID vit: MODEL.ID_LOSS_WEIGHT
        "clothes_lr": 3.5e-4,         # CAL (as RN50): the clothes head is new, not fine-tuned
        "stage2_cal_start": 25,       # CAL (as RN50)
        **CLIP_REID_STAGE2,
    },
    "resnet50": {                     # CSSC's recipe (utils/arguments.py unless said); it has no stage 1
        "img_size": [384, 192],       # CSSC --height, --width
        "pixel_mean": IMAGENET_MEAN,  # CSSC data_process/transform.py
        "pixel_std": IMAGENET_STD,    # CSSC data_process/transform.py
        **{key: None for key in STAGE1_KEYS},
        "stage2_epochs": 120,         # CSSC --max_epoch
        "stage2_batch_size": 32,      # CSSC --train_batch
        "stage2_lr": 3e-4,            # CSSC --lr
        "stage2_weight_decay": 5e-4,  # CSSC --weight_decay (main.py: one Adam group, biases included)
        "stage2_warmup_epochs": 10,   # CSSC scheduler/: warmup_iters=10 (main.py does not pass --warm_up_epochs)
        "stage2_warmup_factor": 0.1,  # CSSC --warm_up_factor
        "stage2_milestones": [30, 60],  # CSSC --step_milestones
        "id_loss_weight": 1.0,        # CSSC train_cssc.py: each classifier's CE weighs 1
        "clothes_lr": None,           # CSSC: no clothes classifier
        "stage2_cal_start": None,     # CSSC: no clothes-adversarial loss
        "stage2_num_instances": 8,    # CSSC --num_instances
        "stage2_tri_start": 35,       # CSSC --tri_start_epoch: the triplet from the epoch after it
        "stage2_bias_lr_factor": 1.0,  # CSSC main.py: one parameter group
        "stage2_schedule_from": 0,    # CSSC main.py: its WarmupMultiStepLR counts epochs done (0 in the first)
        "stage2_augmentation": "cssc",  # CSSC transform.py: bilinear resize, zero-filled erasing (loaders.py)
        "stage2_flip_test": True,     # CSSC test_cc.py: features of the image and its mirror image, summed
        "stage2_amp": False,          # CSSC main.py, train_cssc.py: float32, no autocast
        "stage2_eval_every": 5,       # CSSC --eval_epoch
    },
}
RECIPES["tiny"] = dict(RECIPES["RN50"])  # the tiny preset is a narrow ModifiedResNet: RN50's recipe
RECIPES["tiny-vit"] = dict(RECIPES["ViT-B/16"])  # the tiny ViT preset: ViT-B/16's recipe
# per-dataset values override the architecture's, for the backbones named (recipe())
DATASET_RECIPES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "prcc": (CLIP_ARCHS, {"stage1_epochs": 20, "stage2_epochs": 20}),  # SCI IV-B
    "celebreid": (("resnet50",), {"stage2_num_instances": 4}),          # CSSC README: --num_instances 4
}


def recipe(arch: str, dataset: str) -> dict[str, Any]:
    """The defaults for one (architecture, dataset) pair: RECIPES[arch] updated by DATASET_RECIPES where
    the dataset's overrides name the architecture (SCI's for CLIP's backbones, CSSC's for resnet50)."""
    archs, overrides = DATASET_RECIPES.get(dataset, ((), {}))
    return {**RECIPES[arch], **(overrides if arch in archs else {})}


def _fmt(value: Any) -> str:
    """3.5e-4 rather than 0.00035; lists as space-separated values, as on the command line; "–" for none."""
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _backbones(archs: tuple[str, ...]) -> str:
    return "CLIP" if archs == CLIP_ARCHS else " or ".join(archs)


def recipe_help(key: str) -> str:
    """'RN50 60, ViT-B/16 120; prcc 20': how a recipe value varies, for --help."""
    text = ", ".join(f"{arch} {_fmt(values[key])}" for arch, values in RECIPES.items() if not arch.startswith("tiny"))
    by_dataset = [f"{name} {_fmt(values[key])} with {_backbones(archs)}" for name, (archs, values) in DATASET_RECIPES.items()
                  if key in values]
    return text + ("; " + ", ".join(by_dataset) if by_dataset else "")


def recipe_markdown() -> str:
    """The recipe table as the README shows it (tests/test_train.py checks that the README has it)."""
    archs = [a for a in RECIPES if not a.startswith("tiny")]
    lines = ["| setting | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for key in RECIPES["RN50"]:
        extra = "".join(f" ({name} with {_backbones(archs)}: {_fmt(v[key])})" for name, (archs, v) in DATASET_RECIPES.items()
                        if key in v)
        lines.append(f"| `{key}`{extra} | " + " | ".join(_fmt(RECIPES[a][key]) for a in archs) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- arguments

def add_common_args(parser: argparse.ArgumentParser, stage: str) -> None:
    """Flags shared by train_stage1.py and train_stage2.py (`stage` "stage1" or "stage2"), with the
    same names and meaning. Recipe-dependent flags default to None and are filled by `apply_recipe`."""
    def rec(key: str) -> str:
        return f"(default: {recipe_help(f'{stage}_{key}')})"

    inherited = stage == "stage2"  # these come from stage1.pt unless given
    parser.epilog = ("recipe table (config.RECIPES): the defaults by architecture, used where a flag is not given\n"
                     + recipe_markdown().replace("`", ""))

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None if inherited else "synthetic",
                   help=", ".join(DATASETS) + "; custom is your own CSVs (datasets.DATASETS) (default: "
                        + ("the stage-1 run's; synthetic for a "
                        "method without stage 1)" if inherited else "synthetic)"))
    g.add_argument("--root", default=None if inherited else DEFAULT_DATA_ROOT,
                   help="folder holding the dataset's own folder (default: " + ("the stage-1 run's)" if inherited else
                        f"{DEFAULT_DATA_ROOT}; synthetic is generated there on first use)"))
    g.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input height and width (default: " + ("the stage-1 run's)" if inherited else
                                                                  f"{recipe_help('img_size')})"))
    g.add_argument("--workers", type=int, default=None,
                   help=f"data-loading worker processes (default: {workers_help()})")

    g = parser.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default=None if inherited else "RN50",
                   help="CLIP backbone; tiny and tiny-vit are small presets for CPU demos and tests (random weights "
                        "unless --weights gives a file of their family); resnet50 is torchvision's, for --method cssc "
                        "(default: " + ("the stage-1 run's; the method's first backbone for a method without stage 1, "
                                        "RN50 or resnet50)" if inherited else "RN50)"))
    g.add_argument("--weights", default=None,
                   help="pretrained CLIP: a checkpoint path, a model name looked up in ~/.cache/clip "
                        "(or $CLIP_CACHE_DIR), or 'none' for random init; for resnet50 torchvision's ImageNet file "
                        "(default: " + ("the stage-1 run's)" if inherited else "the --arch name; none for tiny)"))

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help=f"training epochs {rec('epochs')}")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"images per optimizer step, over all processes under torchrun {rec('batch_size')}")
    g.add_argument("--lr", type=float, default=None, help=f"base learning rate {rec('lr')}")
    g.add_argument("--weight-decay", type=float, default=None, help=f"weight decay {rec('weight_decay')}")
    g.add_argument("--warmup-epochs", type=int, default=None, help=f"linear warm-up epochs {rec('warmup_epochs')}")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: float16 with a gradient scaler on CUDA, bfloat16 on CPU (see --amp-dtype). "
                        "Default: on with CUDA, as CLIP-ReID trains; off on CPU (float32). --no-amp: float32 everywhere")
    g.add_argument("--amp-dtype", choices=tuple(AMP_DTYPES), default=None,
                   help="--amp's precision; float16 uses a gradient scaler and skips steps whose gradients "
                        "overflow (default: float16 on CUDA, bfloat16 on CPU)")
    g.add_argument("--seed", type=int, default=1, help="random seed; same seed, same numbers on CPU (default: 1)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="deterministic kernels (torch.use_deterministic_algorithms; on CUDA also "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8 and no cuDNN autotuning). Default: on for CPU, off for "
                        "CUDA, where it is slower and cuDNN autotuning is on instead")

    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where checkpoints and logs go (default: %(default)s)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto picks cuda when available (default: auto)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR's last checkpoint, ending exactly as an uninterrupted run")
    g.add_argument("--log-every", type=int, default=20,
                   help="progress line every N steps when not on a terminal (default: %(default)s)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write each epoch's metrics_stage*.jsonl entries as TensorBoard scalars under "
                        "OUTPUT_DIR/tensorboard/ (needs the tensorboard package)")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """Properties of the stage-1 prompts (stage 2 inherits them from stage1.pt)."""
    g = parser.add_argument_group("prompts")
    g.add_argument("--n-ctx", type=int, default=4, help="learnable [X] tokens per prompt, M (default: %(default)s)")
    g.add_argument("--no-sse", action="store_true",
                   help="ablation: one identity prompt, F_ort = F_id, no L_sim (the CLIP-ReID baseline)")
    g.add_argument("--ortho", choices=("paper", "gram-schmidt"), default="paper",
                   help="Eq. 4-5 as printed (paper, default) or removal of the F_clo direction (gram-schmidt)")
    g.add_argument("--clothes-prompt", choices=("identity", "outfit"), default="identity",
                   help="one clothes prompt per identity (the paper, default) or per outfit, trained against "
                        "that outfit's images (an extension; needs --ortho gram-schmidt)")
    g.add_argument("--lambda-id", type=float, default=1.0,
                   help="lambda_1 of Eq. 8, weight of 1 - sim_id (default: %(default)s)")
    g.add_argument("--lambda-clo", type=float, default=1.0, help="lambda_2 of Eq. 8, weight of sim_clo (default: %(default)s)")
    g.add_argument("--vit-stride", type=int, default=None,
                   help="ViT patch stride (overlapping patches when below the patch size; default: the patch size)")


def add_stage2_args(parser: argparse.ArgumentParser) -> None:
    """train_stage2.py's own flags: the method and its options, the P x K sampler, the schedule's
    milestones and the evaluations (here, beside the other groups, so evaluate.py reads their defaults
    for run labels without importing the training script)."""
    g = parser.add_argument_group("stage 2")
    g.add_argument("--method", choices=tuple(METHODS), default="sci",
                   help="what to train (registry.METHODS): " + "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())
                        + " (default: %(default)s)")
    g.add_argument("--stage1", default=None, help="stage-1 file (default: OUTPUT_DIR/stage1.pt). Stage 2 takes "
                   "the stage-1 run's dataset, root, architecture, weights and image size unless given (--dataset "
                   "and --arch must agree with it), and its prompt properties (--n-ctx --no-sse --ortho --clothes-prompt "
                   "--lambda-id --lambda-clo --vit-stride) and similarity (--cosine-sim: Eq. 19 then uses cosine "
                   "times stage 1's scale), which have no stage-2 flag")
    g.add_argument("--masks", default=None, metavar="DIR",
                   help="part masks for a method that trains on them (registry.Method.extras): SCHP label PNGs at each "
                        "image's relative path (masks.py; default: the synthetic world's own, none elsewhere)")
    g.add_argument("--num-instances", type=int, default=None,
                   help=f"K images per identity in a batch (default: {recipe_help('stage2_num_instances')})")
    g.add_argument("--milestones", type=int, nargs="+", default=None, help="epochs where the rate drops x0.1 "
                   f"(default: {recipe_help('stage2_milestones')})")
    g.add_argument("--clothes-lr", type=float, default=None,
                   help="constant learning rate of the clothes classifier, as in CAL, whose scheduler decays only "
                        f"the main optimizer (default: {recipe_help('clothes_lr')})")
    g.add_argument("--loss-weight", nargs="+", default=[], metavar="TERM=W",
                   help="weights of the method's loss terms in Eq. 20 (" + "; ".join(f"{name}: {', '.join(m.loss.NAMES)}"
                        for name, m in METHODS.items()) + "); unnamed terms weigh 1 (default: id from the recipe: "
                        f"{recipe_help('id_loss_weight')})")
    g.add_argument("--cal-start", type=int, default=None, help="epoch where the clothes classifier and L_cal "
                   f"(ccaf: its CFM) start (default: {recipe_help('stage2_cal_start')}, or half the epochs where that is less)")
    g.add_argument("--no-sim", action="store_true", help="ablation: no SIM, the image tokens go straight to f_proj")
    g.add_argument("--no-cal", action="store_true", help="ablation: no clothes classifier and no L_cal")
    g.add_argument("--triplet", action=argparse.BooleanOptionalAction, default=True,
                   help="CLIP-ReID's batch-hard triplet term (margin 0.3, weight 1) on the model's triplet features; "
                        "SCI's are CLIP-ReID's three: pooled layer3 and layer4 maps and f_proj (RN50), or the class "
                        "token before and after the last block and f_proj (ViT); bnneck's is its one feature. Default: "
                        "on, as in CLIP-ReID's code, which SCI extends; --no-triplet trains Eq. 20 literally")
    g.add_argument("--tri-start", type=int, default=None,
                   help="the triplet term from the epoch after this one (CSSC's tri_start_epoch; 0: from the first) "
                        f"(default: {recipe_help('stage2_tri_start')})")
    g.add_argument("--vss-arch", choices=CLIP_ARCHS, default=None,
                   help="csgn: the second CLIP image encoder VSS fuses (default: the other family of --arch: "
                        "ViT-B/16 beside RN50, tiny-vit beside tiny, and the reverse)")
    g.add_argument("--vss-weights", default=None,
                   help="csgn: its weights, as --weights takes them (default: its OpenAI name; for tiny-vit or tiny a "
                        "file must be given, e.g. python -m synthetic.pretrain --arch tiny-vit's, or none)")
    g.add_argument("--sim-norm", choices=("dot", "softmax"), default="dot",
                   help="non-local affinity of Eq. 12: dot (as printed, divided by the number of tokens N) or "
                        "softmax over the N keys (embedded Gaussian) (default: %(default)s)")
    g.add_argument("--neck-feat", choices=("before", "after"), default="before",
                   help="test feature taken before or after the BN necks (default: before)")
    g.add_argument("--eval-every", type=int, default=None,
                   help=f"evaluate every N epochs and at the end (default: {recipe_help('stage2_eval_every')})")
    g.add_argument("--eval-before", action="store_true",
                   help="also evaluate the model before training (written as 'untrained' in results.json)")
    g.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=None,
                   help="average test features with horizontally flipped images "
                        f"(default: {recipe_help('stage2_flip_test')})")


def apply_recipe(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """Fill every flag left at None from the recipe of (args.arch, args.dataset), and record the
    recipe-only values (normalisation) in args, so the checkpoint describes its own preprocessing."""
    values = recipe(args.arch, args.dataset)
    prefix = f"{stage}_"
    fill_defaults(args, {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)})
    fill_defaults(args, {k: v for k, v in values.items() if not k.startswith(("stage1_", "stage2_"))
                         and hasattr(args, k)})
    args.img_size = list(args.img_size)
    args.pixel_mean, args.pixel_std = list(values["pixel_mean"]), list(values["pixel_std"])
    return args


def loss_weights(items: list[str], names: tuple[str, ...], defaults: dict[str, float]) -> dict[str, float]:
    """--loss-weight TERM=W ... over `defaults` (e.g. the recipe's ID-loss weight); TERM one of `names`."""
    weights = dict(defaults)
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or name not in names:
            raise UserError(f"--loss-weight {item}: expected TERM=WEIGHT with TERM one of {', '.join(names)} and a "
                            f"number, e.g. --loss-weight {names[0]}=0.5")
    return weights


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags typed on the command line, as opposed to defaults (argparse sets
    a default only where the namespace lacks the attribute, so a pre-filled marker shows what was typed)."""
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(sys.argv[1:] if argv is None else argv, namespace=namespace)
    return {key for key, value in vars(namespace).items() if value is not marker}


# --resume may change where and how fast the run goes on, never what it trains
RESUME_MAY_CHANGE = ("device", "workers", "log_every", "tensorboard")


def restore_run(args: argparse.Namespace, saved: dict, checkpoint: Path,
                normalize: Callable[[str, Any, dict], Any] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """--resume: the settings the run was started with (`saved`, the checkpoint's `args`). A flag typed
    now with another value is refused, naming it, except RESUME_MAY_CHANGE's, which apply (returned as
    log lines). `normalize(key, value, saved)` makes a typed value comparable with the saved one."""
    def comparable(key: str, value: Any) -> Any:
        value = list(value) if isinstance(value, tuple) else value
        return normalize(key, value, saved) if normalize else value

    restored = argparse.Namespace(**saved)
    notes, refused = [], []
    for key in sorted(args.given - {"resume", "output_dir"}):
        mine = getattr(args, key)
        if key in saved and comparable(key, mine) == comparable(key, saved[key]):
            continue
        flag = "--" + key.replace("_", "-")
        if key in RESUME_MAY_CHANGE:
            setattr(restored, key, mine)
            note = f"--resume: {flag} {_fmt(mine)} instead of the saved {_fmt(saved.get(key))}"
            if key == "workers":
                note += " (augmentation draws follow the workers: the remaining epochs differ from an uninterrupted run's)"
            notes.append(note)
        else:
            refused.append(f"{flag} {_fmt(mine)} (saved: {_fmt(saved.get(key))})")
    if refused:
        raise UserError(f"--resume continues {checkpoint} with the settings its run was started with, but "
                        f"{'; '.join(refused)} differ; drop them to continue (only "
                        f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may change), "
                        f"or pick a new --output-dir for a new run")
    for key, value in vars(args).items():  # flags newer than the saved run: this command's value (a default)
        if not hasattr(restored, key):
            setattr(restored, key, value)
    restored.resume, restored.output_dir, restored.given = True, args.output_dir, args.given
    return restored, notes


def fill_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> argparse.Namespace:
    """Replace every None-valued flag by its default (defaults may depend on the dataset)."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def workers_help() -> str:
    """--workers' default as --help shows it: the rule and what it picks on this machine."""
    here = default_workers("cuda" if torch.cuda.is_available() else "cpu")
    return f"min(8, CPUs) with CUDA, min(2, CPUs) on CPU; here {here}"


def resolve_weights(arch: str, weights: str | None) -> str:
    """--weights default: the arch's OpenAI name, torchvision's ImageNet file for resnet50 (CSSC); the
    tiny preset has no pretrained file."""
    if weights is None:
        return "none" if arch.startswith("tiny") else TORCHVISION_WEIGHTS.get(arch, arch)
    return weights


TORCHVISION_WEIGHTS = {"resnet50": IMAGENET_WEIGHTS}  # the file torchvision's pretrained=True reads (CSSC's start)
