"""Losses of SCI (stage 1: Eq. 6-11; stage 2: Eq. 17-20).

Every loss upcasts float16/bfloat16 inputs to float32 and computes its similarity matmuls
with autocast switched off, so the matmuls, exp and log run in float32 inside an autocast
region too (a float16 Gram matrix overflows once feature norms pass ~256); float32 and
float64 inputs keep their precision. Nothing here picks a device: all tensors are created
on the inputs' device.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    # half types overflow/underflow in exp-sums; float64 is left alone (tests use it)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in at least float32, also inside an autocast region (which would run it in half)."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        return _upcast(a) @ _upcast(b)


def _similarity(a: Tensor, b: Tensor, logit_scale: float | Tensor, cosine: bool) -> Tensor:
    """s(a_i, b_k) for all pairs: [Na, D] x [Nb, D] -> [Na, Nb], at least float32."""
    a, b = _upcast(a), _upcast(b)
    if cosine:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return _matmul(a, b.t()) * logit_scale


# ----------------------------------------------------------------------------------------
# Stage 1: Semantic Separation Enhancement


def image_to_text_loss(image_feats: Tensor, text_feats: Tensor,
                       logit_scale: float | Tensor = 1.0, cosine: bool = False) -> Tensor:
    """Image-to-text contrastive loss, Eq. 9 of SCI.

    L_i2t(i) = -log( exp s(V_i, T_i) / sum_k exp s(V_i, T_k) ), averaged over the batch.
    Row i of `text_feats` is the text paired with image i (F_ort of sample i's identity).
    s is a dot product of the unnormalised features times `logit_scale` (CLIP-ReID's
    convention, scale 1), or cosine similarity times `logit_scale` when `cosine=True`.
    """
    logits = _similarity(image_feats, text_feats, logit_scale, cosine)  # [B, B], row = image
    log_prob = F.log_softmax(logits, dim=1)
    return -log_prob.diagonal().mean()


def text_to_image_loss(text_feats: Tensor, image_feats: Tensor, labels: Tensor,
                       logit_scale: float | Tensor = 1.0, cosine: bool = False) -> Tensor:
    """Multi-positive text-to-image contrastive loss, Eq. 10 of SCI.

    For anchor text T_{y_i} (row i of `text_feats`):
    L_t2i(i) = -1/|P(y_i)| sum_{p in P(y_i)} log( exp s(V_p, T_{y_i}) / sum_k exp s(V_k, T_{y_i}) ),
    P(y_i) = batch positions with label y_i (i included); averaged over anchors i.
    """
    logits = _similarity(text_feats, image_feats, logit_scale, cosine)  # [B, B], row = text
    log_prob = F.log_softmax(logits, dim=1)
    positives = (labels[:, None] == labels[None, :]).to(log_prob.dtype)  # [B, B], diag = 1
    per_anchor = -(positives * log_prob).sum(dim=1) / positives.sum(dim=1)
    return per_anchor.mean()


def contrastive_pair(image_feats: Tensor, text_feats: Tensor, labels: Tensor, logit_scale: float | Tensor = 1.0,
                     cosine: bool = False) -> tuple[Tensor, Tensor]:
    """Eq. 9 and Eq. 10 of one set of prompts against its images: (L_i2t, L_t2i), row i of `text_feats`
    the text of sample i's label (CLIP-ReID's stage-1 pair; CCAF's and CSGN's stage 1 use it per set)."""
    return (image_to_text_loss(image_feats, text_feats, logit_scale, cosine),
            text_to_image_loss(text_feats, image_feats, labels, logit_scale, cosine))


def semantic_similarity_loss(f_ort: Tensor, f_id: Tensor, f_clo: Tensor,
                             lambda_id: float = 1.0, lambda_clo: float = 1.0) -> Tensor:
    """Semantic similarity loss, Eq. 6-8 of SCI.

    sim_id = mean_i cos(F_ort(i), F_id(i)), sim_clo = mean_i cos(F_ort(i), F_clo(i)),
    L_sim = lambda_id * (1 - sim_id) + lambda_clo * sim_clo.
    Inputs are [B, D]; pulls F_ort towards the identity text and away from the clothes text.
    """
    f_ort, f_id, f_clo = _upcast(f_ort), _upcast(f_id), _upcast(f_clo)
    sim_id = F.cosine_similarity(f_ort, f_id, dim=-1).mean()
    sim_clo = F.cosine_similarity(f_ort, f_clo, dim=-1).mean()
    return lambda_id * (1.0 - sim_id) + lambda_clo * sim_clo


def prompt_loss(image_feats: Tensor, f_ort: Tensor, f_id: Tensor | None, f_clo: Tensor | None,
                labels: Tensor, lambda_id: float = 1.0, lambda_clo: float = 1.0,
                use_sim: bool = True, logit_scale: float | Tensor = 1.0,
                cosine: bool = False) -> dict[str, Tensor]:
    """Stage-1 prompt loss, Eq. 11 of SCI: L_prompt = L_i2t + L_t2i + L_sim, as its terms.

    image_feats, f_ort, f_id, f_clo: [B, D], one text row per sample's identity; labels: [B].
    Returns {"i2t", "t2i", "sim"}; total_loss sums them (with --loss-weight's weights). With
    `use_sim=False` (the CLIP-ReID baseline, where f_ort is just F_id) "sim" is a zero tensor and
    f_id / f_clo may be None.
    """
    i2t = image_to_text_loss(image_feats, f_ort, logit_scale, cosine)
    t2i = text_to_image_loss(f_ort, image_feats, labels, logit_scale, cosine)
    if use_sim:
        if f_id is None or f_clo is None:
            raise ValueError("prompt_loss: use_sim=True needs f_id and f_clo")
        sim = semantic_similarity_loss(f_ort, f_id, f_clo, lambda_id, lambda_clo)
    else:
        sim = torch.zeros((), dtype=i2t.dtype, device=i2t.device)
    return {"i2t": i2t, "t2i": t2i, "sim": sim}


# ----------------------------------------------------------------------------------------
# Stage 2: identity, clothes-adversarial and image-to-text losses


def text_logits(image_feats: Tensor, text_bank: Tensor, logit_scale: float | None = None) -> Tensor:
    """The logits of Eq. 19 (L_i2tce): f_proj . F_ort^T, [B, D] x [C, D] -> [B, C], in float32; with a
    `logit_scale`, stage 1's --cosine-sim instead: cos(f_proj, F_ort) times that scale."""
    if logit_scale is None:
        return _matmul(image_feats, text_bank.t())
    return _similarity(image_feats, text_bank, logit_scale, cosine=True)


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy with label smoothing, Eq. 17 (L_id) and Eq. 19 (L_i2tce) of SCI.

    q = (1 - eps) * onehot(y) + eps / C, loss = mean_i sum_c -q_c log p_c.
    For Eq. 19 pass logits = f_proj @ F_ort.T (C identity classes).
    """

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_prob = F.log_softmax(_upcast(logits), dim=1)  # [B, C]
        nll = -log_prob.gather(1, targets[:, None]).squeeze(1)  # [B], the onehot part
        uniform = -log_prob.mean(dim=1)  # [B], the eps/C part summed over classes
        return ((1.0 - self.epsilon) * nll + self.epsilon * uniform).mean()


class CosineClothesClassifier(nn.Module):
    """Cosine clothes classifier of CAL used by Eq. 18 of SCI: scale * cos(f, phi_c).

    logits[B, num_clothes] = scale * normalize(features) @ normalize(weight).T, scale = 1/tau = 16.
    """

    def __init__(self, feat_dim: int, num_clothes: int, scale: float = 16.0):
        super().__init__()
        self.scale = float(scale)
        # random directions with unit-norm rows: only the direction reaches the output, and
        # with Adam's fixed step size the row norm sets how fast directions turn (tiny rows,
        # e.g. std 0.001, would spin a whole radian in a few steps)
        weight = torch.randn(num_clothes, feat_dim)
        self.weight = nn.Parameter(F.normalize(weight, dim=1))  # [num_clothes, feat_dim]

    def forward(self, features: Tensor, detach_weight: bool = False) -> Tensor:
        # detach_weight: the adversarial pass (Eq. 18) trains the backbone only, not the classifier
        weight = self.weight.detach() if detach_weight else self.weight
        f = F.normalize(_upcast(features), dim=1)  # [B, D]
        w = F.normalize(_upcast(weight), dim=1)  # [Nclo, D]
        return self.scale * _matmul(f, w.t())  # [B, Nclo], in [-scale, scale]


class ClothesAdversarialLoss(nn.Module):
    """Clothes-based adversarial loss of CAL (Gu et al., CVPR 2022), Eq. 18 of SCI.

    For sample i and clothes class c:
        log p_c = z_c - log( exp(z_c) + sum_{j in S-} exp(z_j) ),
    S- = clothes classes of other identities (1 - positive_mask). Target
    q = (1 - eps) * onehot(own clothes) + eps * positive_mask / sum(positive_mask), so only
    the identity's own clothes classes contribute; loss = mean_i sum_c -q_c log p_c.
    It pushes the feature to be equally explained by every outfit of its identity, i.e.
    towards clothes-invariance, while staying separable from other identities' clothes.

    Takes logits that are already scaled (CosineClothesClassifier's output, scale * cos), so
    it has no `scale` argument: applying 1/tau here again would square the temperature.
    """

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits: Tensor, clothes_ids: Tensor, positive_mask: Tensor) -> Tensor:
        # logits: [B, Nclo] scaled; clothes_ids: [B]; positive_mask: [B, Nclo] = pid2clothes[pids]
        z = _upcast(logits)
        positive = positive_mask.bool()
        # log sum_{j in S-} exp(z_j), stable; a large finite fill (not -inf) keeps the
        # gradient finite even for a row with no negatives
        fill = torch.finfo(z.dtype).min / 2
        neg_lse = torch.logsumexp(z.masked_fill(positive, fill), dim=1, keepdim=True)  # [B, 1]
        log_prob = z - torch.logaddexp(z, neg_lse)  # [B, Nclo]

        pos = positive.to(z.dtype)
        onehot = F.one_hot(clothes_ids, z.shape[1]).to(z.dtype)
        q = (1.0 - self.epsilon) * onehot + self.epsilon * pos / pos.sum(dim=1, keepdim=True)
        return -(q * log_prob).sum(dim=1).mean()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss with Euclidean distances (CLIP-ReID's, on by default in stage 2 of
    SCI; not one of the paper's equations).

    Per anchor: d_ap = hardest (farthest) positive, d_an = hardest (closest) negative,
    loss = mean_i max(0, d_ap - d_an + margin)  (MarginRankingLoss with y = 1).
    """

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.margin = margin

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        x = _upcast(features)  # [B, D]
        sq = (x * x).sum(dim=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * _matmul(x, x.t())  # [B, B]
        dist = d2.clamp(min=1e-12).sqrt()  # clamp: sqrt'(0) is infinite on the diagonal
        same = labels[:, None] == labels[None, :]
        d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)  # self is a positive
        d_an = dist.masked_fill(same, float("inf")).amin(dim=1)  # inf if no negative -> 0 loss
        return F.relu(d_ap - d_an + self.margin).mean()


def total_loss(terms: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
    """Total loss of a stage, Eq. 20 of SCI (and Eq. 11 in stage 1): sum_k w_k * L_k over the given terms.

    A term missing from `weights` gets weight 1; weights for absent terms are ignored, so a
    disabled loss (e.g. L_cal before --cal-start) is simply left out of `terms`.
    """
    if not terms:
        raise ValueError("total_loss: no loss terms given")
    weights = weights or {}
    return sum(weights.get(name, 1.0) * value for name, value in terms.items())


# ----------------------------------------------------------------------------------------
# The loss terms of a method: modules, so a term with parameters is optimised, moved to the
# device and checkpointed with the model (train_stage2.py). registry.METHODS names each method's.

LABEL_SMOOTHING = 0.1  # epsilon of Eq. 17 and 19
CAL_EPSILON = 0.1      # epsilon of Eq. 18 (CAL's)
TRIPLET_MARGIN = 0.3   # CLIP-ReID's SOLVER.MARGIN


class IdentityLoss(nn.Module):
    """The identity terms every method shares: L_id (Eq. 17) summed over the model's classifiers and
    CLIP-ReID's batch-hard triplet summed over its triplet features. `forward(outputs, batch, epoch)`
    returns the terms by name (NAMES, what --loss-weight accepts); train_stage2.py sums them with
    total_loss (Eq. 20). `adversary` is a sub-module with its own optimizer (None here)."""

    NAMES: tuple[str, ...] = ("id", "tri")
    FLAGS: tuple[str, ...] = ("triplet", "tri_start")  # the method-specific train_stage2.py flags it reads

    def __init__(self, triplet: bool = True, tri_start: int = 0):
        super().__init__()
        self.adversary: nn.Module | None = None
        self.id_loss = CrossEntropyLabelSmooth(LABEL_SMOOTHING)
        self.triplet = TripletLoss(TRIPLET_MARGIN) if triplet else None
        self.tri_start = tri_start  # the triplet from the epoch after this one (counted from 1; CSSC's 35)

    @classmethod
    def for_run(cls, model: nn.Module, args, dataset, log) -> IdentityLoss:
        """The terms of a stage-2 run (its arguments, its dataset)."""
        loss = cls(args.triplet)
        loss.tri_start = args.tri_start  # set here, so that a fork's subclass keeps its __init__(triplet)
        return loss

    def forward(self, outputs: dict, batch: dict[str, Tensor], epoch: int) -> dict[str, Tensor]:
        terms = {"id": self.id_term(outputs, batch["pids"])}
        if self.triplet_on(epoch):
            terms["tri"] = self.triplet_term(outputs, batch["pids"])
        return terms

    def triplet_on(self, epoch: int) -> bool:
        """Whether the triplet term is computed in epoch `epoch` (counted from 0)."""
        return self.triplet is not None and epoch + 1 > self.tri_start

    def main_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the terms' own parameters, those the main optimizer steps: all but the
        adversary's, which has its own optimizer."""
        adversary = set(self.adversary.parameters()) if self.adversary is not None else set()
        return [(n, p) for n, p in self.named_parameters() if p not in adversary]

    def active(self) -> set[str]:
        """The names of the terms this run's forward gives (a weight for another one would do nothing)."""
        return {"id"} | ({"tri"} if self.triplet is not None else set())

    def id_term(self, outputs: dict, pids: Tensor) -> Tensor:
        """Eq. 17 summed over the model's identity classifiers."""
        return sum(self.id_loss(logits, pids) for logits in outputs["logits"])

    def triplet_term(self, outputs: dict, pids: Tensor) -> Tensor:
        """CLIP-ReID's triplet summed over the model's triplet features, weight 1."""
        return sum(self.triplet(f, pids) for f in outputs["triplet_feats"])

    def adversary_loss(self, outputs: dict, batch: dict[str, Tensor], epoch: int) -> dict[str, Tensor]:
        """The adversary's own loss of this step, stepped before `forward` (none here)."""
        return {}


class SCILoss(IdentityLoss):
    """SCI's stage-2 terms (Eq. 17-19 and CLIP-ReID's triplet): L_id, L_i2tce against the fixed text
    bank, the triplet and, from `cal_start`, CAL's adversarial L_cal. The adversary is CAL's cosine
    clothes classifier: it learns first, on detached features, with its own optimizer."""

    NAMES = ("id", "i2t", "cal", "tri")
    FLAGS = ("triplet", "tri_start", "no_cal", "cal_start", "clothes_lr")

    def __init__(self, text_bank: Tensor, triplet: bool = True, clothes_classifier: nn.Module | None = None,
                 pid2clothes: Tensor | None = None, cal_start: int = 0, i2t_logit_scale: float | None = None,
                 tri_start: int = 0):
        super().__init__(triplet, tri_start)
        self.text_bank = text_bank  # the model's buffer, not a copy: it lives (and moves) with the model
        self.i2t_logit_scale = i2t_logit_scale  # None: CLIP-ReID's dot product; else stage 1's cosine scale
        self.i2t_loss = CrossEntropyLabelSmooth(LABEL_SMOOTHING)
        self.cal_loss = ClothesAdversarialLoss(CAL_EPSILON)
        self.adversary = clothes_classifier
        if pid2clothes is not None:
            self.register_buffer("pid2clothes", pid2clothes, persistent=False)  # [C, Nclo], from the data
        self.cal_start = cal_start

    @classmethod
    def for_run(cls, model: nn.Module, args, dataset, log) -> SCILoss:
        clothes_classifier = None
        if not args.no_cal and not dataset.has_clothes:
            log.info("%s has no clothes labels: the clothes-adversarial loss is disabled", args.dataset)
        elif not args.no_cal:
            clothes_classifier = CosineClothesClassifier(model.feature_dim, dataset.num_train_clothes)
        return cls(model.text_bank, args.triplet, clothes_classifier, torch.as_tensor(dataset.pid2clothes),
                   args.cal_start, getattr(args, "i2t_logit_scale", None), args.tri_start)

    def active(self) -> set[str]:
        return super().active() | {"i2t"} | ({"cal"} if self.adversary is not None else set())

    def cal_on(self, epoch: int) -> bool:
        return self.adversary is not None and epoch >= self.cal_start

    def forward(self, outputs: dict, batch: dict[str, Tensor], epoch: int) -> dict[str, Tensor]:
        # computed in this order (the order of autograd's gradient sums): bit for bit as before the registry
        pids = batch["pids"]
        terms = {"id": self.id_term(outputs, pids),                                            # Eq. 17
                 "i2t": self.i2t_loss(text_logits(outputs["f_proj"], self.text_bank, self.i2t_logit_scale),
                                      pids)}  # Eq. 19
        if self.triplet_on(epoch):
            terms["tri"] = self.triplet_term(outputs, pids)
        if self.cal_on(epoch):  # push the backbone to make one identity's clothes indistinguishable (Eq. 18)
            logits = self.adversary(outputs["bn_feat"], detach_weight=True)
            terms["cal"] = self.cal_loss(logits, batch["clothes"], self.pid2clothes[pids])
        return terms

    def adversary_loss(self, outputs: dict, batch: dict[str, Tensor], epoch: int) -> dict[str, Tensor]:
        """CAL's clothes classification on detached features (the classifier's own step)."""
        if not self.cal_on(epoch):
            return {}
        return {"clo": F.cross_entropy(self.adversary(outputs["bn_feat"].detach()), batch["clothes"])}


# ----------------------------------------------------------------------------------------
# Pretraining the small CLIP of the synthetic world (synthetic/pretrain.py; not part of SCI)


def clip_contrastive_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: float | Tensor) -> Tensor:
    """CLIP's symmetric contrastive loss (Radford et al., ICML 2021, Fig. 3), METHOD.md section 11.

    logits = logit_scale * norm(I) norm(T)^T over the batch, [B, B]; image i and text i are the
    positive pair. L = (CE(logits, i) over rows + CE(logits^T, i) over columns) / 2.
    `logit_scale` is the multiplier itself (exp of CLIP's learnt log-temperature).
    """
    logits = _similarity(image_feats, text_feats, logit_scale, cosine=True)  # [B, B], row = image
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
