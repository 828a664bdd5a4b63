"""The models: SCI's text prompts (Eq. 1-3), the text encoder over prompt embeddings, the
orthogonalisation of SSE (Eq. 4-5), the SIM module (Eq. 12-16) and SCI's Re-ID model; a BNNeck
baseline without stage 1; the configuration that rebuilds a trained model (ModelConfig). The method
registry (METHODS) and the rebuild of any method's checkpoint are registry.py's.
Read top to bottom: backbone loading, stage 1 pieces, stage 2 pieces, the model configuration, cost."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import clip
from utils import UserError

ID_TEMPLATE = "A photo of a {} person."       # Eq. 1
CLOTHES_TEMPLATE = "A photo of the {} clothes."  # Eq. 2
PLACEHOLDER = "X"                              # stands for one learnable [X] token

# OpenAI's published hyperparameters, used to build a randomly initialised backbone of the right
# shape (--weights none, or rebuilding a trained model from its checkpoint alone).
ARCH_CONFIGS = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                 transformer_heads=8, transformer_layers=12),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                     transformer_heads=8, transformer_layers=12),
}


# the small presets of clip.tiny_state_dict: --arch name -> family
TINY_FAMILIES = {"tiny": "resnet", "tiny-vit": "vit"}
CLIP_ARCHS = (*ARCH_CONFIGS, *TINY_FAMILIES)  # the --arch values of CLIP's image encoders

# ----------------------------------------------------------------------------- backbone

def reid_options(arch: str, img_size: tuple[int, int], vit_stride: int | None = None) -> dict:
    """The Re-ID adaptations of METHOD.md section 1: last stride 1 (ResNets), positional embeddings
    resized to the input grid, optional overlapping ViT patches."""
    opts: dict = {"input_size": tuple(img_size)}
    if arch in ("RN50", "tiny"):
        opts["last_stride"] = 1
    elif vit_stride is not None:
        opts["patch_stride"] = vit_stride
    return opts


def build_clip(arch: str, weights: str, img_size: tuple[int, int], seed: int = 0,
               vit_stride: int | None = None, logger=None) -> nn.Module:
    """A CLIP model with the Re-ID options, float32 on CPU. `weights`: a path, an OpenAI model name,
    or "none" (random init, loudly logged). The tiny presets take "none" or a checkpoint of their
    family (e.g. synthetic/pretrain.py's), whose sizes are read from its state dict like any other's.
    The caller moves it to its device."""
    opts = reid_options(arch, img_size, vit_stride)
    # random weights: "none", or a tiny preset named by itself (it has no pretrained file); an OpenAI
    # model name (the --weights default for RN50 and ViT-B/16 is the arch name) or a file is pretrained
    random_init = weights == "none" or (arch in TINY_FAMILIES and weights == arch)
    if arch in TINY_FAMILIES and weights in ("none", arch):
        model = clip.build_model(clip.tiny_state_dict(TINY_FAMILIES[arch], seed=seed), **opts)
    elif arch in TINY_FAMILIES and weights in clip.available_models():
        raise UserError(f"--arch {arch} is a small preset: --weights must be none or a checkpoint file of its "
                        f"family (e.g. from synthetic/pretrain.py), not the model name {weights}")
    elif weights == "none":
        torch.manual_seed(seed)
        state = clip.model.CLIP(**ARCH_CONFIGS[arch]).state_dict()
        model = clip.build_model(state, **opts)
    else:
        mismatch = lambda family: UserError(f"--weights {weights} holds a {family} model but --arch is {arch}; "
                                            f"pass weights of the same architecture")
        try:
            model, _ = clip.load(weights, device="cpu", **opts)
        except ValueError as exc:  # a ViT file refuses a ResNet arch's last stride before any family check
            if isinstance(exc, clip.CheckpointError) or "last_stride" not in str(exc):
                raise
            raise mismatch("ViT") from None
        if _family(model) != _family_of_arch(arch):
            raise mismatch(_family(model))
    if random_init and logger is not None:
        logger.warning("WARNING: no pretrained CLIP weights (--weights %s): the %s backbone is RANDOMLY "
                       "initialised; numbers will be far below the paper's", weights, arch)
    return model.float().eval()


def clip_logit_scale(arch: str, weights: str, img_size: tuple[int, int], seed: int = 0) -> float:
    """exp(logit_scale) of the CLIP that `weights` builds: the scale of stage 1's --cosine-sim."""
    return build_clip(arch, weights, tuple(img_size), seed=seed).logit_scale.exp().item()


def _family(model: nn.Module) -> str:
    return "ViT" if hasattr(model.visual, "class_embedding") else "ResNet"


def _family_of_arch(arch: str) -> str:
    return "ViT" if arch.startswith("ViT") or arch == "tiny-vit" else "ResNet"


# ----------------------------------------------------------------------------- stage 1: prompts

class PromptLearner(nn.Module):
    """Eq. 1-3: "A photo of a [X]1 ... [X]M person." with one set of M learnable context vectors
    per training identity, spliced between frozen token embeddings of the template."""

    def __init__(self, clip_model: nn.Module, num_ids: int, template: str, n_ctx: int = 4):
        super().__init__()
        tokens = clip.tokenize(template.format(" ".join([PLACEHOLDER] * n_ctx)))  # [1, 77]
        placeholder_id = clip.tokenize(PLACEHOLDER)[0, 1]
        start = int((tokens[0] == placeholder_id).nonzero()[0])
        tokens = tokens.to(clip_model.token_embedding.weight.device)  # the ids must be where the embedding is
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokens).float()  # [1, 77, W]
        # frozen buffers: start token + "a photo of a", then "person ." + end token + padding
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedding[:, :start], persistent=False)
        self.register_buffer("suffix", embedding[:, start + n_ctx:], persistent=False)
        width = embedding.shape[-1]
        self.ctx = nn.Parameter(torch.randn(num_ids, n_ctx, width) * 0.02)  # C x M x W, N(0, 0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx[labels]                                   # [B, M, W]
        b = ctx.shape[0]
        return torch.cat([self.prefix.expand(b, -1, -1), ctx, self.suffix.expand(b, -1, -1)], dim=1)  # [B, 77, W]


