"""CCAF: CLIP-Driven Cloth-Agnostic Feature Learning (Li et al., arXiv 2406.09198), METHOD.md section 13.

RECONSTRUCTED FROM THE PAPER'S DESCRIPTION: no code is public and the text available here gives its
modules in words, not equations. Every choice below is one of ours, listed in METHOD.md section 13 with
the sentence it rests on.

CLIP-ReID's two stages with part masks (masks.py):
  stage 1 (IFP's prompts and CFM's): identity prompts learnt against CLIP's features of *shielded*
    images (the clothes pixels covered), clothes prompts (one per outfit) against the features of the
    clothes pixels alone, each with CLIP-ReID's image-to-text and text-to-image losses;
  stage 2: ID and triplet as CLIP-ReID, I2T (the raw image against the cloth-agnostic prompts), I2I
    (the raw image's feature against its shielded image's), and CFM: a clothes classifier initialised
    from the clothes prompts learns to name each image's outfit (its own step, on detached features)
    while the encoder is trained to spread its prediction over the identity's outfits.
Nothing of it runs at test time: the test feature is CLIP-ReID's.

    python train_stage1.py --method ccaf --dataset prcc --root /data --masks /data/PRCC_parsing
    python train_stage2.py --method ccaf          # reads runs/sci/stage1.pt, made by --method ccaf
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from losses import (LABEL_SMOOTHING, CosineClothesClassifier, CrossEntropyLabelSmooth, IdentityLoss, contrastive_pair,
                    text_logits)
from masks import CLOTHES_PARTS, PARTS
from models import CLOTHES_TEMPLATE, ID_TEMPLATE, PromptLearner, PromptSet, SCIReID

CLOTHES_LABELS = tuple(PARTS.index(p) for p in CLOTHES_PARTS)  # the mask labels a shielding image covers


# ----------------------------------------------------------------------------- the two views

def clothes_pixels(mask: Tensor) -> Tensor:
    """[B, H, W] part labels -> [B, 1, H, W] booleans, True on clothes (masks.CLOTHES_PARTS)."""
    return torch.isin(mask, torch.tensor(CLOTHES_LABELS, device=mask.device))[:, None]


def shield(images: Tensor, mask: Tensor) -> Tensor:
    """IFP's shielding image: the clothes pixels covered. images [B, 3, H, W] (normalised), mask [B, H, W].
    Covered pixels are 0 after normalisation, the normalisation's mean colour (a choice, METHOD.md 13)."""
    return images.masked_fill(clothes_pixels(mask), 0.0)


def clothes_only(images: Tensor, mask: Tensor) -> Tensor:
    """CFM's clothes view: every pixel but the clothes covered, as `shield` covers the clothes."""
    return images.masked_fill(~clothes_pixels(mask), 0.0)


# ----------------------------------------------------------------------------- stage 1

