"""The small CLIP of the synthetic world: CLIP's contrastive loss against a literal transcription, the
cut-context text encoder, a tiny pretraining run, its cache, and the checkpoint read by clip.load and
by every script's --weights."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import clip
import evaluate
import synthetic
from synthetic import pretrain as P
import train_stage1
import train_stage2
from losses import clip_contrastive_loss

TINY_CORPUS = dict(seed=4, people=24, images_per_person=3, held_out=0.25)
TINY_TRAIN = dict(epochs=2, batch_size=16, lr=1e-3, warmup_epochs=1)


def test_clip_contrastive_loss_matches_a_literal_transcription():
    torch.manual_seed(0)
    img, txt = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    scale = 7.0
    # CLIP's pseudo-code, one term at a time
    i = img / img.norm(dim=1, keepdim=True)
    t = txt / txt.norm(dim=1, keepdim=True)
    total = 0.0
    for k in range(5):
        row = [scale * float(i[k] @ t[j]) for j in range(5)]
        col = [scale * float(i[j] @ t[k]) for j in range(5)]
        total += -row[k] + np.log(np.sum(np.exp(row))) - col[k] + np.log(np.sum(np.exp(col)))
    assert clip_contrastive_loss(img, txt, scale).item() == pytest.approx(total / 10, rel=1e-9)


def test_cut_context_text_encoder_equals_the_full_one():
    model = P.build_model(P.PretrainConfig(seed=1))
    captions = ["a person wearing a red top and blue trousers.", "someone with short black hair."]
    full = model.encode_text(clip.tokenize(captions))
    cut = P.tokenize(captions)
    assert cut.shape[1] < 77
    assert torch.allclose(P.encode_text(model, cut), full, atol=1e-5)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    path, meta = P.pretrained_clip(root, synthetic.CorpusConfig(**TINY_CORPUS), P.PretrainConfig(**TINY_TRAIN))
    return root, path, meta


def test_the_pretrained_model_is_the_tiny_preset_with_the_configured_text_encoder():
    """What METHOD.md section 11 says: the image encoder is the arch's preset (so that a stage-2
    checkpoint rebuilds from --arch), the text encoder has the configured width and depth (heads:
    width // 64, OpenAI's rule, which clip.load infers back)."""
    for arch, family in P.FAMILIES.items():
        cfg = P.PretrainConfig(arch=arch, text_width=128, text_layers=3)
        built, preset = P.build_model(cfg).state_dict(), clip.tiny_state_dict(family, seed=0)
        visual = [k for k in preset if k.startswith("visual.")]
        assert [(k, built[k].shape) for k in visual] == [(k, preset[k].shape) for k in visual]
        assert built["ln_final.weight"].shape == (128,) and built["text_projection"].shape == (128, 64)
        assert len({k.split(".")[2] for k in built if k.startswith("transformer.resblocks.")}) == 3
        assert clip.build_model(built).transformer.resblocks[0].attn.num_heads == 2


def test_pretraining_writes_an_openai_format_checkpoint_and_a_report(pretrained):
    root, path, meta = pretrained
    state = torch.load(path, map_location="cpu", weights_only=True)
    reference = P.build_model(P.PretrainConfig(**TINY_TRAIN)).state_dict()
    assert state.keys() == reference.keys()
    assert all(state[k].shape == v.shape for k, v in reference.items())
    assert not torch.equal(state["token_embedding.weight"], clip.tiny_state_dict("resnet", seed=0)["token_embedding.weight"])
    model, transform = clip.load(str(path))  # as RN50.pt is read
    assert model.visual.input_size == (64, 64)
    assert set(meta["zero_shot"]) <= set(synthetic.ATTRIBUTE_VALUES) and "top colour" in meta["zero_shot"]
    for attribute, value in meta["zero_shot"].items():
        assert 0 <= value["accuracy"] <= 100
        # chance: a uniform guess over all of the attribute's prompts, whichever values the held-out people show
        assert value["chance"] == pytest.approx(100 / len(synthetic.zero_shot_prompts(attribute)), abs=0.01)
        assert value["kappa"] == pytest.approx((value["accuracy"] - value["chance"]) / (100 - value["chance"]),
                                               abs=1e-3)
    assert 0 <= meta["retrieval"]["R1"] <= meta["retrieval"]["R5"] <= 100
    # the template test: one prompt per held-out outfit / person; chance = the mean share of the images a hit may be
    _, records = synthetic.load_corpus(Path(root) / synthetic.CORPUS_FOLDER)
    held = [r for r in records if r["split"] == "held_out"]
    for kind, key in (("clothes", lambda r: (r["pid"], r["outfit"])), ("person", lambda r: r["pid"])):
        sizes = Counter(key(r) for r in held).values()
        assert meta["templates"][kind]["chance"] == pytest.approx(100 * np.mean(list(sizes)) / len(held), abs=0.01)
        assert 0 <= meta["templates"][kind]["r1"] <= 100
    assert json.loads(path.with_suffix(".json").read_text())["checkpoint"] == str(path)


def test_the_checkpoint_is_cached_and_rebuilt_when_a_parameter_changes(pretrained, caplog):
    root, path, meta = pretrained
    args = (root, synthetic.CorpusConfig(**TINY_CORPUS))
    again, meta2 = P.pretrained_clip(*args, P.PretrainConfig(**TINY_TRAIN))
    assert again == path and meta2 == meta
    before = path.stat().st_mtime_ns
    # another recipe or seed: its own file beside this one, which stays as it is
    other, _ = P.pretrained_clip(*args, P.PretrainConfig(**{**TINY_TRAIN, "epochs": 1}))
    seeded, _ = P.pretrained_clip(*args, P.PretrainConfig(**{**TINY_TRAIN, "seed": 3}))
    assert len({path, other, seeded}) == 3 and "_seed3" in seeded.name and path.stat().st_mtime_ns == before
    assert P.checkpoint_paths(path.parent, P.PretrainConfig())[0].name == "clip_tiny.pt"  # the defaults: the plain name
    # the same name with other parameters (an older version of the code): retrained in place
    stale = json.loads(path.with_suffix(".json").read_text())
    stale["params"]["version"] = -1
    path.with_suffix(".json").write_text(json.dumps(stale))
    P.pretrained_clip(*args, P.PretrainConfig(**TINY_TRAIN))
    assert any("retraining" in m for m in caplog.messages) and path.stat().st_mtime_ns != before


def test_an_older_report_is_recomputed_from_the_cached_weights(pretrained):
    root, path, _ = pretrained
    args = (root, synthetic.CorpusConfig(**TINY_CORPUS), P.PretrainConfig(**TINY_TRAIN))
    _, meta = P.pretrained_clip(*args)
    old = {**meta, "zero_shot": {a: {"accuracy": v["accuracy"], "chance": 50.0} for a, v in meta["zero_shot"].items()}}
    del old["report_version"]
    path.with_suffix(".json").write_text(json.dumps(old))
    before = path.stat().st_mtime_ns
    _, again = P.pretrained_clip(*args)
    assert path.stat().st_mtime_ns == before  # measured again, not retrained
    assert again["report_version"] == P.REPORT_VERSION and again["zero_shot"] == meta["zero_shot"]


def test_pretraining_is_deterministic_on_cpu():
    images = np.random.default_rng(0).integers(0, 255, (32, 64, 64, 3), dtype=np.uint8)
    captions = [{kind: f"a {kind} with a {c} top." for kind in P.CAPTION_MIX} for c in ("red", "blue", "green", "black")] * 8
    cfg = P.PretrainConfig(epochs=1, batch_size=16)
    a, b = (P.train_clip(images, captions, cfg, torch.device("cpu")).state_dict() for _ in range(2))
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_every_script_reads_the_checkpoint_as_weights(pretrained, data_root, tmp_path):
    _, path, _ = pretrained
    common = ["--dataset", "synthetic", "--root", data_root, "--arch", "tiny", "--weights", str(path),
              "--img-size", "64", "32", "--device", "cpu", "--workers", "0", "--log-every", "1000"]
    assert train_stage1.main(common + ["--output-dir", str(tmp_path), "--epochs", "1", "--warmup-epochs", "1",
                                       "--batch-size", "16"]) == 0
    assert train_stage2.main(common + ["--stage1", str(tmp_path / "stage1.pt"), "--output-dir", str(tmp_path),
                                       "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "1",
                                       "--milestones", "1", "--eval-every", "1"]) == 0
    assert evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"]) == 0
    for stage in ("stage1", "stage2"):  # both stages built the backbone from the file
        assert json.loads((tmp_path / f"args_{stage}.json").read_text())["weights"] == str(path)


def test_bad_settings_are_one_clear_line(tmp_path, capsys):
    assert P.main(["--root", str(tmp_path), "--epochs", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: pretrain: epochs must be >= 1")
