"""Tests of the vendored CLIP: tokenizer ids, OpenAI key layout, checkpoint I/O, Re-ID options.

CPU only, no network. The key/shape tests read OpenAI's state-dict keys and shapes from
tests/reference/ (copied from the released RN50.pt and ViT-B-16.pt's key lists).
"""
from __future__ import annotations

import hashlib
import io
import random
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import clip
from clip.model import CLIP, resize_pos_embed, vit_grid

REFERENCE = Path(__file__).resolve().parent / "reference"

# OpenAI's hyper-parameters (what build_model infers from the released checkpoints)
RN50_CONFIG = dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                   vision_patch_size=None, context_length=77, vocab_size=49408,
                   transformer_width=512, transformer_heads=8, transformer_layers=12)
VIT_B16_CONFIG = dict(RN50_CONFIG, embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=16)
SCALARS = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
           "vocab_size": torch.tensor(49408)}


def random_model(config: dict, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(**config).eval()


# Full-size models are slow to build and run on a CPU: each is built once, and the tests
# below run as few full-size forward passes as they can.
@pytest.fixture(scope="module")
def rn50():
    return random_model(RN50_CONFIG)


@pytest.fixture(scope="module")
def vit_b16():
    return random_model(VIT_B16_CONFIG)


def as_released(state_dict: dict) -> dict:
    """float16 weights plus the scalar entries, like OpenAI's released checkpoints."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    return {**half, **SCALARS}


def save_torchscript(state_dict: dict, path: Path) -> None:
    """A TorchScript archive whose state_dict() is `state_dict` (how OpenAI's releases read)."""
    root = nn.Module()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but is the release format
        torch.jit.save(torch.jit.script(root), str(path))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- tokenizer ---------------------------------------------------------------------------------

# OpenAI's tokenizer ids for these texts (before zero padding)
TOKENIZER_CASES = {
    "A photo of a X X X X person.": [49406, 320, 1125, 539, 320, 343, 343, 343, 343, 2533, 269, 49407],
    "A photo of the X X X X clothes.": [49406, 320, 1125, 539, 518, 343, 343, 343, 343, 7080, 269, 49407],
    "a photo of a person": [49406, 320, 1125, 539, 320, 2533, 49407],
}


@pytest.mark.parametrize("text", list(TOKENIZER_CASES))
def test_tokenize_reference_ids(text):
    ids = TOKENIZER_CASES[text]
    tokens = clip.tokenize(text)
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    assert tokens[0, :len(ids)].tolist() == ids
    assert tokens[0, len(ids):].eq(0).all()


def test_tokenize_batch_and_cleaning():
    tokens = clip.tokenize(["a photo of a person", "  A   PHOTO of a &amp;amp; person "], context_length=20)
    assert tokens.shape == (2, 20)
    amp = clip.SimpleTokenizer().encode("&")
    assert tokens[1, :8].tolist() == [49406, 320, 1125, 539, 320, *amp, 2533, 49407]


def test_tokenize_too_long_raises_and_truncates():
    text = "person " * 100
    with pytest.raises(ValueError, match="77"):
        clip.tokenize(text)
    tokens = clip.tokenize(text, truncate=True)
    assert tokens[0, 0] == 49406 and tokens[0, 76] == 49407
    assert tokens[0].ne(0).all()


def test_decode_round_trip():
    tokenizer = clip.SimpleTokenizer()
    for text in ["a photo of a person", "naïve café 12 ☃"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids).strip() == " ".join(text.split()).replace("12", "1 2")
    assert len(tokenizer.encoder) == 49408


# --- architecture ------------------------------------------------------------------------------

def read_reference(name: str) -> dict[str, tuple[int, ...]]:
    path = REFERENCE / name
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {key: tuple(int(s) for s in shape.strip("()").split(",") if s.strip()) for key, shape, _ in rows}


@pytest.mark.parametrize("family", ["RN50", "ViT-B-16"])
def test_state_dict_matches_openai(family, request):
    model = request.getfixturevalue("rn50" if family == "RN50" else "vit_b16")
    reference = read_reference(f"clip_{family}_state_dict.tsv")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference
    assert model.visual.output_dim == (1024 if family == "RN50" else 512)
    assert model.visual.feature_dim == (2048 if family == "RN50" else 768)


@pytest.mark.parametrize("family", ["RN50", "ViT-B-16"])
def test_released_formats_round_trip(family, request, tmp_path):
    original = request.getfixturevalue("rn50" if family == "RN50" else "vit_b16")
    state_dict = original.state_dict()
    released = as_released(state_dict)
    plain, archive = tmp_path / f"{family}.pth", tmp_path / f"{family}.pt"
    torch.save(released, plain)
    save_torchscript(released, archive)

    from_plain, _ = clip.load(str(plain))
    from_archive, _ = clip.load(str(archive))
    for model in (from_plain, from_archive):
        # every size was inferred right, and the weights are the float16 ones, in float32
        assert model.dtype == torch.float32 and not model.training
        loaded = model.state_dict()
        assert loaded.keys() == state_dict.keys()
        for key, value in released.items():
            if key in loaded:
                assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key

    if family == "RN50":  # full-size forward passes are slow on a CPU: one is enough
        # fp16 weights round at 2^-11 relative; the features follow to ~1e-3
        image = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            assert relative_error(from_archive.encode_image(image), original.encode_image(image)) < 1e-2


def test_forward_logits():
    model, _ = clip.load("tiny")
    image, text = torch.randn(3, 3, 64, 64), clip.tokenize(["a", "b c", "d e f", "g"])
    with torch.no_grad():
        per_image, per_text = model(image, text)
        img = model.encode_image(image)
        txt = model.encode_text(text)
    assert per_image.shape == (3, 4) and torch.equal(per_text, per_image.t())
    cosine = (img / img.norm(dim=1, keepdim=True)) @ (txt / txt.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(per_image, model.logit_scale.exp() * cosine)


def causal_mask(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)


def reference_encode_text(model: CLIP, text: torch.Tensor) -> torch.Tensor:
    """encode_text written out with an explicit causal mask: what the text features must be."""
    x = (model.token_embedding(text) + model.positional_embedding).permute(1, 0, 2)
    mask = causal_mask(model.context_length).to(x.dtype)
    for block in model.transformer.resblocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(len(text)), text.argmax(dim=-1)] @ model.text_projection


def masks_given_to_attention(model: CLIP, text: torch.Tensor) -> list[torch.Tensor]:
    """The attn_mask each text block passes to its attention during encode_text."""
    seen = []
    hooks = [block.attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["attn_mask"]),
                                                  with_kwargs=True) for block in model.transformer.resblocks]
    with torch.no_grad():
        model.encode_text(text)
    for hook in hooks:
        hook.remove()
    return seen