class CCAFPrompts(PromptSet):
    """Stage 1 of CCAF: identity prompts (ID_TEMPLATE, one per identity) learnt on shielded images and
    clothes prompts (CLOTHES_TEMPLATE, one per clothes label) learnt on the clothes pixels alone.
    forward(...) gives the stage-1 terms CCAF-1 of METHOD.md section 13."""

    VIEWS = ("shielded", "clothes")                  # the image features stage 1 caches
    TERMS = ("i2t", "t2i", "clo_i2t", "clo_t2i")     # what --loss-weight accepts
    NEEDS_MASKS = True

    def __init__(self, clip_model: nn.Module, num_ids: int, num_clothes: int, clothes_of: list[list[int]],
                 n_ctx: int = 4):
        super().__init__(clip_model)
        self.id_prompt = PromptLearner(clip_model, num_ids, ID_TEMPLATE, n_ctx)
        self.clothes_prompt = PromptLearner(clip_model, num_clothes, CLOTHES_TEMPLATE, n_ctx)
        self.clothes_of = clothes_of  # clothes_of[y]: identity y's clothes labels (F_clo: the first one)

    @classmethod
    def for_run(cls, clip_model: nn.Module, dataset, args) -> CCAFPrompts:
        pid2clothes = torch.as_tensor(dataset.pid2clothes)
        clothes_of = [row.nonzero().flatten().tolist() for row in pid2clothes]
        return cls(clip_model, dataset.num_train_pids, dataset.num_train_clothes, clothes_of, args.n_ctx)

    @staticmethod
    def views(args) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
        """view name -> (normalised images, part masks) -> the images stage 1 encodes."""
        return {"shielded": shield, "clothes": clothes_only}

    def forward(self, labels: Tensor, clothes: Tensor, feats: dict[str, Tensor], logit_scale: float,
                cosine: bool) -> dict[str, Tensor]:
        """CCAF-1: CLIP-ReID's Eq. 9-10 twice, identity prompts against the shielded images' features and
        clothes prompts against the clothes views' (with the clothes labels as positives)."""
        t_id, t_clo = self.text(self.id_prompt, labels), self.text(self.clothes_prompt, clothes)
        i2t, t2i = contrastive_pair(feats["shielded"], t_id, labels, logit_scale, cosine)
        clo_i2t, clo_t2i = contrastive_pair(feats["clothes"], t_clo, clothes, logit_scale, cosine)
        return {"i2t": i2t, "t2i": t2i, "clo_i2t": clo_i2t, "clo_t2i": clo_t2i}

    @torch.no_grad()
    def banks(self, num_ids: int, batch: int = 64) -> dict[str, Tensor]:
        """F_id (C x D, the cloth-agnostic identity texts; F_ort = F_id, there is no SSE), F_outfit (one row
        per clothes label) and F_clo (each identity's first outfit's row), float32 on the CPU."""
        f_id = self.rows(self.id_prompt, num_ids, batch)
        f_outfit = self.rows(self.clothes_prompt, self.clothes_prompt.ctx.shape[0], batch)
        f_clo = f_outfit[torch.tensor([cs[0] for cs in self.clothes_of])]
        return {"F_id": f_id, "F_clo": f_clo, "F_ort": f_id.clone(), "F_outfit": f_outfit}

    @staticmethod
    def stage2_bank(banks: dict[str, Tensor]) -> Tensor:
        """The rows stage 2 keeps: F_id (C) then F_outfit (one per clothes label), [C + N_clo, D]."""
        return torch.cat([banks["F_id"], banks["F_outfit"]])


# ----------------------------------------------------------------------------- stage 2

class CCAFReID(SCIReID):
    """CLIP-ReID's stage-2 model (SCIReID without SIM) whose training forward also encodes each image's
    shielding image (with `mask`): without gradients and without moving BN statistics, the fixed target of I2I.
    The text bank holds F_id (the first num_classes rows) and the clothes prompts' F_outfit."""

    FLAGS: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config, clip_model: nn.Module, text_bank: Tensor | None) -> CCAFReID:
        return cls(clip_model, config.num_classes, text_bank, use_sim=False, neck_feat=config.neck_feat)

    @property
    def id_bank(self) -> Tensor:
        return self.text_bank[:self.neck_proj.classifier.out_features]  # [C, D]

    @property
    def clothes_bank(self) -> Tensor:
        return self.text_bank[self.neck_proj.classifier.out_features:]  # [N_clo, D]

    def forward(self, images: Tensor, mask: Tensor | None = None):
        out = super().forward(images)
        if not self.training or mask is None:
            return out
        out["f_raw"] = torch.cat([out["f_glob"], out["f_proj"]], dim=1)  # the test feature, [B, feat_dim + D]
        out["f_shield"] = self.shielded_feature(shield(images, mask))
        return out

    @torch.no_grad()
    def shielded_feature(self, images: Tensor) -> Tensor:
        """The test feature of shielded images as the raw images' is computed (train mode: BN on the batch's
        statistics), without gradients, and with every BN running statistic left as it was: the model
        tested is the one trained on raw images."""
        tracking = [m for m in self.visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and m.track_running_stats]
        for m in tracking:  # BN then normalises with the batch's statistics and leaves its running ones alone
            m.track_running_stats = False
        try:
            return torch.cat(self.features(*self.visual(images, return_tokens=True)), dim=1)
        finally:
            for m in tracking:
                m.track_running_stats = True


def i2i_loss(f_raw: Tensor, f_shield: Tensor) -> Tensor:
    """CCAF-2 (I2I): mean_i (1 - cos(f_i, sg(f~_i))), the raw image's feature pulled towards its
    shielding image's (a fixed target). [B, F], [B, F] -> scalar."""
    return (1.0 - F.cosine_similarity(f_raw.float(), f_shield.detach().float(), dim=-1)).mean()


