"""CSGN (methods/csgn.py), reconstructed from the paper's description: the grayscale view against PIL's,
MDG's and HSF's terms against literal transcriptions of METHOD.md section 14's formulas, VSS's fusion
(starting as CLIP-ReID), and the method trained (both stages), evaluated and resumed by the scripts on
CPU and on the CUDA look-alike, with its errors (a missing second encoder among them)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import evaluate
import loaders
import models
import registry
import train_stage1
import train_stage2
import utils
from fake_cuda import fake_cuda
from methods import csgn

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["--dataset", "synthetic", "--arch", "tiny", "--img-size", "64", "32", "--workers", "0", "--seed", "4",
        "--log-every", "1000"]
STAGE1 = ["--method", "csgn", "--epochs", "2", "--batch-size", "32", "--warmup-epochs", "1"]
STAGE2 = ["--method", "csgn", "--epochs", "2", "--batch-size", "16", "--num-instances", "4", "--warmup-epochs", "1",
          "--milestones", "2", "--eval-every", "2", "--workers", "0", "--log-every", "1000"]


def test_grayscale_is_pils():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = loaders.build_transforms((64, 32), False, (mean, std))
    mine = csgn.grayscale(transform(img)[None], list(mean), list(std))[0]
    pil = transform(img.convert("L").convert("RGB"))
    assert torch.allclose(mine, pil, atol=0.51 / 255 / min(std))  # PIL rounds L to an integer


def test_stage_terms_against_their_transcriptions():
    """CSGN-1 (MDG: Eq. 9-10 per modality) and CSGN-2 (HSF: label-smoothed CE of f . F^T per bank), with loops."""
    torch.manual_seed(3)
    prompts = csgn.MDGPrompts(models.build_clip("tiny", "none", (64, 32)), num_ids=3)
    labels = torch.tensor([0, 2, 2, 1])
    feats = {"rgb": torch.randn(4, 64), "gray": torch.randn(4, 64)}
    terms = prompts(labels, labels, feats, 2.0, True)  # cosine similarity times 2

    def s(a, b):
        return 2.0 * float(a @ b / (a.norm() * b.norm()))

    def i2t(v, t):
        return -sum(math.log(math.exp(s(v[i], t[i])) / sum(math.exp(s(v[i], t[k])) for k in range(4)))
                    for i in range(4)) / 4

    def t2i(t, v):
        total = 0.0
        for i in range(4):
            pos = [p for p in range(4) if labels[p] == labels[i]]
            total -= sum(math.log(math.exp(s(v[p], t[i])) / sum(math.exp(s(v[k], t[i])) for k in range(4)))
                         for p in pos) / len(pos)
        return total / 4

    with torch.no_grad():
        t_rgb, t_gray = prompts.text(prompts.rgb_prompt, labels), prompts.text(prompts.gray_prompt, labels)
    expected = {"i2t": i2t(feats["rgb"], t_rgb), "t2i": t2i(t_rgb, feats["rgb"]),
                "gray_i2t": i2t(feats["gray"], t_gray), "gray_t2i": t2i(t_gray, feats["gray"])}
    assert {k: float(v.detach()) for k, v in terms.items()} == pytest.approx(expected, rel=1e-4)

    rgb, gray = torch.randn(3, 8), torch.randn(3, 8)
    loss = csgn.CSGNLoss(rgb, gray, triplet=False)
    f, pids = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    outputs = {"f_proj": f, "logits": [torch.zeros(4, 3)]}

    def ce(bank):
        total = 0.0
        for i in range(4):
            z = [float(f[i] @ bank[c]) for c in range(3)]
            log_p = [v - math.log(sum(math.exp(u) for u in z)) for v in z]
            total -= sum((0.9 * (c == int(pids[i])) + 0.1 / 3) * log_p[c] for c in range(3))
        return total / 4

    got = loss(outputs, {"pids": pids}, epoch=0)
    assert float(got["i2t"]) == pytest.approx(ce(rgb), rel=1e-5)
    assert float(got["i2t_gray"]) == pytest.approx(ce(gray), rel=1e-5)


def test_vss_starts_as_clip_reid():
    """Zero fusion weights: the test feature is CLIP-ReID's concat(f_glob, f_proj) of the first encoder."""
    config = models.ModelConfig(arch="tiny", img_size=[64, 32], num_classes=3, method="csgn")
    model = registry.build_model(config, torch.randn(6, 64)).eval()
    assert model.vss.conv1.weight.shape[0] == 64 and hasattr(model.vss, "class_embedding")  # tiny-vit beside tiny
    x = torch.randn(2, 3, 64, 32)
    f_glob, tokens = model.visual(x, return_tokens=True)
    torch.testing.assert_close(model(x), torch.cat([f_glob, tokens[:, 0]], dim=1))
    out = model.train()(x)
    torch.testing.assert_close(out["f_proj"], model.visual(x))  # in training too: f_fuse = f_proj at the start
    assert torch.equal(model.rgb_bank, model.text_bank[:3]) and torch.equal(model.gray_bank, model.text_bank[3:])