def test_text_mask_is_one_non_persistent_buffer():
    model = clip.build_model(clip.tiny_state_dict("vit"))
    mask = model.transformer.attn_mask
    assert dict(model.named_buffers())["transformer.attn_mask"] is mask  # a buffer: .to() moves it
    assert not any("attn_mask" in k for k in model.state_dict())  # not persistent: OpenAI's keys
    assert model.visual.transformer.attn_mask is None and "visual.transformer.attn_mask" not in dict(model.named_buffers())
    assert torch.equal(mask, causal_mask(77))
    text = clip.tokenize(["a photo of a person", "b"])
    # every block gets the one buffer itself: no per-layer copy, no device transfer in forward
    assert all(m is mask for m in masks_given_to_attention(model, text)) and len(model.transformer.resblocks) == 2

    model.to(torch.float64)  # follows dtype moves
    mask = model.transformer.attn_mask
    assert mask.dtype == torch.float64 and torch.equal(mask, causal_mask(77).double())
    assert all(m is mask for m in masks_given_to_attention(model, text))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(text), reference_encode_text(model, text))
    assert model.to("meta").transformer.attn_mask.device.type == "meta"  # and device moves


def test_build_model_text_features_match_a_direct_model():
    """build_model goes through the meta device and to_empty, which leaves buffers as garbage."""
    state_dict = clip.tiny_state_dict("resnet", seed=5)
    built = clip.build_model(state_dict)
    torch.manual_seed(1)
    direct = CLIP(**clip.clip._TINY["resnet"]).eval()  # other random weights, then the same ones loaded
    direct.load_state_dict(state_dict)
    assert torch.equal(built.transformer.attn_mask, causal_mask(77))
    text = clip.tokenize(["a photo of a person", "a photo of the clothes", "x"])
    with torch.no_grad():
        expected = reference_encode_text(direct, text)
        assert torch.equal(built.encode_text(text), direct.encode_text(text))
        torch.testing.assert_close(built.encode_text(text), expected, rtol=0, atol=0)