class TextEncoder(nn.Module):
    """CLIP's text transformer applied to prompt embeddings instead of token ids; the feature is
    the end-of-text position after the final layer norm, times text_projection. Sequences shorter
    than the context (L <= 77) give the numbers of the full pass: the mask is causal."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection

    def forward(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = prompts + self.positional_embedding[:prompts.shape[1]].to(prompts.dtype)  # [B, L, W]
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # the transformer is sequence-first
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1).expand(x.shape[0])             # end token has the largest id
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # [B, D]


def orthogonalize(f_id: torch.Tensor, f_clo: torch.Tensor, mode: str = "paper") -> torch.Tensor:
    """Eq. 4-5 of SCI, F_ort = F_id - F_proj, row-wise over [B, D].
    mode "paper": Eq. 4 as printed, F_proj = (<F_clo, F_id> / ||F_id||^2) F_id (a rescaling of F_id by 1 - c).
    mode "gram-schmidt": the prose's reading, F_proj = (<F_id, F_clo> / ||F_clo||^2) F_clo."""
    dot = (f_id * f_clo).sum(dim=-1, keepdim=True)
    if mode == "paper":
        return f_id - dot / f_id.pow(2).sum(dim=-1, keepdim=True) * f_id
    if mode == "gram-schmidt":
        return f_id - dot / f_clo.pow(2).sum(dim=-1, keepdim=True) * f_clo
    raise ValueError(f"unknown orthogonalisation mode {mode!r}; use 'paper' or 'gram-schmidt'")