def test_csgn_trains_evaluates_and_resumes(data_root, tmp_path, monkeypatch):
    base = DATA + ["--root", data_root, "--device", "cpu"]
    assert train_stage1.main(base + STAGE1 + ["--output-dir", str(tmp_path / "s1")]) == 0
    stage1 = torch.load(tmp_path / "s1" / "stage1.pt", map_location="cpu", weights_only=True)
    assert stage1["args"]["method"] == "csgn" and not torch.equal(stage1["banks"]["F_id"], stage1["banks"]["F_gray"])
    s2 = STAGE2 + ["--stage1", str(tmp_path / "s1" / "stage1.pt"), "--device", "cpu"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_stage2.main(s2 + ["--output-dir", str(full)]) == 0
    ckpt = torch.load(full / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["method"] == "csgn" and ckpt["config"]["vss_arch"] == "tiny-vit"
    assert ckpt["model"]["fuse.weight"].abs().sum() > 0  # the fusion learnt something
    bank, c = ckpt["model"]["text_bank"], ckpt["config"]["num_classes"]  # F_rgb rows, then F_gray rows
    assert torch.equal(bank[:c], stage1["banks"]["F_id"]) and torch.equal(bank[c:], stage1["banks"]["F_gray"])
    records = [json.loads(line) for line in (full / "metrics_stage2.jsonl").read_text().splitlines()]
    assert {"id", "i2t", "i2t_gray", "tri"} <= set(records[-1])
    assert evaluate.main(["--checkpoint", str(full / "last.pt"), "--workers", "0", "--device", "cpu"]) == 0
    evaluated = json.loads((full / "results.json").read_text())
    assert evaluated["evaluate"]["metrics"] == evaluated["metrics"]
    original = train_stage2.training.Run.stopped
    with monkeypatch.context() as m:
        m.setattr(train_stage2.training.Run, "stopped", lambda self: original(self) or True)
        assert train_stage2.main(s2 + ["--output-dir", str(cut)]) == 130
    assert train_stage2.main(["--output-dir", str(cut), "--resume"]) == 0
    resumed = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], v) for k, v in ckpt["model"].items())


def test_csgn_on_the_cuda_look_alike(data_root, tmp_path):
    with fake_cuda():
        assert train_stage1.main(DATA + ["--root", data_root, "--device", "cuda", "--output-dir", str(tmp_path)]
                                 + STAGE1 + ["--epochs", "1"]) == 0
        assert train_stage2.main(STAGE2 + ["--output-dir", str(tmp_path), "--device", "cuda", "--epochs", "1",
                                           "--eval-every", "1"]) == 0
        assert evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--workers", "0", "--device", "cuda"]) == 0


def test_csgn_errors(data_root, tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    torch.save(clip.tiny_state_dict("resnet", seed=1), weights)
    base = DATA + ["--root", data_root, "--device", "cpu"]
    assert train_stage1.main(base + STAGE1 + ["--epochs", "1", "--weights", str(weights),
                                              "--output-dir", str(tmp_path / "s1")]) == 0
    s2 = STAGE2 + ["--stage1", str(tmp_path / "s1" / "stage1.pt"), "--device", "cpu"]
    cases = ((s2, "--method csgn fuses a second image encoder (VSS, --vss-arch tiny-vit) and has no weights for it"),
             (s2 + ["--weights", "none", "--vss-weights", str(weights)], "--weights none builds the whole model at "
                                                                          "random, VSS's encoder too"),
             (s2 + ["--vss-weights", str(weights)], f"--weights {weights} holds a ResNet model but --arch is tiny-vit"),
             (["--stage1", str(tmp_path / "s1" / "stage1.pt"), "--method", "clipreid"],
              "--method clipreid trains on a stage-1 run of train_stage1.py --method sci"))
    for argv, message in cases:
        assert utils.run_cli(train_stage2.main, argv + ["--output-dir", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err, argv
    assert utils.run_cli(train_stage2.main, s2 + ["--vss-arch", "tiny", "--output-dir", str(tmp_path / "z")]) == 2
    assert "--vss-arch tiny: VSS combines a ResNet and a ViT, and --arch tiny is a ResNet too" in capsys.readouterr().err
    assert utils.run_cli(train_stage2.main, ["--method", "bnneck", "--arch", "tiny", "--vss-weights", "none",
                                             "--output-dir", str(tmp_path / "y")]) == 2
    assert "--vss-weights: method bnneck does not read them" in capsys.readouterr().err