# --- re-id options -----------------------------------------------------------------------------

def test_pos_embed_resize():
    pos = torch.randn(1 + 7 * 7, 8)
    assert resize_pos_embed(pos, (7, 7), (7, 7)) is pos
    resized = resize_pos_embed(pos, (7, 7), (24, 12))
    assert resized.shape == (1 + 24 * 12, 8) and torch.equal(resized[0], pos[0])
    flat = torch.ones(1 + 4, 3)  # a constant grid stays constant
    torch.testing.assert_close(resize_pos_embed(flat, (2, 2), (5, 3)), torch.ones(1 + 15, 3))


def test_rn50_reid_tokens(rn50):
    pos_key = "visual.attnpool.positional_embedding"
    pretrained = rn50.state_dict()
    model = clip.build_model(pretrained, last_stride=1, input_size=(384, 192))
    assert model.reid_options == {"last_stride": 1, "input_size": (384, 192), "patch_stride": None}
    assert model.state_dict().keys() == pretrained.keys()  # only the pools went
    assert isinstance(model.visual.layer4[0].avgpool, nn.Identity)
    assert model.state_dict()[pos_key].shape == (1 + 24 * 12, 2048)
    torch.testing.assert_close(model.state_dict()[pos_key][0], pretrained[pos_key][0])

    maps = []
    model.visual.layer4.register_forward_hook(lambda module, args, out: maps.append(out))
    with torch.no_grad():
        global_feat, tokens = model.encode_image(torch.randn(1, 3, 384, 192), return_tokens=True)
        pooled = model.visual.attnpool(maps[0])  # what encode_image returns, without a second pass
    assert maps[0].shape == (1, 2048, 24, 12)
    assert global_feat.shape == (1, 2048) and tokens.shape == (1, 1 + 288, 1024)
    torch.testing.assert_close(global_feat, maps[0].mean(dim=(2, 3)))
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-4, atol=1e-5)


def test_vit_reid_tokens(vit_b16):
    model = clip.build_model(vit_b16.state_dict(), input_size=(384, 192), patch_stride=16)
    assert model.visual.grid_size == (24, 12)
    with torch.no_grad():
        global_feat, tokens = model.encode_image(torch.randn(1, 3, 384, 192), return_tokens=True)
    assert global_feat.shape == (1, 768) and tokens.shape == (1, 1 + 288, 512)
    # token 0 is the plain output: the class token after ln_post, projected
    torch.testing.assert_close(tokens[:, 0], global_feat @ model.visual.proj, rtol=1e-4, atol=1e-5)
    assert vit_grid((384, 192), 16, 12) == (31, 15)


def test_resize_is_identity_at_pretrained_grid():
    state_dict = clip.tiny_state_dict("resnet")
    for family, pos_key, options in [
        ("resnet", "visual.attnpool.positional_embedding", {}),
        ("vit", "visual.positional_embedding", {"patch_stride": 16}),
    ]:
        state_dict = clip.tiny_state_dict(family)
        model = clip.build_model(state_dict, input_size=(64, 64), **options)
        assert torch.equal(model.state_dict()[pos_key], state_dict[pos_key])


def test_tiny_patch_stride_forward():
    model, _ = clip.load("tiny-vit", input_size=(128, 64), patch_stride=12)
    with torch.no_grad():
        global_feat, tokens = model.encode_image(torch.randn(2, 3, 128, 64), return_tokens=True)
    assert global_feat.shape == (2, 64) and tokens.shape == (2, 1 + 10 * 5, 64)


