"""CSGN: CLIP-driven Semantic Guidance Network (Lu et al., CVIU 259, 104406, 2025), METHOD.md section 14.

RECONSTRUCTED FROM THE PAPER'S DESCRIPTION: no code is public and the text available here (the abstract
and the first pages) names its modules without their equations. Every choice below is one of ours,
listed in METHOD.md section 14 with the sentence it rests on. Its "Meta-Insert" step is not rebuilt:
nothing of it was available.

CLIP-ReID's two stages with:
  MDG (stage 1): two sets of identity prompts of CLIP-ReID's form, one learnt against CLIP's features of
    the RGB images, one against those of their grayscale versions, each with CLIP-ReID's image-to-text
    and text-to-image losses; two banks, F_rgb and F_gray;
  VSS (stage 2): a second CLIP image encoder of the other family (ViT beside a ResNet, or the reverse)
    whose projected feature is mapped into the first's space and added to its f_proj (the map starts
    at zero: the model starts as CLIP-ReID);
  HSF (stage 2): the fused feature's identity logits against both banks (Eq. 19's form, once per bank).

    python train_stage1.py --method csgn --dataset ltcc --root /data --arch RN50
    python train_stage2.py --method csgn --vss-weights ViT-B/16
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from losses import LABEL_SMOOTHING, CrossEntropyLabelSmooth, IdentityLoss, contrastive_pair, text_logits
from models import ID_TEMPLATE, BNNeck, PromptLearner, PromptSet, build_clip
from utils import UserError

OTHER_FAMILY = {"RN50": "ViT-B/16", "ViT-B/16": "RN50", "tiny": "tiny-vit", "tiny-vit": "tiny"}  # VSS's default
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the weights of PIL's convert("L")


# ----------------------------------------------------------------------------- stage 1: MDG

def grayscale(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """The grayscale version of normalised images [B, 3, H, W]: back to pixels, L = 0.299 R + 0.587 G +
    0.114 B in every channel, normalised again."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    s = torch.tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    pixels = images * s + m
    luma = (pixels * torch.tensor(LUMA, device=images.device, dtype=images.dtype)[:, None, None]).sum(1, keepdim=True)
    return (luma - m) / s


class MDGPrompts(PromptSet):
    """Stage 1 of CSGN (MDG): identity prompts of CLIP-ReID's form learnt on RGB image features and a
    second set learnt on grayscale image features. forward(...) gives the terms CSGN-1 of METHOD.md 14."""

    VIEWS = ("rgb", "gray")
    TERMS = ("i2t", "t2i", "gray_i2t", "gray_t2i")
    NEEDS_MASKS = False

    def __init__(self, clip_model: nn.Module, num_ids: int, n_ctx: int = 4):
        super().__init__(clip_model)
        self.rgb_prompt = PromptLearner(clip_model, num_ids, ID_TEMPLATE, n_ctx)
        self.gray_prompt = PromptLearner(clip_model, num_ids, ID_TEMPLATE, n_ctx)

    @classmethod
    def for_run(cls, clip_model: nn.Module, dataset, args) -> MDGPrompts:
        return cls(clip_model, dataset.num_train_pids, args.n_ctx)

    @staticmethod
    def views(args) -> dict[str, Callable[[Tensor, Tensor | None], Tensor]]:
        mean, std = args.pixel_mean, args.pixel_std
        return {"rgb": lambda images, mask=None: images, "gray": lambda images, mask=None: grayscale(images, mean, std)}

    def forward(self, labels: Tensor, clothes: Tensor, feats: dict[str, Tensor], logit_scale: float,
                cosine: bool) -> dict[str, Tensor]:
        """CSGN-1: CLIP-ReID's Eq. 9-10 for each modality, its prompts against its image features."""
        t_rgb, t_gray = self.text(self.rgb_prompt, labels), self.text(self.gray_prompt, labels)
        i2t, t2i = contrastive_pair(feats["rgb"], t_rgb, labels, logit_scale, cosine)
        gray_i2t, gray_t2i = contrastive_pair(feats["gray"], t_gray, labels, logit_scale, cosine)
        return {"i2t": i2t, "t2i": t2i, "gray_i2t": gray_i2t, "gray_t2i": gray_t2i}

    @torch.no_grad()
    def banks(self, num_ids: int, batch: int = 64) -> dict[str, Tensor]:
        """F_id (= F_rgb; F_ort = F_id, there is no SSE; F_clo zeros: no clothes prompt) and F_gray, C x D."""
        f_rgb, f_gray = self.rows(self.rgb_prompt, num_ids, batch), self.rows(self.gray_prompt, num_ids, batch)
        return {"F_id": f_rgb, "F_clo": torch.zeros_like(f_rgb), "F_ort": f_rgb.clone(), "F_gray": f_gray}

    @staticmethod
    def stage2_bank(banks: dict[str, Tensor]) -> Tensor:
        """The rows stage 2 keeps: F_rgb (C) then F_gray (C), [2C, D]."""
        return torch.cat([banks["F_id"], banks["F_gray"]])


