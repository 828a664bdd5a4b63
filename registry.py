"""The method registry: what `--method NAME` trains (train_stage1.py, train_stage2.py) and what
evaluate.py and the tools rebuild from a checkpoint. A method is one model class and one entry in
METHODS (fast-reid's meta-architectures, in our small style): SCI's and its baselines' classes are in
models.py, the other methods of SCI's field in methods/ (METHOD.md sections 12-14)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from losses import IdentityLoss, SCILoss
from methods import ccaf, csgn, cssc
from models import CLIP_ARCHS, BNNeckReID, ModelConfig, SCIReID, build_clip
from utils import UserError, load_checkpoint


@dataclass(frozen=True)
class Method:
    """A registry entry: the model class (with `from_config(config, clip_model, text_bank)`, the
    attributes `visual` (CLIP's image encoder, for Grad-CAM) and `feature_dim` (the test feature's
    width), and FLAGS, the method-specific train_stage2.py flags it reads), the class of its loss terms
    (losses.py, with `for_run(model, args, dataset, log)`, NAMES and FLAGS), whether it trains on stage 1's
    text bank (train_stage2.py then requires stage1.pt), and the per-image extras its training batches
    carry ("mask": part masks, loaders.py), passed to the model's forward by name; the backbones it
    trains (`archs`), how its backbone is built (`backbone`, CLIP's by default), the values of SCI's
    flags it stands for (`implies`: CLIP-ReID is SCI without SSE, SIM and CAL), and its own stage 1
    (`prompts`: a prompt module of train_stage1.py --method, with VIEWS, TERMS, for_run, views, banks and
    stage2_bank; None: SCI's SemanticPrompts)."""
    model: type[nn.Module]
    loss: type[nn.Module]
    needs_stage1: bool
    summary: str
    extras: tuple[str, ...] = ()
    archs: tuple[str, ...] = CLIP_ARCHS  # the --arch values it trains, its default first
    backbone: Callable[..., nn.Module] | None = None  # (config, weights, seed, logger) -> its backbone; None: CLIP
    implies: dict = field(default_factory=dict)  # SCI flags it fixes (stage-1 properties must match stage1.pt)
    prompts: type[nn.Module] | None = None  # its own stage 1 (train_stage1.py --method); None: SCI's


# the methods train_stage2.py --method trains and evaluate.py loads; a new method is one line here
METHODS: dict[str, Method] = {
    "sci": Method(SCIReID, SCILoss, needs_stage1=True,
                  summary="SCI: SIM over stage 1's F_ort bank; ID, triplet, CAL and image-to-text terms"),
    "clipreid": Method(SCIReID, SCILoss, needs_stage1=True, implies={"no_sse": True, "no_sim": True, "no_cal": True},
                       summary="CLIP-ReID, SCI's baseline: stage 1 with --no-sse (one prompt per identity), stage 2 "
                               "without SIM and CAL; ID, triplet and image-to-text terms"),
    "bnneck": Method(BNNeckReID, IdentityLoss, needs_stage1=False,
                     summary="CLIP image encoder + BNNeck; ID and triplet terms, no stage 1"),
    "cssc": Method(cssc.CSSCReID, IdentityLoss, needs_stage1=False, archs=("resnet50",), backbone=cssc.backbone,
                   summary="CSSC (ICASSP 2025, the authors' model facts): ImageNet ResNet-50 with two SMR branches; "
                           "ID on five classifiers, triplet on five features from --tri-start"),
    "ccaf": Method(ccaf.CCAFReID, ccaf.CCAFLoss, needs_stage1=True, extras=("mask",), prompts=ccaf.CCAFPrompts,
                   implies={"no_sim": True},
                   summary="CCAF (arXiv 2406.09198), RECONSTRUCTED from the paper's description: stage 1 learns "
                           "identity prompts on clothes-shielded images and clothes prompts on clothes pixels "
                           "(train_stage1.py --method ccaf; part masks); stage 2 ID, triplet, I2T, I2I and CFM terms"),
    "csgn": Method(csgn.CSGNReID, csgn.CSGNLoss, needs_stage1=True, prompts=csgn.MDGPrompts, backbone=csgn.backbone,
                   implies={"no_sim": True},
                   summary="CSGN (CVIU 2025), RECONSTRUCTED from the paper's description: stage 1 learns prompts on RGB "
                           "and grayscale image features (train_stage1.py --method csgn); stage 2 fuses a second CLIP "
                           "image encoder of the other family (--vss-weights); ID, triplet and both banks' I2T terms"),
}


def build_model(config: ModelConfig, text_bank: torch.Tensor | None = None, weights: str = "none", seed: int = 0,
                logger=None) -> nn.Module:
    """The model of `config`'s method, its CLIP backbone from `weights` ("none": random init, e.g.
    when a checkpoint's state dict will replace every parameter anyway). `text_bank`: stage 1's
    bank for methods that need one."""
    method = method_of(config.method)
    if method.needs_stage1 and text_bank is None:
        raise ValueError(f"method {config.method} needs stage 1's text bank")
    if config.arch not in method.archs:
        raise UserError(f"--method {config.method} trains --arch {' or '.join(method.archs)}, not {config.arch}")
    if method.backbone is not None:
        return method.model.from_config(config, method.backbone(config, weights, seed, logger), text_bank)
    clip_model = build_clip(config.arch, weights, tuple(config.img_size), seed=seed, vit_stride=config.vit_stride,
                            logger=logger)
    return method.model.from_config(config, clip_model, text_bank)


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; this version knows {', '.join(METHODS)} (registry.METHODS)")
    return METHODS[name]


def load_checkpoint_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict, ModelConfig]:
    """Rebuild a trained model of any registered method from its checkpoint alone: (model in eval
    mode, the run's arguments, its ModelConfig). No pretrained file is needed."""
    ckpt = load_checkpoint(path, "stage2", ("model", "config"))
    try:
        config = ModelConfig(**ckpt["config"])
    except TypeError as exc:
        raise UserError(f"{path}: its model configuration does not fit this version ({exc}); re-run "
                        f"train_stage2.py") from None
    state = ckpt["model"]
    model = build_model(config, state.get("text_bank"))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: the stored weights do not fit the model its configuration describes "
                        f"({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), ckpt["args"], config
