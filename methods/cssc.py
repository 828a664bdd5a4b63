"""CSSC: Content and Salient Semantics Collaboration (Wang et al., ICASSP 2025), METHOD.md section 12.

A torchvision ResNet-50 (ImageNet weights, last stride 1) whose layer4 splits after layer3 into two
branches over copies of layer4's first two blocks, each block followed by a Semantics Mining and
Refinement module (SMR): branch 1 content (average pooling) then salient (max pooling), branch 2 the
reverse. The branches are summed into layer4's last block, max-pooled into f (2048-d) with a BN neck
and an identity classifier. One stage, RGB images and identity labels only; its loss is
losses.IdentityLoss (label-smoothed CE on the five classifiers, the batch-hard triplet on the five
features from the epoch after --tri-start, 35 in its recipe). The facts (layer order,
widths, initialisation, recipe) are read from the authors' code, QizaoWang/CSSC-CCReID
(model/cssc.py, main.py, train_cssc.py, utils/arguments.py); the code here is ours.

    python train_stage2.py --method cssc --dataset ltcc --root /data            # the authors' recipe
    python train_stage2.py --method cssc --weights none --img-size 128 64       # random init (no file)
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from utils import UserError

FEATURE_DIM = 2048    # layer4's width
PARTS = 8             # SMR's horizontal stripes (model/cssc.py: part_num)
PART_DIM = 256        # each stripe's embedding (part_dim)
REDUCTION = 16        # SMR's refinement bottleneck, 2048 -> 128 -> 2048 (reduction)
# the file torchvision's ResNet50_Weights.IMAGENET1K_V1 downloads (what `pretrained=True` loads, the authors' choice)
IMAGENET_WEIGHTS = "resnet50-0676ba61.pth"


def _neck_bn(dim: int) -> nn.BatchNorm1d:
    """BN without a learnt bias (weight 1, bias 0, frozen): the authors' bottleneck."""
    bn = nn.BatchNorm1d(dim)
    bn.bias.requires_grad_(False)
    return bn


def _classifier(dim: int, num_classes: int) -> nn.Linear:
    """A bias-free identity classifier initialised normal(std 0.001)."""
    layer = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(layer.weight, std=0.001)
    return layer