@pytest.mark.parametrize("name,kwargs,feature_dim", [
    ("tiny", dict(last_stride=1), 256),
    ("tiny-vit", dict(), 64),
])
def test_tiny_presets(name, kwargs, feature_dim):
    model, preprocess = clip.load(name, input_size=(128, 64), **kwargs)
    assert model.visual.feature_dim == feature_dim and model.visual.output_dim == 64
    image = preprocess(Image.new("L", (50, 100), color=128))  # grayscale, any size
    assert image.shape == (3, 128, 64)
    images = torch.randn(4, 3, 128, 64)
    with torch.no_grad():
        global_feat, tokens = model.encode_image(images, return_tokens=True)
        pooled = model.encode_image(images)
        text = model.encode_text(clip.tokenize(["a photo of a person"] * 4))
    assert global_feat.shape == (4, feature_dim) and tokens.shape == (4, 1 + 8 * 4, 64)
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-4, atol=1e-5)
    assert text.shape == (4, 64)

    # a different runtime size is an error, not a silent broadcast
    with pytest.raises(ValueError, match="input_size"):
        model.encode_image(torch.randn(1, 3, 256, 128))

    # the stored options rebuild the adapted model from its own state dict
    rebuilt = clip.build_model(model.state_dict(), **model.reid_options)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(images), pooled)


def test_tiny_is_deterministic():
    loaded = clip.load("tiny")[0].state_dict()
    for key, value in clip.tiny_state_dict("resnet").items():
        assert torch.equal(loaded[key], value)
    vit, again = clip.tiny_state_dict("vit"), clip.tiny_state_dict("vit")
    assert all(torch.equal(v, again[k]) for k, v in vit.items())
    assert not torch.equal(vit["visual.proj"], clip.tiny_state_dict("vit", seed=1)["visual.proj"])
    assert "visual.proj" in vit and "visual.attnpool.c_proj.weight" in clip.tiny_state_dict()


def test_option_misuse():
    with pytest.raises(ValueError, match="last_stride"):
        clip.load("tiny-vit", last_stride=1)
    with pytest.raises(ValueError, match="patch_stride"):
        clip.load("tiny", patch_stride=8)
    with pytest.raises(TypeError):
        clip.load("tiny", no_such_option=1)


def test_available_models():
    names = clip.available_models()
    assert {"RN50", "ViT-B/16", "tiny", "tiny-vit"} <= set(names)


# --- checkpoint files --------------------------------------------------------------------------