def match_norm(f_ort: torch.Tensor, f_id: torch.Tensor) -> torch.Tensor:
    """The norm-matched control of Eq. 4-5 (METHOD.md section 11): each F_ort row rescaled to its F_id
    row's norm, so that F_ort differs from F_id in direction only. [B, D], [B, D] -> [B, D]."""
    return f_ort * (f_id.norm(dim=-1, keepdim=True) / f_ort.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def remove_subspace(f_id: torch.Tensor, f_clo: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt against several clothes features (the per-outfit extension of Eq. 4-5, METHOD.md
    section 3): F_ort = F_id - Q Q^T F_id, Q an orthonormal basis of the rows of f_clo.
    f_id [D], f_clo [K, D] -> [D]. With K = 1 it is orthogonalize(..., "gram-schmidt")."""
    q, _ = torch.linalg.qr(f_clo.float().t())  # [D, K], orthonormal columns spanning the outfits
    return (f_id.float() - q @ (q.t() @ f_id.float())).to(f_id.dtype)


class PromptSet(nn.Module):
    """The base of a method's own stage 1 (CCAF's, CSGN's): sets of PromptLearners, declared by the
    subclass, through one frozen text encoder."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.text_encoder = TextEncoder(clip_model).requires_grad_(False)

    def text(self, prompt: PromptLearner, labels: torch.Tensor) -> torch.Tensor:
        """The prompt's text feature of each label, [B, D]: the encoder runs once per distinct label."""
        unique, inverse = labels.unique(return_inverse=True)
        return self.text_encoder(prompt(unique), prompt.tokens)[inverse]

    @torch.no_grad()
    def rows(self, prompt: PromptLearner, n: int, batch: int = 64) -> torch.Tensor:
        """The text features of labels 0..n-1, [n, D], float32 on the CPU (a stage-1 bank)."""
        device = prompt.ctx.device
        return torch.cat([self.text(prompt, torch.arange(s, min(s + batch, n), device=device)).float().cpu()
                          for s in range(0, n, batch)])


class SemanticPrompts(nn.Module):
    """Stage 1 (SSE): identity and clothes prompts through the frozen text encoder, then F_ort.
    With `use_sse=False` it is CLIP-ReID's single identity prompt and F_ort = F_id.

    `clothes_of` switches to one clothes prompt per outfit (an extension beyond the paper, METHOD.md
    section 3): clothes_of[y] lists identity y's clothes labels; F_clo is the prompt of each
    sample's outfit and F_ort removes the span of all of the identity's outfit features."""

    def __init__(self, clip_model: nn.Module, num_ids: int, n_ctx: int = 4, use_sse: bool = True,
                 ortho: str = "paper", clothes_of: list[list[int]] | None = None, norm_matched: bool = False):
        super().__init__()
        self.norm_matched = norm_matched  # a control: F_ort rescaled to |F_id| (match_norm)
        self.text_encoder = TextEncoder(clip_model).requires_grad_(False)
        self.id_prompt = PromptLearner(clip_model, num_ids, ID_TEMPLATE, n_ctx)
        self.clothes_of = clothes_of
        num_clothes = num_ids if clothes_of is None else 1 + max(c for cs in clothes_of for c in cs)
        self.clothes_prompt = PromptLearner(clip_model, num_clothes, CLOTHES_TEMPLATE, n_ctx) if use_sse else None
        self.ortho = ortho

    def forward(self, labels: torch.Tensor, clothes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(F_id, F_clo, F_ort) for each label, each [B, D]; the text encoder runs once per
        distinct identity (or outfit) of the batch. `clothes` ([B] labels) only per outfit: F_clo
        is then each sample's outfit's feature (None: the identity's first outfit's)."""
        ids, inverse = labels.unique(return_inverse=True)
        f_id = self.text_encoder(self.id_prompt(ids), self.id_prompt.tokens)
        if self.clothes_prompt is None:
            return f_id[inverse], None, f_id[inverse]
        if self.clothes_of is None:
            f_clo = self.text_encoder(self.clothes_prompt(ids), self.clothes_prompt.tokens)
            f_ort = self._scaled(orthogonalize(f_id, f_clo, self.ortho), f_id)
            return f_id[inverse], f_clo[inverse], f_ort[inverse]
        outfits = [self.clothes_of[int(y)] for y in ids.tolist()]
        flat = torch.tensor([c for cs in outfits for c in cs], device=labels.device)
        f_outfit = self.text_encoder(self.clothes_prompt(flat), self.clothes_prompt.tokens)  # [sum K_y, D]
        groups = f_outfit.split([len(cs) for cs in outfits])
        f_ort = self._scaled(torch.stack([remove_subspace(f, g) for f, g in zip(f_id, groups)]), f_id)
        if clothes is None:
            f_clo = torch.stack([g[0] for g in groups])[inverse]
        else:
            where = {c: i for i, c in enumerate(flat.tolist())}
            f_clo = f_outfit[torch.tensor([where[int(c)] for c in clothes.tolist()], device=labels.device)]
        return f_id[inverse], f_clo, f_ort[inverse]

    def _scaled(self, f_ort: torch.Tensor, f_id: torch.Tensor) -> torch.Tensor:
        return match_norm(f_ort, f_id) if self.norm_matched else f_ort

    def outfit_features(self, clothes: torch.Tensor) -> torch.Tensor:
        """F_clo of the given clothes labels (per-outfit prompts only), [B, D]."""
        return self.text_encoder(self.clothes_prompt(clothes), self.clothes_prompt.tokens)

    @torch.no_grad()
    def banks(self, num_ids: int, batch: int = 64) -> dict[str, torch.Tensor]:
        """Text-feature banks for all C identities: F_id, F_clo, F_ort, each C x D (float32, CPU).
        Per outfit, F_clo holds each identity's first outfit and F_outfit all outfits' features."""
        out: dict[str, list] = {"F_id": [], "F_clo": [], "F_ort": []}
        device = self.id_prompt.ctx.device
        for start in range(0, num_ids, batch):
            labels = torch.arange(start, min(start + batch, num_ids), device=device)
            f_id, f_clo, f_ort = self(labels)
            out["F_id"].append(f_id.float().cpu())
            out["F_clo"].append((f_clo if f_clo is not None else torch.zeros_like(f_id)).float().cpu())
            out["F_ort"].append(f_ort.float().cpu())
        banks = {k: torch.cat(v) for k, v in out.items()}
        if self.clothes_of is not None and self.clothes_prompt is not None:
            n = self.clothes_prompt.ctx.shape[0]
            banks["F_outfit"] = torch.cat([self.outfit_features(torch.arange(s, min(s + batch, n), device=device))
                                           .float().cpu() for s in range(0, n, batch)])
        return banks


# ----------------------------------------------------------------------------- stage 2: SIM

class NonLocalBlock(nn.Module):
    """Eq. 12-13: F_con = (theta(F) phi(F)^T / N) g(F), F_res = W(F_con) + F. normalization="dot" is
    Eq. 12 as printed; "softmax" is the embedded-Gaussian non-local (the self-attention variant)."""

    def __init__(self, dim: int, normalization: str = "dot"):
        super().__init__()
        inner = dim // 2
        self.theta, self.phi, self.g = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.W = nn.Linear(inner, dim)
        nn.init.zeros_(self.W.weight)  # Decision (METHOD.md section 4): zero W, so the block starts as the identity
        nn.init.zeros_(self.W.bias)
        if normalization not in ("dot", "softmax"):
            raise ValueError(f"unknown non-local normalization {normalization!r}; use 'dot' or 'softmax'")
        self.normalization = normalization

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, D]. `queries` ([B, Q, D], rows of x) computes only those output rows."""
        q = x if queries is None else queries
        affinity = self.theta(q) @ self.phi(x).transpose(1, 2)  # [B, Q, N]
        if self.normalization == "softmax":
            affinity = affinity.softmax(dim=-1)
        else:
            affinity = affinity / x.shape[1]
        return self.W(affinity @ self.g(x)) + q  # [B, Q, D]


class SIM(nn.Module):
    """Semantic-guided Interaction Module, Eq. 12-16: non-local refinement of the image tokens,
    cross-attention from image tokens (queries) to the identity text bank F_ort (keys and values),
    LayerNorm + MLP, and a learnable per-channel gate alpha back onto the input."""

    def __init__(self, dim: int, normalization: str = "dot", mlp_ratio: int = 4):
        super().__init__()
        self.non_local = NonLocalBlock(dim, normalization)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.alpha = nn.Parameter(torch.zeros(dim))  # Decision (METHOD.md section 4): alpha = 0, SIM starts as the identity

    def cross_attention(self, f_res: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Eq. 14: F_out = F_res + softmax(F_res F_ort^T / sqrt(d_k)) F_ort (image queries, text keys/values)."""
        bank = bank.to(f_res.dtype)
        scores = f_res @ bank.t() / math.sqrt(bank.shape[-1])  # [B, N, C]
        return f_res + scores.softmax(dim=-1) @ bank

    def forward(self, f_ori: torch.Tensor, bank: torch.Tensor, first_token_only: bool = False) -> torch.Tensor:
        """f_ori: [B, N, D] -> F_img [B, N, D]. Everything after the non-local block works token by
        token, so `first_token_only` returns exactly F_img[:, :1] at a fraction of the cost."""
        queries = f_ori[:, :1] if first_token_only else f_ori
        f_res = self.non_local(f_ori, queries)        # Eq. 12-13
        f_out = self.cross_attention(f_res, bank)     # Eq. 14
        f_diff = self.mlp(self.norm(f_out))           # Eq. 15
        return queries + self.alpha * f_diff          # Eq. 16


class BNNeck(nn.Module):
    """BatchNorm neck with a frozen zero bias, then a bias-free identity classifier (CLIP-ReID's)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.bn(x)
        return feat, self.classifier(feat)


class SCIReID(nn.Module):
    """Stage-2 model: CLIP image encoder -> (f_glob, token sequence) -> SIM with the fixed text bank
    -> f_proj = token 0. Two BN necks with identity classifiers. The test feature is
    concat(f_glob, f_proj) before BN (or after BN with neck_feat="after"). In training it also
    returns CLIP-ReID's three triplet features (f_mid, f_glob, f_proj)."""

    FLAGS = ("no_sim", "sim_norm")  # the method-specific train_stage2.py flags this model reads

    def __init__(self, clip_model: nn.Module, num_classes: int, text_bank: torch.Tensor, use_sim: bool = True,
                 sim_normalization: str = "dot", neck_feat: str = "before"):
        super().__init__()
        self.visual = clip_model.visual
        self.register_buffer("text_bank", text_bank.float().clone())  # F_ort, C x D, fixed in stage 2
        dim, feat_dim = self.visual.output_dim, self.visual.feature_dim
        self.sim = SIM(dim, sim_normalization) if use_sim else None
        self.neck_glob = BNNeck(feat_dim, num_classes)
        self.neck_proj = BNNeck(dim, num_classes)
        self.neck_feat = neck_feat
        self.feature_dim = feat_dim + dim

    @classmethod
    def from_config(cls, config: ModelConfig, clip_model: nn.Module, text_bank: torch.Tensor | None) -> SCIReID:
        return cls(clip_model, config.num_classes, text_bank, use_sim=config.use_sim,
                   sim_normalization=config.sim_norm, neck_feat=config.neck_feat)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        if not self.training:  # the test feature [B, feat_dim + D]; no classifiers on the inference path
            f_glob, f_proj = self.features(*self.visual(images, return_tokens=True))
            if self.neck_feat == "after":
                return torch.cat([self.neck_glob.bn(f_glob), self.neck_proj.bn(f_proj)], dim=1)
            return torch.cat([f_glob, f_proj], dim=1)
        # f_mid: pooled layer3 map (ResNet) or the class token entering the last block (ViT)
        f_mid, *encoded = self.visual(images, return_tokens=True, return_middle=True)
        f_glob, f_proj = self.features(*encoded)
        bn_glob, logits_glob = self.neck_glob(f_glob)
        bn_proj, logits_proj = self.neck_proj(f_proj)
        return {"f_glob": f_glob, "f_proj": f_proj, "logits": [logits_glob, logits_proj],
                "bn_feat": torch.cat([bn_glob, bn_proj], dim=1),
                "triplet_feats": [f_mid, f_glob, f_proj]}  # CLIP-ReID's three triplet features

    def features(self, f_glob: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_glob [B, feat_dim], tokens [B, 1+HW, D]) of the encoder -> (f_glob, f_proj [B, D])."""
        if self.sim is not None:  # only token 0 of F_img is used: f_proj
            tokens = self.sim(tokens, self.text_bank, first_token_only=True)
        return f_glob, tokens[:, 0]


class BNNeckReID(nn.Module):
    """A method without stage 1: the CLIP image encoder's projected feature f_proj through one BN neck
    and identity classifier, trained with ID + triplet (the "strong baseline" recipe on CLIP). The test
    feature is f_proj before BN (or after, with neck_feat="after")."""

    FLAGS: tuple[str, ...] = ()  # the method-specific train_stage2.py flags this model reads

    def __init__(self, clip_model: nn.Module, num_classes: int, neck_feat: str = "before"):
        super().__init__()
        self.visual = clip_model.visual
        self.neck = BNNeck(self.visual.output_dim, num_classes)
        self.neck_feat = neck_feat
        self.feature_dim = self.visual.output_dim

    @classmethod
    def from_config(cls, config: ModelConfig, clip_model: nn.Module, text_bank: torch.Tensor | None) -> BNNeckReID:
        return cls(clip_model, config.num_classes, config.neck_feat)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        f_proj = self.visual(images)  # [B, D], token 0 of the projected sequence
        bn_feat, logits = self.neck(f_proj)
        if not self.training:
            return bn_feat if self.neck_feat == "after" else f_proj
        return {"f_proj": f_proj, "logits": [logits], "bn_feat": bn_feat, "triplet_feats": [f_proj]}


# ----------------------------------------------------------------------------- the model configuration

@dataclass
class ModelConfig:
    """Everything that rebuilds a trained model and its test-time preprocessing; stored in
    checkpoints as the dict `config`, so evaluate.py and forks rebuild a model from these fields."""
    arch: str                      # RN50, ViT-B/16, tiny or tiny-vit
    img_size: list[int]            # [H, W] the model was trained at
    num_classes: int               # training identities (the classifiers' width)
    method: str = "sci"            # a key of METHODS
    vit_stride: int | None = None  # ViT patch stride (None: the patch size)
    use_sim: bool = True           # SCI: False is the --no-sim ablation
    sim_norm: str = "dot"          # SCI: non-local affinity of Eq. 12, dot or softmax
    neck_feat: str = "before"      # test feature before or after the BN necks
    vss_arch: str | None = None    # CSGN: the second image encoder's arch (None: the other family of `arch`)
    vss_weights: str | None = None  # CSGN: the file it was trained from (a record; a checkpoint rebuilds without it)
    pixel_mean: list[float] = field(default_factory=lambda: list(clip.MEAN))
    pixel_std: list[float] = field(default_factory=lambda: list(clip.STD))

    @classmethod
    def from_run(cls, args: dict, num_classes: int) -> ModelConfig:
        """The configuration of a stage-2 run's arguments."""
        return cls(arch=args["arch"], img_size=list(args["img_size"]), num_classes=num_classes,
                   method=args.get("method", "sci"), vit_stride=args.get("vit_stride"),
                   use_sim=not args.get("no_sim", False), sim_norm=args.get("sim_norm", "dot"),
                   neck_feat=args["neck_feat"], vss_arch=args.get("vss_arch"), vss_weights=args.get("vss_weights"),
                   pixel_mean=list(args.get("pixel_mean", clip.MEAN)),
                   pixel_std=list(args.get("pixel_std", clip.STD)))


# ----------------------------------------------------------------------------- cost (Table IV)

def inference_cost(model: nn.Module, img_size: tuple[int, int]) -> tuple[float, float]:
    """(parameters in millions, GFLOPs) of one image through the inference path; one multiply-add
    counts as two FLOPs, as torch's FlopCounterMode reports (the paper's convention is not stated)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for name, p in model.named_parameters() if "classifier" not in name) / 1e6
    was_training = model.training
    x = torch.zeros(1, 3, *img_size, device=next(model.parameters()).device)
    # the math backend: the counter has no formula for the fused CPU attention kernels (it would count 0)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    model.train(was_training)
    return params, counter.get_total_flops() / 1e9
