"""CCAF (methods/ccaf.py), reconstructed from the paper's description: the shielding and clothes views
against the masks they come with, each loss against a literal transcription of METHOD.md section 13's
formula, and the method trained (both stages), evaluated and resumed by the scripts on CPU and on the
CUDA look-alike, with its errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import datasets
import evaluate
import loaders
import masks
import models
import registry
import train_stage1
import train_stage2
import utils
from fake_cuda import fake_cuda
from methods import ccaf

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["--dataset", "synthetic", "--arch", "tiny", "--img-size", "64", "32", "--workers", "0", "--seed", "4",
        "--log-every", "1000"]
STAGE1 = ["--method", "ccaf", "--epochs", "2", "--batch-size", "32", "--warmup-epochs", "1"]
STAGE2 = ["--method", "ccaf", "--epochs", "2", "--batch-size", "16", "--num-instances", "4", "--warmup-epochs", "1",
          "--milestones", "2", "--eval-every", "2", "--cal-start", "1", "--workers", "0", "--log-every", "1000"]


def test_shielding_covers_exactly_the_clothes_pixels(data_root):
    """Per pixel: the shielding image is 0 where the mask says top or bottom and the image elsewhere; the
    clothes view the reverse; on a real training batch, whose masks went through the same transforms."""
    torch.manual_seed(0)
    images, mask = torch.randn(2, 3, 4, 3), torch.randint(0, len(masks.PARTS), (2, 4, 3))
    shielded, clothes = ccaf.shield(images, mask), ccaf.clothes_only(images, mask)
    for b in range(2):
        for i in range(4):
            for j in range(3):
                is_clothes = masks.PARTS[int(mask[b, i, j])] in ("top", "bottom")
                assert torch.equal(shielded[b, :, i, j], torch.zeros(3) if is_clothes else images[b, :, i, j])
                assert torch.equal(clothes[b, :, i, j], images[b, :, i, j] if is_clothes else torch.zeros(3))
    ds = datasets.build_dataset("synthetic", data_root)
    loader = loaders.build_train_loader(ds.train, (64, 32), 8, 2, workers=0, seed=0, masks=masks.mask_source(ds, None))
    x, _, _, _, extras = next(iter(loader))
    on_clothes = ccaf.clothes_pixels(extras["mask"]).expand_as(x)
    assert 0.1 < on_clothes.float().mean() < 0.9  # flipped, padded and cropped with its image
    shielded = ccaf.shield(x, extras["mask"])
    assert (shielded[on_clothes] == 0).all() and torch.equal(shielded[~on_clothes], x[~on_clothes])


def test_stage2_losses_against_their_transcriptions():
    """CCAF-2 (I2I) and CCAF-3 (CFM) of METHOD.md section 13, written out with loops."""
    torch.manual_seed(1)
    f, g = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    i2i = sum(1 - (f[i] @ g[i]) / (f[i].norm() * g[i].norm()) for i in range(5)) / 5
    assert ccaf.i2i_loss(f, g).item() == pytest.approx(float(i2i), rel=1e-6)
    logits = torch.randn(3, 4)
    own = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]])
    expected = 0.0
    for i in range(3):
        z = [math.exp(float(v)) for v in logits[i]]
        mine = [c for c in range(4) if own[i, c]]
        expected -= sum(math.log(z[c] / sum(z)) / len(mine) for c in mine)
    assert ccaf.cfm_loss(logits, own).item() == pytest.approx(expected / 3, rel=1e-5)
    # the encoder's CFM reaches its minimum when the classifier spreads evenly over the identity's outfits
    even = torch.tensor([[2.0, 2.0, -5.0, -5.0]])
    assert ccaf.cfm_loss(even, own[:1]) < ccaf.cfm_loss(torch.tensor([[4.0, 0.0, -5.0, -5.0]]), own[:1])


def test_the_loss_reads_the_right_rows_and_features():
    """CCAFLoss: i2t against F_id's rows only (Eq. 19's label-smoothed CE), CFM on f_proj through the clothes
    classifier that starts at the normalised clothes prompts (z = 16 cos), I2I on (f_raw, f_shield)."""
    torch.manual_seed(5)
    id_bank, clothes_bank = torch.randn(3, 4), torch.randn(5, 4)
    pid2clothes = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]])
    loss = ccaf.CCAFLoss(id_bank, clothes_bank, pid2clothes, triplet=False, cfm_start=0)
    assert torch.allclose(loss.adversary.weight, F.normalize(clothes_bank, dim=1))
    f, pids = torch.randn(4, 4), torch.tensor([0, 2, 1, 2])
    outputs = {"f_proj": f, "logits": [torch.zeros(4, 3)], "f_raw": torch.randn(4, 6), "f_shield": torch.randn(4, 6)}
    terms = loss(outputs, {"pids": pids, "clothes": torch.tensor([1, 3, 2, 4])}, epoch=0)
    i2t = cfm = 0.0
    for i in range(4):
        z = [float(f[i] @ id_bank[c]) for c in range(3)]
        log_p = [v - math.log(sum(math.exp(u) for u in z)) for v in z]
        i2t -= sum((0.9 * (c == int(pids[i])) + 0.1 / 3) * log_p[c] for c in range(3)) / 4
        w = F.normalize(clothes_bank, dim=1)
        z = [16 * float(f[i] @ w[c] / f[i].norm()) for c in range(5)]
        own = [c for c in range(5) if pid2clothes[int(pids[i]), c]]
        cfm -= sum(z[c] - math.log(sum(math.exp(u) for u in z)) for c in own) / len(own) / 4
    assert float(terms["i2t"]) == pytest.approx(i2t, rel=1e-5) and float(terms["cfm"]) == pytest.approx(cfm, rel=1e-5)
    assert float(terms["i2i"]) == pytest.approx(float(ccaf.i2i_loss(outputs["f_raw"], outputs["f_shield"])))


def test_the_shielded_pass_is_a_fixed_target_and_moves_no_statistics():
    config = models.ModelConfig(arch="tiny", img_size=[64, 32], num_classes=3, method="ccaf", use_sim=False)
    model = registry.build_model(config, torch.randn(3 + 5, 64)).train()
    x, mask = torch.randn(4, 3, 64, 32), torch.randint(0, len(masks.PARTS), (4, 64, 32))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    f_shield = model.shielded_feature(ccaf.shield(x, mask))
    assert not f_shield.requires_grad and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    out = model(x, mask=mask)  # the raw pass, in train mode, moves them as any training step does
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(out["f_shield"], model.shielded_feature(ccaf.shield(x, mask)))
    # a shielding image equal to the raw one (no clothes pixels) gives I2I = 0: both passes use batch statistics
    out = model(x, mask=torch.zeros_like(mask))
    assert float(ccaf.i2i_loss(out["f_raw"], out["f_shield"]).detach()) == pytest.approx(0.0, abs=1e-5)


def test_stage1_terms_against_their_transcription():
    """CCAF-1: Eq. 9-10 with the identity prompts on the shielded features and the clothes prompts (clothes
    labels as positives) on the clothes features, transcribed with loops (dot-product similarity)."""
    torch.manual_seed(2)
    clip_model = models.build_clip("tiny", "none", (64, 32))
    prompts = ccaf.CCAFPrompts(clip_model, num_ids=3, num_clothes=5, clothes_of=[[0, 1], [2], [3, 4]])
    labels, clothes = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 4])
    feats = {"shielded": torch.randn(4, 64), "clothes": torch.randn(4, 64)}
    terms = prompts(labels, clothes, feats, 1.0, False)

    def i2t(v, t):
        return -sum(math.log(math.exp(v[i] @ t[i]) / sum(math.exp(v[i] @ t[k]) for k in range(4))) for i in range(4)) / 4

    def t2i(t, v, y):
        total = 0.0
        for i in range(4):
            positives = [p for p in range(4) if y[p] == y[i]]
            total -= sum(math.log(math.exp(v[p] @ t[i]) / sum(math.exp(v[k] @ t[i]) for k in range(4)))
                         for p in positives) / len(positives)
        return total / 4

    with torch.no_grad():
        t_id, t_clo = prompts.text(prompts.id_prompt, labels), prompts.text(prompts.clothes_prompt, clothes)
    v, c, t_id, t_clo = (x.double() for x in (feats["shielded"], feats["clothes"], t_id, t_clo))
    expected = {"i2t": i2t(v, t_id), "t2i": t2i(t_id, v, labels), "clo_i2t": i2t(c, t_clo),
                "clo_t2i": t2i(t_clo, c, clothes)}
    assert {k: float(x.detach()) for k, x in terms.items()} == pytest.approx({k: float(x) for k, x in expected.items()}, rel=1e-4)
    banks = prompts.banks(3)
    assert banks["F_outfit"].shape == (5, 64) and torch.equal(banks["F_clo"][2], banks["F_outfit"][3])
    assert torch.equal(ccaf.CCAFPrompts.stage2_bank(banks), torch.cat([banks["F_id"], banks["F_outfit"]]))


def test_ccaf_trains_evaluates_and_resumes(data_root, tmp_path, monkeypatch):
    base = DATA + ["--root", data_root, "--device", "cpu"]
    assert train_stage1.main(base + STAGE1 + ["--output-dir", str(tmp_path / "s1")]) == 0
    stage1 = torch.load(tmp_path / "s1" / "stage1.pt", map_location="cpu", weights_only=True)
    assert stage1["args"]["method"] == "ccaf" and stage1["args"]["no_sse"] is True
    assert set(stage1["banks"]) == {"F_id", "F_clo", "F_ort", "F_outfit"}
    s2 = STAGE2 + ["--stage1", str(tmp_path / "s1" / "stage1.pt"), "--device", "cpu"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_stage2.main(s2 + ["--output-dir", str(full)]) == 0
    ckpt = torch.load(full / "last.pt", map_location="cpu", weights_only=True)
    ds = datasets.build_dataset("synthetic", data_root)
    assert ckpt["config"]["method"] == "ccaf" and ckpt["config"]["use_sim"] is False
    bank, c = ckpt["model"]["text_bank"], ds.num_train_pids
    assert bank.shape == (c + ds.num_train_clothes, 64)  # stage 1's F_id rows, then its clothes prompts' rows
    assert torch.equal(bank[:c], stage1["banks"]["F_id"]) and torch.equal(bank[c:], stage1["banks"]["F_outfit"])
    records = [json.loads(line) for line in (full / "metrics_stage2.jsonl").read_text().splitlines()]
    assert {"id", "i2t", "i2i", "tri"} <= set(records[0]) and "cfm" not in records[0]
    assert {"cfm", "clo"} <= set(records[1])  # CFM and its classifier's own step from --cal-start
    # the clothes classifier starts from the clothes prompts and is trained: its rows moved
    start = F.normalize(stage1["banks"]["F_outfit"], dim=1)
    trained = ckpt["loss"]["adversary.weight"]
    assert trained.shape == start.shape and not torch.allclose(trained, start)
    assert evaluate.main(["--checkpoint", str(full / "last.pt"), "--workers", "0", "--device", "cpu"]) == 0
    evaluated = json.loads((full / "results.json").read_text())
    assert evaluated["evaluate"]["metrics"] == evaluated["metrics"]
    assert train_stage2.main(["--output-dir", str(full), "--resume"]) == 0  # a finished run: nothing to do
    assert json.loads((full / "results.json").read_text()) == evaluated  # evaluate.py's record and the times kept
    original = train_stage2.training.Run.stopped
    with monkeypatch.context() as m:
        m.setattr(train_stage2.training.Run, "stopped", lambda self: original(self) or True)
        assert train_stage2.main(s2 + ["--output-dir", str(cut)]) == 130
    assert train_stage2.main(["--output-dir", str(cut), "--resume"]) == 0
    resumed = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(resumed["model"][k], v) for k, v in ckpt["model"].items())
    assert all(torch.equal(resumed["loss"][k], v) for k, v in ckpt["loss"].items())


def test_ccaf_on_the_cuda_look_alike(data_root, tmp_path):
    with fake_cuda():
        base = DATA + ["--root", data_root, "--device", "cuda"]
        assert train_stage1.main(base + STAGE1 + ["--output-dir", str(tmp_path), "--epochs", "1"]) == 0
        assert train_stage2.main(STAGE2 + ["--output-dir", str(tmp_path), "--device", "cuda", "--epochs", "1",
                                           "--eval-every", "1", "--cal-start", "0"]) == 0
        assert evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--workers", "0", "--device", "cuda"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics_stage2.jsonl").read_text().splitlines()]
    assert {"i2i", "cfm", "clo"} <= set(records[0])


def test_ccaf_errors(data_root, tmp_path, capsys, monkeypatch):
    base = DATA + ["--root", data_root, "--device", "cpu"]
    for extra, message in ((STAGE1 + ["--ortho", "paper"], "--ortho: SCI's stage-1 options; --method ccaf has no SSE"),
                           (["--masks", str(tmp_path)], "--method sci does not read part masks in stage 1"),
                           (STAGE1 + ["--loss-weight", "sim=2"], "TERM one of i2t, t2i, clo_i2t, clo_t2i"),
                           (["--method", "clipreid", "--clothes-prompt", "outfit", "--ortho", "gram-schmidt"],
                            "--clothes-prompt, --ortho: SCI's stage-1 options; --method clipreid has no SSE")):
        with pytest.raises(SystemExit) as exc:
            train_stage1.parse_args(base + extra)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    with monkeypatch.context() as m:  # a dataset without masks of its own, and no --masks
        m.setattr(train_stage1, "mask_source", lambda dataset, masks_dir: None)
        assert utils.run_cli(train_stage1.main, base + STAGE1 + ["--output-dir", str(tmp_path)]) == 2
    assert "learns its prompts on part masks, and synthetic has none of its own; pass --masks DIR" in \
        capsys.readouterr().err
    # a stage 1 of SCI does not serve CCAF's stage 2, nor CCAF's SCI's
    assert train_stage1.main(base + ["--epochs", "1", "--output-dir", str(tmp_path / "sci")]) == 0
    assert utils.run_cli(train_stage2.main, STAGE2 + ["--stage1", str(tmp_path / "sci" / "stage1.pt"),
                                                      "--output-dir", str(tmp_path / "x")]) == 2
    assert "--method ccaf trains on a stage-1 run of train_stage1.py --method ccaf" in capsys.readouterr().err
    assert train_stage1.main(base + STAGE1 + ["--epochs", "1", "--output-dir", str(tmp_path / "ccaf")]) == 0
    assert utils.run_cli(train_stage2.main, ["--stage1", str(tmp_path / "ccaf" / "stage1.pt"), "--output-dir",
                                             str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert "--method sci trains on a stage-1 run of train_stage1.py --method sci" in capsys.readouterr().err
    assert utils.run_cli(train_stage2.main, STAGE2 + ["--stage1", str(tmp_path / "ccaf" / "stage1.pt"), "--no-cal",
                                                      "--output-dir", str(tmp_path / "z")]) == 2
    assert "--no-cal: method ccaf does not read them" in capsys.readouterr().err