class SMR(nn.Module):
    """Semantics Mining and Refinement over a [B, 2048, H, W] map, with pooling P (content: average,
    salient: max). Refinement, always: x' = sigmoid(W2 ReLU(W1 P(x) + b1) + b2) * x (channel weights).
    Mining, in training only: P of each of PARTS horizontal stripes through its own Linear(2048 -> 256,
    no bias) + BN, concatenated after BN(P(x)) into a 4,096-d vector for an identity classifier.
    Returns x' (eval) or (x', P(x) [B, 2048], logits [B, classes]) (train)."""

    def __init__(self, pooling: str, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
        self.bn = _neck_bn(FEATURE_DIM)
        self.parts = nn.ModuleList(nn.Sequential(nn.Linear(FEATURE_DIM, PART_DIM, bias=False), nn.BatchNorm1d(PART_DIM))
                                   for _ in range(PARTS))
        self.classifier = _classifier(FEATURE_DIM + PARTS * PART_DIM, num_classes)
        self.refine = nn.Sequential(nn.Linear(FEATURE_DIM, FEATURE_DIM // REDUCTION), nn.ReLU(inplace=True),
                                    nn.Linear(FEATURE_DIM // REDUCTION, FEATURE_DIM), nn.Sigmoid())

    def forward(self, x: torch.Tensor):
        g = self.pool(x).flatten(1)  # [B, 2048]
        refined = self.refine(g)[:, :, None, None] * x  # [B, 2048, H, W]
        if not self.training:
            return refined
        rows = x.shape[2] // PARTS  # the authors' stripes: rows beyond PARTS * rows are left out
        stripes = [part(self.pool(x[:, :, i * rows:(i + 1) * rows]).flatten(1)) for i, part in enumerate(self.parts)]
        return refined, g, self.classifier(torch.cat([self.bn(g), *stripes], dim=1))  # [B, 2048 + 8 * 256] in


def backbone(config, weights: str, seed: int = 0, logger=None) -> torchvision.models.ResNet:
    """registry.Method's backbone hook: CSSC's ResNet-50 (config.arch is resnet50)."""
    return resnet50_backbone(weights, seed, logger)


def resnet50_backbone(weights: str, seed: int = 0, logger=None) -> torchvision.models.ResNet:
    """torchvision's ResNet-50 with last stride 1 (layer4's first block and its shortcut at stride 1).
    `weights`: a file of torchvision's ImageNet weights (IMAGENET_WEIGHTS), the default name looked
    up in torch's hub cache, or "none" (random init, seeded)."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet50()
    if weights != "none":
        net.load_state_dict(torch.load(_weights_file(weights), map_location="cpu", weights_only=True))
    elif logger is not None:
        logger.warning("CSSC: random ResNet-50 weights (--weights none); the authors start from ImageNet")
    net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    return net


def _weights_file(weights: str) -> str:
    if os.path.isfile(weights):
        return weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", IMAGENET_WEIGHTS)
    if weights == IMAGENET_WEIGHTS and os.path.isfile(cached):
        return cached
    raise UserError(f"--weights {weights}: no such file; CSSC starts from torchvision's ImageNet ResNet-50: put "
                    f"https://download.pytorch.org/models/{IMAGENET_WEIGHTS} at {cached} (or pass its path), or "
                    f"use --weights none for random weights")


class CSSCEncoder(nn.Module):
    """CSSC's image encoder: the shared ResNet-50 stem and layer1-3, the two branches over copies of
    layer4's first two blocks with their SMRs, and layer4's last block, shared, then global max pooling.
    [B, 3, H, W] -> f [B, 2048] (eval), or (f, the four SMRs' P(x), their logits) in training."""

    def __init__(self, resnet: torchvision.models.ResNet, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3  # to [B, 1024, H/16, W/16]
        self.block1 = nn.ModuleList([resnet.layer4[0], copy.deepcopy(resnet.layer4[0])])  # branch 1, branch 2
        self.block2 = nn.ModuleList([resnet.layer4[1], copy.deepcopy(resnet.layer4[1])])
        self.smr1 = nn.ModuleList([SMR("avg", num_classes), SMR("max", num_classes)])  # after block 1: content | salient
        self.smr2 = nn.ModuleList([SMR("max", num_classes), SMR("avg", num_classes)])  # after block 2: salient | content
        self.block3 = resnet.layer4[2]  # shared: the last map, [B, 2048, H/16, W/16]

    @property
    def layer4(self) -> nn.Module:
        """The last map's module, where Grad-CAM reads a ResNet (gradcam.py): the shared last block."""
        return self.block3

    def forward(self, images: torch.Tensor):
        x = self.layer3(self.layer2(self.layer1(self.stem(images))))
        if x.shape[2] < PARTS:
            raise UserError(f"CSSC: images of height {images.shape[2]} give maps of {x.shape[2]} rows after layer3, "
                            f"fewer than SMR's {PARTS} stripes; use --img-size with a height of at least {16 * PARTS}")
        branches, feats, logits = [], [], []
        for b in range(2):  # branch 1: content then salient; branch 2: salient then content
            y = self.block1[b](x)
            for smr, block in ((self.smr1[b], self.block2[b]), (self.smr2[b], None)):
                if self.training:
                    y, g, out = smr(y)
                    feats.append(g)
                    logits.append(out)
                else:
                    y = smr(y)
                y = y if block is None else block(y)
            branches.append(y)
        f = F.adaptive_max_pool2d(self.block3(branches[0] + branches[1]), 1).flatten(1)  # [B, 2048]
        return (f, feats, logits) if self.training else f


class CSSCReID(nn.Module):
    """CSSC's model: CSSCEncoder, then BN without a learnt bias and a bias-free identity classifier on f.
    Training returns the five features (the four SMRs' P(x) in the authors' order, branch 1's then
    branch 2's, then f) and their five identity logits; the test feature is f [B, 2048] (before BN)."""

    FLAGS: tuple[str, ...] = ()  # the method-specific train_stage2.py flags it reads

    def __init__(self, resnet: torchvision.models.ResNet, num_classes: int):
        super().__init__()
        self.visual = CSSCEncoder(resnet, num_classes)
        self.bn = _neck_bn(FEATURE_DIM)
        self.classifier = _classifier(FEATURE_DIM, num_classes)
        self.feature_dim = FEATURE_DIM

    @classmethod
    def from_config(cls, config, backbone: torchvision.models.ResNet, text_bank: torch.Tensor | None) -> CSSCReID:
        return cls(backbone, config.num_classes)

    def forward(self, images: torch.Tensor):
        if not self.training:
            return self.visual(images)
        f, feats, logits = self.visual(images)
        bn_feat = self.bn(f)
        return {"f": f, "logits": [*logits, self.classifier(bn_feat)], "triplet_feats": [*feats, f], "bn_feat": bn_feat}