def test_tiny_checkpoint_formats(tmp_path):
    state_dict = clip.tiny_state_dict("resnet", seed=3)
    expected = clip.build_model(state_dict)
    image, text = torch.randn(1, 3, 64, 64), clip.tokenize(["a photo of a person"])
    no_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    variants = {
        "plain.pt": state_dict,
        "released.pt": as_released(state_dict),
        "wrapped.pth": {"state_dict": state_dict, "epoch": 3},
        "wrapped_model.pth": {"model": no_counters, "args": {"lr": 0.1}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        model, _ = clip.load(str(tmp_path / name))
        with torch.no_grad():
            assert relative_error(model.encode_image(image), expected.encode_image(image)) < 1e-2, name
            assert relative_error(model.encode_text(text), expected.encode_text(text)) < 1e-2, name
    save_torchscript(as_released(state_dict), tmp_path / "archive.pt")
    model, _ = clip.load(str(tmp_path / "archive.pt"))
    assert model.dtype == torch.float32


class Config:
    """A Python object inside a checkpoint, which weights-only loading refuses."""


def write_bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    paths["text"] = tmp_path / "notes.pt"
    paths["text"].write_text("these are not weights\n")
    paths["random"] = tmp_path / "random.pt"
    paths["random"].write_bytes(b"\x07" + random.Random(0).randbytes(4095))  # neither zip nor pickle
    paths["empty"] = tmp_path / "empty.pt"
    paths["empty"].write_bytes(b"")

    state_dict = clip.tiny_state_dict("resnet")
    whole = tmp_path / "whole.pt"
    torch.save(state_dict, whole)
    paths["truncated"] = tmp_path / "truncated.pt"
    paths["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    save_torchscript(as_released(state_dict), tmp_path / "archive.pt")
    paths["truncated_archive"] = tmp_path / "truncated_archive.pt"
    paths["truncated_archive"].write_bytes((tmp_path / "archive.pt").read_bytes()[:5000])

    # torchvision's ResNet naming, without building one
    foreign = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64),
               "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 2048)}
    paths["foreign"] = tmp_path / "resnet50_torchvision.pth"
    torch.save(foreign, paths["foreign"])

    missing = dict(state_dict)
    del missing["transformer.resblocks.1.ln_2.bias"]
    paths["missing"] = tmp_path / "missing_key.pt"
    torch.save(missing, paths["missing"])

    extra = dict(state_dict, **{"visual.extra.weight": torch.zeros(3)})
    paths["unexpected"] = tmp_path / "extra_key.pt"
    torch.save(extra, paths["unexpected"])

    wrong = dict(state_dict, **{"ln_final.bias": torch.zeros(65)})
    paths["shape"] = tmp_path / "wrong_shape.pt"
    torch.save(wrong, paths["shape"])

    paths["objects"] = tmp_path / "objects.pt"
    torch.save({"state_dict": state_dict, "config": Config()}, paths["objects"])

    paths["list"] = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], paths["list"])
    paths["absent"] = tmp_path / "absent.pt"
    return paths


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    return write_bad_checkpoints(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("kind,words", [
    ("text", "not a PyTorch checkpoint"),
    ("random", "not a PyTorch checkpoint"),
    ("empty", "empty"),
    ("truncated", "truncated"),
    ("truncated_archive", "truncated"),
    ("foreign", "not a CLIP state dict"),
    ("missing", "transformer.resblocks.1.ln_2.bias"),
    ("unexpected", "visual.extra.weight"),
    ("shape", "ln_final.bias"),
    ("objects", "weights-only"),
    ("list", "not a state dict"),
    ("absent", "no such file"),
])
def test_bad_checkpoint_raises(bad_checkpoints, kind, words):
    path = bad_checkpoints[kind]
    with pytest.raises(clip.CheckpointError) as info:
        clip.load(str(path))
    message = str(info.value)
    assert path.name in message and words in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


# --- named models: cache, download, offline ----------------------------------------------------

def test_offline_names_the_file_and_folder(tmp_path, monkeypatch):
    def unreachable(url, target):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(clip.clip, "_download", unreachable)
    with pytest.raises(clip.CheckpointError) as info:
        clip.load("RN50", download_root=str(tmp_path))
    message = str(info.value)
    assert "RN50.pt" in message and str(tmp_path / "RN50.pt") in message and "\n" not in message

    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "env"))
    with pytest.raises(clip.CheckpointError, match="ViT-B-16.pt"):
        clip.load("ViT-B/16")
    with pytest.raises(clip.CheckpointError, match=str(tmp_path / "env")):
        clip.load("ViT-B/16")


def test_named_model_from_cache_and_download(tmp_path, monkeypatch):
    payload = io.BytesIO()
    torch.save(clip.tiny_state_dict("resnet"), payload)
    data = payload.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(clip.clip._MODELS, "RN50", f"https://example.invalid/clip/models/{sha}/RN50.pt")

    served = []

    def fake_urlopen(url, timeout=None):
        served.append(url)
        return io.BytesIO(data)

    monkeypatch.setattr(clip.clip.urllib.request, "urlopen", fake_urlopen)
    model, _ = clip.load("RN50", download_root=str(tmp_path))  # downloads
    assert served and (tmp_path / "RN50.pt").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RN50.pt"]  # no temp file left
    clip.load("RN50", download_root=str(tmp_path))  # from the cache
    assert len(served) == 1

    # a corrupted download is rejected and leaves nothing behind
    (tmp_path / "RN50.pt").unlink()
    data = data[:-10]
    with pytest.raises(clip.CheckpointError, match="SHA-256"):
        clip.load("RN50", download_root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []

    # so is a cached file that is not the release
    (tmp_path / "RN50.pt").write_bytes(data)
    with pytest.raises(clip.CheckpointError, match="SHA-256"):
        clip.load("RN50", download_root=str(tmp_path))