def cfm_loss(logits: Tensor, own_clothes: Tensor) -> Tensor:
    """CCAF-3 (CFM, the encoder's side): -mean_i sum_c q_ic log softmax(z_i)_c with q_i uniform over
    identity y_i's own clothes labels (own_clothes = pid2clothes[y], [B, N_clo]): the clothes classifier
    can no longer tell which of the identity's outfits an image shows. logits [B, N_clo]."""
    q = own_clothes.float() / own_clothes.float().sum(dim=1, keepdim=True)
    return -(q * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


class CCAFLoss(IdentityLoss):
    """CCAF's stage-2 terms: L_id and the triplet (CLIP-ReID's), i2t (Eq. 19's form against F_id), i2i and,
    from --cal-start, cfm. The adversary is the clothes classifier, a cosine classifier (CAL's, scale 16)
    whose rows start as the clothes prompts' features: it learns on detached f_proj with its own optimizer."""

    NAMES = ("id", "i2t", "i2i", "cfm", "tri")
    FLAGS = ("triplet", "tri_start", "cal_start", "clothes_lr")

    def __init__(self, id_bank: Tensor, clothes_bank: Tensor | None = None, pid2clothes: Tensor | None = None,
                 triplet: bool = True, cfm_start: int = 0, i2t_logit_scale: float | None = None, tri_start: int = 0):
        super().__init__(triplet, tri_start)
        self.id_bank = id_bank  # a view of the model's buffer: it moves with the model
        self.i2t_logit_scale = i2t_logit_scale
        self.i2t_loss = CrossEntropyLabelSmooth(LABEL_SMOOTHING)
        if clothes_bank is not None:
            self.adversary = CosineClothesClassifier(clothes_bank.shape[1], clothes_bank.shape[0])
            with torch.no_grad():
                self.adversary.weight.copy_(F.normalize(clothes_bank.float(), dim=1))
            self.register_buffer("pid2clothes", pid2clothes, persistent=False)  # [C, N_clo]
        self.cfm_start = cfm_start

    @classmethod
    def for_run(cls, model: CCAFReID, args, dataset, log) -> CCAFLoss:
        clothes_bank = pid2clothes = None
        if dataset.has_clothes:
            clothes_bank, pid2clothes = model.clothes_bank.clone(), torch.as_tensor(dataset.pid2clothes)
        else:
            log.info("%s has no clothes labels: CCAF's CFM is disabled", args.dataset)
        return cls(model.id_bank, clothes_bank, pid2clothes, args.triplet, args.cal_start,
                   getattr(args, "i2t_logit_scale", None), args.tri_start)

    def active(self) -> set[str]:
        return super().active() | {"i2t", "i2i"} | ({"cfm"} if self.adversary is not None else set())

    def cfm_on(self, epoch: int) -> bool:
        return self.adversary is not None and epoch >= self.cfm_start

    def forward(self, outputs: dict, batch: dict[str, Tensor], epoch: int) -> dict[str, Tensor]:
        pids = batch["pids"]
        if "f_shield" not in outputs:
            raise ValueError("CCAF's I2I term needs the part masks: call the model with mask=")
        terms = {"id": self.id_term(outputs, pids),
                 "i2t": self.i2t_loss(text_logits(outputs["f_proj"], self.id_bank, self.i2t_logit_scale), pids),
                 "i2i": i2i_loss(outputs["f_raw"], outputs["f_shield"])}
        if self.triplet_on(epoch):
            terms["tri"] = self.triplet_term(outputs, pids)
        if self.cfm_on(epoch):
            logits = self.adversary(outputs["f_proj"], detach_weight=True)
            terms["cfm"] = cfm_loss(logits, self.pid2clothes[pids])
        return terms

    def adversary_loss(self, outputs: dict, batch: dict[str, Tensor], epoch: int) -> dict[str, Tensor]:
        """The clothes classifier's own step: cross-entropy on each image's outfit, detached features."""
        if not self.cfm_on(epoch):
            return {}
        return {"clo": F.cross_entropy(self.adversary(outputs["f_proj"].detach()), batch["clothes"])}
