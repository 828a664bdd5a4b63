"""CLIP's image and text encoders, with OpenAI's parameter names and shapes.

Re-ID additions, all off by default so that the plain model computes what OpenAI's does:
ResNet last stride 1, token grids for non-square inputs, overlapping ViT patches, and image
encoders that can return the whole projected token sequence besides the pooled feature.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resnet_grid(input_size: int | tuple[int, int], last_stride: int = 2) -> tuple[int, int]:
    """Size (h, w) of ModifiedResNet's layer4 map for an input of `input_size` (H, W)."""
    def side(n: int) -> int:
        n = (n + 1) // 2  # stem conv1: 3x3, stride 2, padding 1
        n //= 2 * 2 * 2  # stem avgpool, then the stride-2 pools of layer2 and layer3
        return n // last_stride  # layer4
    h, w = _pair(input_size)
    return side(h), side(w)


def vit_grid(input_size: int | tuple[int, int], patch_size: int, stride: int | None = None) -> tuple[int, int]:
    """Patch grid (h, w) of a ViT whose unpadded patch conv has `patch_size` and `stride`."""
    stride = stride or patch_size
    h, w = _pair(input_size)
    return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def resize_pos_embed(pos: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a [1 + h*w, C] positional embedding from one token grid to another.

    Token 0 (the class token of a ViT, the mean token of the attention pool) is not on the
    grid and keeps its embedding.
    """
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return pos
    first, grid = pos[:1], pos[1:]
    grid = grid.float().reshape(1, *src_grid, -1).permute(0, 3, 1, 2)  # [1, C, h, w]
    grid = F.interpolate(grid, size=dst_grid, mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(dst_grid[0] * dst_grid[1], -1)  # [h'*w', C]
    return torch.cat([first, grid.to(pos.dtype)])


def _check_grid(actual: tuple[int, int], expected: tuple[int, int], image: torch.Tensor,
                input_size: tuple[int, int]) -> None:
    # A wrong grid would otherwise either fail deep inside with a shape error or, where one
    # side is 1, broadcast the positional embedding silently.
    if tuple(actual) != tuple(expected):
        h, w = image.shape[-2:]
        raise ValueError(
            f"image of {h}x{w} gives a {actual[0]}x{actual[1]} token grid, but the positional "
            f"embedding is for {expected[0]}x{expected[1]} (input_size={input_size}); resize the "
            f"images or rebuild the model with input_size=({h}, {w})"
        )


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # All convs have stride 1. Downsampling is an avgpool before the last conv (and before
        # the shortcut's conv): anti-aliased, unlike a strided conv.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)

        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)

        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()

        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)

        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # the pool is named "-1" so that the conv and norm keep OpenAI's names "0" and "1"
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Pools a feature map with one multi-head attention layer: the mean token queries all tokens."""

    def __init__(self, grid_size: int | tuple[int, int], embed_dim: int, num_heads: int,
                 output_dim: int | None = None):
        super().__init__()
        self.grid_size = _pair(grid_size)
        num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        self.positional_embedding = nn.Parameter(torch.randn(num_tokens, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, heads, N, C/heads]

    def forward(self, x: torch.Tensor, return_tokens: bool = False) -> torch.Tensor:
        """[B, C, H, W] -> [B, D], or with `return_tokens` [B, 1 + H*W, D] (token 0 = the pooled one)."""
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+HW, C]
        x = x + self.positional_embedding.to(x.dtype)
        # Every query attends independently, so querying with all tokens leaves token 0 as is.
        query = x if return_tokens else x[:, :1]
        out = F.scaled_dot_product_attention(
            self._split_heads(self.q_proj(query)),
            self._split_heads(self.k_proj(x)),
            self._split_heads(self.v_proj(x)),
        )  # [B, heads, Nq, C/heads]
        out = self.c_proj(out.transpose(1, 2).flatten(2))  # [B, Nq, D]
        return out if return_tokens else out[:, 0]


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, avgpool downsampling and an attention-pool head.

    `last_stride=1` keeps layer4 at the resolution of layer3 (Re-ID practice); the parameters
    are the same, only the pools of layer4's first block go.
    """

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int,
                 input_resolution: int | tuple[int, int] = 224, width: int = 64, last_stride: int = 2):
        super().__init__()
        self.output_dim = output_dim
        self.input_size = _pair(input_resolution)
        self.input_resolution = self.input_size[0] if self.input_size[0] == self.input_size[1] else self.input_size
        self.last_stride = last_stride
        self.feature_dim = width * 32  # layer4's channels

        # stem: three 3x3 convs instead of one 7x7, then an avgpool instead of a maxpool
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width  # mutated by _make_layer
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=last_stride)

        self.grid_size = resnet_grid(self.input_size, last_stride)
        self.attnpool = AttentionPool2d(self.grid_size, self.feature_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, return_tokens: bool = False, return_middle: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """[B, 3, H, W] -> [B, D]; with `return_tokens`: ([B, width*32] pooled map, [B, 1+h*w, D]),
        and with `return_middle` also the pooled layer3 map [B, width*16] in front (CLIP-ReID's
        triplet feature before the last stage)."""
        _check_grid(resnet_grid(x.shape[-2:], self.last_stride), self.grid_size, x, self.input_size)
        x = x.type(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)  # [B, width, H/4, W/4]
        x = self.layer1(x)
        x = self.layer2(x)
        middle = self.layer3(x)  # [B, width*16, 2h/last_stride, 2w/last_stride]
        x = self.layer4(middle)  # [B, width*32, h, w]
        if not return_tokens:
            return self.attnpool(x)
        out = (x.mean(dim=(2, 3)), self.attnpool(x, return_tokens=True))
        return (middle.mean(dim=(2, 3)), *out) if return_middle else out


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (fp16 statistics lose too much), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            # autocast can hand float16 activations to a float32 mask; a no-op when dtypes match
            attn_mask = attn_mask.to(dtype=x.dtype)
        return self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[L, B, C] -> [L, B, C] (sequence first, like nn.MultiheadAttention's default)."""
        x = x + self.attention(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        # One mask for all blocks, as a buffer so that .to() moves and casts it with the weights;
        # not persistent, so the state dict keeps OpenAI's keys (None: no mask, e.g. the ViT).
        self.register_buffer("attn_mask", attn_mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a causal mask cut to the sequence: text shorter than the context (synthetic/pretrain.py's) runs too
        mask, n = self.attn_mask, x.shape[0]
        if mask is not None and n < mask.shape[0]:
            mask = mask[:n, :n]
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTransformer(nn.Module):
    """ViT: patch conv, class token, pre/post LayerNorm, projection of the class token.

    `patch_stride` < `patch_size` gives overlapping patches (Re-ID practice); the weights are
    the same, only the conv's stride and the number of positions change.
    """

    def __init__(self, input_resolution: int | tuple[int, int], patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int, patch_stride: int | None = None):
        super().__init__()
        self.input_size = _pair(input_resolution)
        self.input_resolution = self.input_size[0] if self.input_size[0] == self.input_size[1] else self.input_size
        self.patch_size = patch_size
        self.patch_stride = patch_stride or patch_size
        self.output_dim = output_dim
        self.feature_dim = width
        self.grid_size = vit_grid(self.input_size, patch_size, self.patch_stride)
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=self.patch_stride, bias=False)

        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.ln_pre = LayerNorm(width)

        self.transformer = Transformer(width, layers, heads)

        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor, return_tokens: bool = False, return_middle: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """[B, 3, H, W] -> [B, D]; with `return_tokens`: ([B, width] class token, [B, 1+h*w, D]),
        and with `return_middle` also the class token entering the last block [B, width] in front
        (CLIP-ReID's triplet feature before the last block, without ln_post)."""
        _check_grid(vit_grid(x.shape[-2:], self.patch_size, self.patch_stride), self.grid_size, x, self.input_size)
        x = self.conv1(x)  # [B, width, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1+h*w, width]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)

        x = x.transpose(0, 1)  # the transformer is sequence-first: [1+h*w, B, width]
        *blocks, last = self.transformer.resblocks
        for block in blocks:
            x = block(x, self.transformer.attn_mask)
        middle = x[0]  # [B, width], the class token entering the last block
        x = last(x, self.transformer.attn_mask).transpose(0, 1)  # [B, 1+h*w, width]

        if not return_tokens:
            return self.ln_post(x[:, 0]) @ self.proj
        x = self.ln_post(x)
        return (middle, x[:, 0], x @ self.proj) if return_middle else (x[:, 0], x @ self.proj)


class CLIP(nn.Module):
    def __init__(self,
                 embed_dim: int,
                 # vision
                 image_resolution: int | tuple[int, int],
                 vision_layers: tuple[int, int, int, int] | int,
                 vision_width: int,
                 vision_patch_size: int | None,
                 # text
                 context_length: int,
                 vocab_size: int,
                 transformer_width: int,
                 transformer_heads: int,
                 transformer_layers: int,
                 # re-id adaptations
                 last_stride: int = 2,
                 patch_stride: int | None = None,
                 ):
        super().__init__()
        self.context_length = context_length

        resnet = isinstance(vision_layers, (tuple, list))
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        if not resnet and last_stride != 2:
            raise ValueError("last_stride applies to ResNet backbones only; a ViT takes patch_stride")
        if resnet and patch_stride is not None:
            raise ValueError("patch_stride applies to ViT backbones only; a ResNet takes last_stride")

        if resnet:
            self.visual = ModifiedResNet(
                layers=tuple(vision_layers),
                output_dim=embed_dim,
                heads=vision_width * 32 // 64,  # 64-wide heads over layer4's channels
                input_resolution=image_resolution,
                width=vision_width,
                last_stride=last_stride,
            )
        else:
            self.visual = VisionTransformer(
                input_resolution=image_resolution,
                patch_size=vision_patch_size,
                width=vision_width,
                layers=vision_layers,
                heads=vision_width // 64,
                output_dim=embed_dim,
                patch_stride=patch_stride,
            )
        if min(self.visual.grid_size) < 1:
            raise ValueError(f"input size {self.visual.input_size} is too small for this backbone")

        self.transformer = Transformer(
            width=transformer_width,
            layers=transformer_layers,
            heads=transformer_heads,
            attn_mask=self.build_attention_mask(),
        )

        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)

        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

        # what build_model needs, besides the state dict, to rebuild this exact model
        self.reid_options = {
            "last_stride": last_stride,
            "input_size": self.visual.input_size,
            "patch_stride": patch_stride,
        }
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=std)
            # zero-init each residual branch's last BN: every block starts as the identity
            for layer in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in layer.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)

        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5  # residual outputs shrink with depth
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def build_attention_mask(self) -> torch.Tensor:
        """Causal mask: -inf above the diagonal (made on the default device, like the weights)."""
        mask = torch.full((self.context_length, self.context_length), float("-inf"))
        return mask.triu_(1)

    def reset_attention_mask(self) -> None:
        """Refill the text transformer's mask buffer in place (its device and dtype kept).

        Needed after `to_empty` (a model built on the meta device): the buffer is not in the
        state dict, so `load_state_dict` does not restore it.
        """
        mask = self.transformer.attn_mask
        mask.copy_(self.build_attention_mask().to(mask.device))

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor,
                     return_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> [B, D]; with `return_tokens`: (global feature, [B, 1+h*w, D] tokens).

        The global feature is the average-pooled layer4 map (ResNet, width*32 channels) or the
        class token after ln_post (ViT, width); token 0 equals the plain output.
        """
        return self.visual(image.type(self.dtype), return_tokens=return_tokens)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, context_length] token ids -> [B, D]."""
        x = self.token_embedding(text).type(self.dtype)  # [B, L, width]
        x = x + self.positional_embedding.type(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # sequence-first inside
        x = self.ln_final(x).type(self.dtype)
        # the end-of-text token has the largest id, so argmax finds its position
        return x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)

        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)

        # cosine similarity as logits, [B_image, B_text] and its transpose
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()
