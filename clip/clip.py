"""Building CLIP models from state dicts, and loading OpenAI's checkpoints (or a tiny random preset)."""
from __future__ import annotations

import hashlib
import http.client
import logging
import math
import os
import tempfile
import urllib.request
import warnings
import zipfile
from pathlib import Path

import torch
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from .model import CLIP, resize_pos_embed, resnet_grid, vit_grid

__all__ = ["CheckpointError", "MEAN", "STD", "available_models", "build_model", "load", "tiny_state_dict"]

logger = logging.getLogger(__name__)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# OpenAI's release URLs; the second-to-last component is the file's SHA-256.
_MODELS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

# Narrow, shallow members of both families for CPU demos and tests. The text transformer has
# one head: head counts are not in a state dict, so they are inferred as width // 64, as
# OpenAI's build_model does.
_TINY_TEXT = dict(embed_dim=64, context_length=77, vocab_size=49408,
                  transformer_width=64, transformer_heads=1, transformer_layers=2)
_TINY = {
    # layer4 has 8 * 32 = 256 channels; a 2x2 grid at 64x64
    "resnet": dict(image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None,
                   **_TINY_TEXT),
    # 64 wide, 2 layers, one head; a 4x4 grid of 16x16 patches at 64x64
    "vit": dict(image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16, **_TINY_TEXT),
}
_TINY_NAMES = {"tiny": "resnet", "tiny-vit": "vit"}

# Entries of OpenAI's released archives that are not parameters.
_SCALAR_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or not a CLIP state dict."""


def available_models() -> list[str]:
    """Names `load` accepts besides a path: OpenAI's released models and the tiny random presets."""
    return [*_MODELS, *_TINY_NAMES]


def tiny_state_dict(family: str = "resnet", seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """Random weights of the tiny preset ("resnet" or "vit"), with OpenAI's key layout.

    Initialised like OpenAI's models, deterministically for a given seed; the global RNG is left
    as it was. The scalar entries of released archives are not included. `overrides` replace
    constructor arguments (e.g. transformer_width=128 for a wider text encoder).
    """
    if family not in _TINY:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {sorted(_TINY)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**{**_TINY[family], **overrides})
    return model.state_dict()


def _list_keys(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _infer_architecture(state_dict: dict[str, torch.Tensor]) -> tuple[dict, str, int]:
    """CLIP's constructor arguments from the state dict's shapes (OpenAI's rules).

    Returns the arguments (image_resolution set for the square grid the checkpoint was trained
    at), the key of the visual positional embedding, and its number of grid tokens.
    """
    vit = "visual.proj" in state_dict
    if vit:
        width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
        layers = len({k.split(".")[3] for k in state_dict if k.startswith("visual.transformer.resblocks.")})
        pos_key = "visual.positional_embedding"
        stride = patch_size
    else:
        width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        layers = tuple(len({k.split(".")[2] for k in state_dict if k.startswith(f"visual.layer{i}.")})
                       for i in (1, 2, 3, 4))
        patch_size = None
        pos_key = "visual.attnpool.positional_embedding"
        stride = 32
    num_grid = state_dict[pos_key].shape[0] - 1
    transformer_width = state_dict["ln_final.weight"].shape[0]
    config = dict(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=math.isqrt(num_grid) * stride,
        vision_layers=layers,
        vision_width=width,
        vision_patch_size=patch_size,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_heads=transformer_width // 64,
        transformer_layers=len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}),
    )
    return config, pos_key, num_grid