# ----------------------------------------------------------------------------- stage 2: VSS and HSF

def vss_arch(config) -> str:
    return config.vss_arch or OTHER_FAMILY[config.arch]


def missing_vss(arch: str) -> UserError:
    return UserError(f"--method csgn fuses a second image encoder (VSS, --vss-arch {arch}) and has no weights for it: "
                     f"pass --vss-weights FILE (a {arch} CLIP, e.g. python -m synthetic.pretrain --arch tiny-vit) or "
                     f"--vss-weights none for random init")


def backbone(config, weights: str, seed: int = 0, logger=None) -> tuple[nn.Module, nn.Module]:
    """registry.Method's backbone hook: (the CLIP of --arch, the CLIP of the VSS arch). weights "none" (random
    init, or a checkpoint's rebuild, whose state dict replaces every weight) builds both at random."""
    primary = build_clip(config.arch, weights, tuple(config.img_size), seed=seed, vit_stride=config.vit_stride,
                         logger=logger)
    second = "none" if weights == "none" else config.vss_weights
    if second is None:
        raise missing_vss(vss_arch(config))
    return primary, build_clip(vss_arch(config), second, tuple(config.img_size), seed=seed + 1, logger=logger)


class CSGNReID(nn.Module):
    """CLIP-ReID's stage-2 model with VSS: f_fuse = f_proj + W f_vss (W: Linear(D_vss -> D), zero at the
    start), BN necks on f_glob and f_fuse; the test feature is concat(f_glob, f_fuse) before BN (or after,
    with neck_feat="after"). The text bank holds F_rgb (the first num_classes rows) then F_gray."""

    FLAGS = ("vss_arch", "vss_weights")

    def __init__(self, clip_model: nn.Module, vss_model: nn.Module, num_classes: int, text_bank: Tensor,
                 neck_feat: str = "before"):
        super().__init__()
        self.visual, self.vss = clip_model.visual, vss_model.visual
        self.register_buffer("text_bank", text_bank.float().clone())  # [2C, D], fixed in stage 2
        dim, feat_dim = self.visual.output_dim, self.visual.feature_dim
        self.fuse = nn.Linear(self.vss.output_dim, dim)
        nn.init.zeros_(self.fuse.weight)  # a choice (METHOD.md 14): the fused model starts as CLIP-ReID
        nn.init.zeros_(self.fuse.bias)
        self.neck_glob = BNNeck(feat_dim, num_classes)
        self.neck_fuse = BNNeck(dim, num_classes)
        self.neck_feat = neck_feat
        self.num_classes = num_classes
        self.feature_dim = feat_dim + dim

    @staticmethod
    def resolve_args(args) -> None:
        """train_stage2.py's hook for a new run: --vss-arch defaults to the other family of --arch, and
        --vss-weights to its OpenAI name (none for the tiny presets: a file must be given)."""
        args.vss_arch = args.vss_arch or OTHER_FAMILY[args.arch]
        family = lambda arch: "ViT" if "vit" in arch.lower() else "ResNet"  # noqa: E731
        if family(args.vss_arch) == family(args.arch):  # "combines ResNet and ViT feature extractors"
            raise UserError(f"--vss-arch {args.vss_arch}: VSS combines a ResNet and a ViT, and --arch {args.arch} is a "
                            f"{family(args.arch)} too; pick one of the other family, e.g. {OTHER_FAMILY[args.arch]}")
        if args.vss_weights is None and not args.vss_arch.startswith("tiny") and args.weights != "none":
            args.vss_weights = args.vss_arch
        if args.weights == "none" and args.vss_weights not in (None, "none"):
            raise UserError(f"--weights none builds the whole model at random, VSS's encoder too; drop --vss-weights "
                            f"{args.vss_weights}, or give --weights")
        if args.weights == "none":
            args.vss_weights = "none"  # what the run trains from, recorded
        elif args.vss_weights is None:  # said before any data is read
            raise missing_vss(args.vss_arch)

    @classmethod
    def from_config(cls, config, backbone: tuple[nn.Module, nn.Module], text_bank: Tensor | None) -> CSGNReID:
        return cls(*backbone, config.num_classes, text_bank, config.neck_feat)

    @property
    def rgb_bank(self) -> Tensor:
        return self.text_bank[:self.num_classes]

    @property
    def gray_bank(self) -> Tensor:
        return self.text_bank[self.num_classes:]

    def forward(self, images: Tensor):
        f_vss = self.fuse(self.vss(images))  # [B, D]
        if not self.training:
            f_glob, tokens = self.visual(images, return_tokens=True)
            f_fuse = tokens[:, 0] + f_vss
            if self.neck_feat == "after":
                return torch.cat([self.neck_glob.bn(f_glob), self.neck_fuse.bn(f_fuse)], dim=1)
            return torch.cat([f_glob, f_fuse], dim=1)
        f_mid, f_glob, tokens = self.visual(images, return_tokens=True, return_middle=True)
        f_fuse = tokens[:, 0] + f_vss
        bn_glob, logits_glob = self.neck_glob(f_glob)
        bn_fuse, logits_fuse = self.neck_fuse(f_fuse)
        return {"f_glob": f_glob, "f_proj": f_fuse, "logits": [logits_glob, logits_fuse],
                "bn_feat": torch.cat([bn_glob, bn_fuse], dim=1), "triplet_feats": [f_mid, f_glob, f_fuse]}