def build_model(state_dict: dict, *, last_stride: int = 2, input_size: tuple[int, int] | None = None,
                patch_stride: int | None = None) -> CLIP:
    """A float32 CLIP in eval mode holding `state_dict`, every size inferred from the shapes.

    Re-ID options (defaults reproduce OpenAI's model):
      last_stride:  1 keeps a ResNet's layer4 at stride 1 (the map doubles per side).
      input_size:   (H, W) of the images; the visual positional embedding is resized bilinearly
                    from the checkpoint's grid to this input's grid (token 0 kept as is).
      patch_stride: a ViT's patch stride; smaller than the patch size gives overlapping patches.
    `model.reid_options` rebuilds an adapted model from its own state dict. Missing or
    unexpected keys and wrong shapes raise CheckpointError.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in _SCALAR_KEYS}
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"not a state dict: entries that are not tensors: {_list_keys(not_tensors)}")
    try:
        config, pos_key, num_grid = _infer_architecture(state_dict)
    except (KeyError, ValueError, IndexError) as exc:
        if not any(k.startswith(("visual.", "transformer.resblocks.")) for k in state_dict):
            problem = f"keys such as {_list_keys(list(state_dict), 3)}"
        elif isinstance(exc, KeyError):
            problem = f"missing {exc}"
        else:
            problem = f"unexpected shapes: {exc}"
        raise CheckpointError(f"not a CLIP state dict ({problem})") from None

    # The token grid the images will give, and the grid the checkpoint's embedding is for.
    if input_size is None:
        input_size = (config["image_resolution"],) * 2
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(f"input_size must be (height, width), got {input_size}")
    if config["vision_patch_size"] is None:
        target = resnet_grid(input_size, last_stride)
    else:
        target = vit_grid(input_size, config["vision_patch_size"], patch_stride)
    side = math.isqrt(num_grid)
    if target[0] * target[1] == num_grid:
        # Already at the target grid: a checkpoint of a model built with these options
        # (non-square grids only arise that way), or a pretrained square grid left as is.
        source = target
    elif side * side == num_grid:
        source = (side, side)  # pretrained grids are square
    else:
        raise CheckpointError(
            f"{pos_key} has {num_grid} grid positions: neither a square grid nor the "
            f"{target[0]}x{target[1]} grid of input_size={input_size}; pass the input_size it was trained with"
        )
    if source != target:
        state_dict[pos_key] = resize_pos_embed(state_dict[pos_key].float(), source, target)
    config["image_resolution"] = input_size

    # Built on the meta device: the random init would be overwritten by the checkpoint anyway.
    with torch.device("meta"):
        model = CLIP(**config, last_stride=last_stride, patch_stride=patch_stride)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} is {tuple(state_dict[k].shape)}, needs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_list_keys(wrong)}")
    if problems:
        raise CheckpointError("; ".join(problems))

    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = torch.zeros_like(v, device="cpu")
    model = model.to_empty(device="cpu")
    model.reset_attention_mask()  # to_empty left the mask buffer uninitialised; no state dict holds it
    model.load_state_dict(state_dict)  # copies, casting float16 weights to float32
    return model.eval()


def _describe_unreadable(path: Path, exc: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (as does TorchScript), or a pickle in its legacy format
    if head != b"PK" and head[:1] != b"\x80":
        return "not a PyTorch checkpoint (unrecognised file format)"
    if "Weights only load failed" in str(exc):
        return "holds Python objects that safe (weights-only) loading refuses; save a plain state dict"
    return "truncated or corrupt checkpoint (its archive cannot be read)"


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _read_state_dict(path: Path) -> dict:
    """The state dict in a TorchScript archive (OpenAI's releases) or a torch.save'd file."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        if _is_torchscript(path):
            # Loading an archive only deserialises; nothing in it runs. torch marks the API
            # deprecated, but OpenAI's checkpoints come in this format.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, KeyError, EOFError...
        raise CheckpointError(f"{path}: {_describe_unreadable(path, exc)}") from None

    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        # training checkpoints wrap the state dict
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds {type(obj).__name__ if obj else 'nothing'}, not a state dict")
    return dict(obj)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path) -> None:
    """Fetch `url` to `target` through a temporary file beside it, checking the SHA-256 in the URL.

    The rename is atomic, so an interrupted download never leaves a partial `target`.
    """
    expected = url.split("/")[-2]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as source:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise CheckpointError(f"{url}: the download's SHA-256 {digest.hexdigest()} is not {expected}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_dir(download_root: str | None) -> Path:
    root = download_root or os.environ.get("CLIP_CACHE_DIR") or Path.home() / ".cache" / "clip"
    return Path(root).expanduser()


def _checkpoint_path(name: str, download_root: str | None) -> Path:
    """The cached file of an OpenAI model, downloaded first if absent."""
    url = _MODELS[name]
    target = _cache_dir(download_root) / url.rsplit("/", 1)[-1]
    if target.is_file():
        if _sha256(target) != url.split("/")[-2]:
            raise CheckpointError(
                f"{target}: SHA-256 differs from OpenAI's {name} release; delete it to download "
                f"again, or pass its path to load it as is"
            )
        return target
    logger.info("downloading %s to %s", url, target)
    try:
        _download(url, target)
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(
            f"cannot download {name} ({reason}); put {target.name} (from {url}) at {target}"
        ) from None
    return target


def _convert_image_to_rgb(image):
    return image.convert("RGB")


def _transform(input_size: tuple[int, int]) -> Compose:
    h, w = input_size
    # square: OpenAI's resize-shorter-side + center crop; otherwise the Re-ID convention of
    # resizing straight to (H, W), which keeps the whole person in the frame
    resize = Resize(h if h == w else (h, w), interpolation=InterpolationMode.BICUBIC)
    return Compose([resize, CenterCrop((h, w)), _convert_image_to_rgb, ToTensor(), Normalize(MEAN, STD)])


def load(name_or_path: str, device: str | torch.device = "cpu", download_root: str | None = None,
         **reid_options) -> tuple[CLIP, Compose]:
    """A float32 CLIP in eval mode on `device`, and the image transform that feeds it.

    `name_or_path` is a name from `available_models()` or the path of a checkpoint (OpenAI's
    TorchScript archive or a plain state dict, optionally wrapped under "state_dict"/"model").
    Named OpenAI models are looked up in `download_root`, else $CLIP_CACHE_DIR, else
    ~/.cache/clip, and downloaded there when absent. `reid_options` go to `build_model`.
    """
    if name_or_path in _TINY_NAMES:
        logger.warning("clip: %r is a tiny RANDOM-WEIGHT model, not pretrained CLIP; "
                       "use it for demos and tests only", name_or_path)
        model = build_model(tiny_state_dict(_TINY_NAMES[name_or_path]), **reid_options)
    else:
        if name_or_path in _MODELS:
            path = _checkpoint_path(name_or_path, download_root)
        else:
            path = Path(name_or_path).expanduser()
            if not path.is_file():
                problem = "is a directory" if path.is_dir() else "no such file"
                names = ", ".join(available_models())
                raise CheckpointError(f"{path}: {problem}, and not a model name (one of {names})")
        state_dict = _read_state_dict(path)
        try:
            model = build_model(state_dict, **reid_options)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    return model.to(device), _transform(model.visual.input_size)