class CSGNLoss(IdentityLoss):
    """CSGN's stage-2 terms: L_id and the triplet (CLIP-ReID's), and HSF: Eq. 19's form against F_rgb (i2t)
    and against F_gray (i2t_gray), CSGN-2 of METHOD.md 14."""

    NAMES = ("id", "i2t", "i2t_gray", "tri")
    FLAGS = ("triplet", "tri_start")

    def __init__(self, rgb_bank: Tensor, gray_bank: Tensor, triplet: bool = True,
                 i2t_logit_scale: float | None = None, tri_start: int = 0):
        super().__init__(triplet, tri_start)
        self.rgb_bank, self.gray_bank = rgb_bank, gray_bank  # views of the model's buffer
        self.i2t_logit_scale = i2t_logit_scale
        self.i2t_loss = CrossEntropyLabelSmooth(LABEL_SMOOTHING)

    @classmethod
    def for_run(cls, model: CSGNReID, args, dataset, log) -> CSGNLoss:
        return cls(model.rgb_bank, model.gray_bank, args.triplet, getattr(args, "i2t_logit_scale", None),
                   args.tri_start)

    def active(self) -> set[str]:
        return super().active() | {"i2t", "i2t_gray"}

    def forward(self, outputs: dict, batch: dict[str, Tensor], epoch: int) -> dict[str, Tensor]:
        pids, f = batch["pids"], outputs["f_proj"]
        terms = {"id": self.id_term(outputs, pids),
                 "i2t": self.i2t_loss(text_logits(f, self.rgb_bank, self.i2t_logit_scale), pids),
                 "i2t_gray": self.i2t_loss(text_logits(f, self.gray_bank, self.i2t_logit_scale), pids)}
        if self.triplet_on(epoch):
            terms["tri"] = self.triplet_term(outputs, pids)
        return terms
