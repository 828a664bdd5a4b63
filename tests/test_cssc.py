"""CSSC (methods/cssc.py): the authors' model facts (shapes, parameter counts, last stride, the SMR
order), SMR against its description, the recipe's pieces (zero-filled erasing, the epoch count of
its schedule, the triplet from --tri-start), and the method trained, evaluated and resumed by the
training scripts on CPU and on the CUDA look-alike. Images are 128 x 8 here: SMR's eight stripes
need a height of 128, and a narrow width keeps ResNet-50 fast on the test machine."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchvision

import config
import evaluate
import loaders
import models
import registry
import train_stage1
import train_stage2
import utils
from fake_cuda import fake_cuda
from methods import cssc

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (128, 8)
COMMON = ["--method", "cssc", "--dataset", "synthetic", "--weights", "none", "--img-size", *map(str, SIZE),
          "--workers", "0", "--seed", "3", "--log-every", "1000", "--epochs", "2", "--batch-size", "8",
          "--num-instances", "4", "--warmup-epochs", "1", "--milestones", "2", "--eval-every", "2", "--tri-start", "1"]

# The authors' model (model/cssc.py), counted by hand from its layers: torchvision's ResNet-50 without
# fc has 23,508,032 parameters; the copies of layer4's first two blocks add 6,039,552 + 4,462,592; each
# SMR has BN(2048) 4,096, eight Linear(2048, 256) + BN(256) 8 x 524,800 and the refinement
# 2048 x 128 + 128 + 128 x 2048 + 2048 = 526,464, plus a 4,096-wide classifier; the neck is BN(2048)
# and a 2,048-wide classifier.
RESNET50_WITHOUT_FC, LAYER4_BLOCK1, LAYER4_BLOCK2 = 23_508_032, 6_039_552, 4_462_592
SMR_WITHOUT_CLASSIFIER = 4_096 + 8 * 524_800 + 526_464


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model(num_classes: int = 5) -> cssc.CSSCReID:
    return cssc.CSSCReID(cssc.resnet50_backbone("none"), num_classes)


def test_the_authors_model_facts():
    net, classes = model(5), 5
    resnet = torchvision.models.resnet50()
    assert count(resnet) - count(resnet.fc) == RESNET50_WITHOUT_FC
    assert (count(resnet.layer4[0]), count(resnet.layer4[1])) == (LAYER4_BLOCK1, LAYER4_BLOCK2)
    smr = net.visual.smr1[0]
    assert count(smr) == SMR_WITHOUT_CLASSIFIER + 4_096 * classes
    assert count(net) == (RESNET50_WITHOUT_FC + LAYER4_BLOCK1 + LAYER4_BLOCK2 + 4 * SMR_WITHOUT_CLASSIFIER + 4_096
                          + (4 * 4_096 + 2_048) * classes)  # 52,930,112 + 18,432 per class
    assert [tuple(part[0].weight.shape) for part in smr.parts] == [(256, 2048)] * 8 and smr.parts[0][0].bias is None
    assert [tuple(layer.weight.shape) for layer in smr.refine if isinstance(layer, torch.nn.Linear)] == [(128, 2048),
                                                                                                        (2048, 128)]
    assert tuple(smr.classifier.weight.shape) == (classes, 4_096) and tuple(net.classifier.weight.shape) == (classes, 2048)
    # content (average) then salient (max) in branch 1, the reverse in branch 2
    pools = [type(s.pool).__name__ for s in (net.visual.smr1[0], net.visual.smr2[0], net.visual.smr1[1], net.visual.smr2[1])]
    assert pools == ["AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "AdaptiveMaxPool2d", "AdaptiveAvgPool2d"]
    # BN necks without a learnt bias; classifiers without a bias, initialised normal(std 0.001)
    for bn in (net.bn, smr.bn):
        assert not bn.bias.requires_grad and torch.equal(bn.weight, torch.ones(2048))
    assert net.classifier.bias is None and 0.0005 < float(net.classifier.weight.detach().std()) < 0.002
    # last stride 1: layer4 keeps layer3's map; branches are copies, not shared
    v = net.visual
    assert v.block1[0].conv2.stride == (1, 1) and v.block1[0].downsample[0].stride == (1, 1)
    assert v.block1[0].conv1.weight.data_ptr() != v.block1[1].conv1.weight.data_ptr()
    assert torch.equal(v.block1[0].conv1.weight, v.block1[1].conv1.weight)  # copies start equal
    maps = {}
    v.layer4.register_forward_hook(lambda m, i, o: maps.__setitem__("last", o.shape))  # returns None: output kept
    assert net.eval()(torch.zeros(2, 3, *SIZE)).shape == (2, 2048)
    assert maps["last"] == (2, 2048, 8, 1)  # layer3's 128 / 16 rows, kept by the last stride of 1
    out = net.train()(torch.randn(4, 3, *SIZE))
    assert [tuple(f.shape) for f in out["triplet_feats"]] == [(4, 2048)] * 5
    assert [tuple(y.shape) for y in out["logits"]] == [(4, classes)] * 5
    with pytest.raises(utils.UserError, match="height of at least 128"):
        net.eval()(torch.zeros(1, 3, 64, 32))


def test_smr_against_its_description():
    """x' = sigmoid(W2 ReLU(W1 P(x) + b1) + b2) * x; in training the logits of [BN(P(x)), BN_i(L_i P(stripe_i))]."""
    torch.manual_seed(0)
    x = torch.randn(4, 2048, 9, 2)  # 9 rows: one stripe of 1 row each, the last row left out (9 // 8 = 1)
    for pooling, pool in (("avg", lambda t: t.mean(dim=(2, 3))), ("max", lambda t: t.amax(dim=(2, 3)))):
        smr = cssc.SMR(pooling, num_classes=3)
        torch.nn.init.normal_(smr.classifier.weight)  # visible logits
        w1, w2 = smr.refine[0], smr.refine[2]
        g = pool(x)
        weights = torch.sigmoid(w2.weight @ torch.relu(w1.weight @ g.T + w1.bias[:, None]) + w2.bias[:, None]).T
        expected = weights[:, :, None, None] * x
        torch.testing.assert_close(smr.eval()(x), expected)
        refined, pooled, logits = smr.train()(x)
        torch.testing.assert_close(refined, expected)
        torch.testing.assert_close(pooled, g)
        bn = lambda t: F.batch_norm(t, None, None, training=True, eps=1e-5)  # batch statistics, weight 1, bias 0
        stripes = [bn(pool(x[:, :, i:i + 1]) @ smr.parts[i][0].weight.T) for i in range(8)]
        torch.testing.assert_close(logits, torch.cat([bn(g), *stripes], dim=1) @ smr.classifier.weight.T,
                                   rtol=1e-4, atol=1e-4)


def test_zero_erasing_and_the_cssc_augmentation():
    torch.manual_seed(0)
    erase = loaders.ZeroErasing(probability=1.0)
    img = torch.ones(3, 128, 64)
    erase(img)
    zero = img[0] == 0
    assert zero.any() and torch.equal(zero, img[1] == 0) and (img[zero.expand(3, -1, -1)] == 0).all()
    rows, cols = zero.any(dim=1).nonzero(), zero.any(dim=0).nonzero()
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert int(zero.sum()) == int(area) and 0.02 * 128 * 64 * 0.7 < area < 0.4 * 128 * 64 * 1.3  # one box
    assert torch.equal(loaders.ZeroErasing(probability=0.0)(torch.ones(3, 8, 8)), torch.ones(3, 8, 8))
    kinds = {type(t).__name__ for t in loaders.build_transforms((32, 16), True, augmentation="cssc").transforms}
    assert "ZeroErasing" in kinds and "PixelNoiseErasing" not in kinds
    with pytest.raises(utils.UserError, match="this version knows clip-reid, cssc"):
        loaders.build_transforms((32, 16), True, augmentation="nosuch")


def test_the_recipe_is_the_authors():
    r = config.recipe("resnet50", "ltcc")
    assert (r["img_size"], r["stage2_epochs"], r["stage2_batch_size"], r["stage2_num_instances"]) == ([384, 192], 120, 32, 8)
    assert (r["stage2_lr"], r["stage2_weight_decay"], r["stage2_milestones"], r["stage2_tri_start"]) == (3e-4, 5e-4, [30, 60], 35)
    assert (r["stage2_warmup_epochs"], r["stage2_warmup_factor"], r["stage2_bias_lr_factor"]) == (10, 0.1, 1.0)
    assert r["stage2_flip_test"] is True and r["stage2_augmentation"] == "cssc"
    assert r["stage2_amp"] is False and r["stage2_eval_every"] == 5  # float32, as the authors' code
    assert config.recipe("resnet50", "celebreid")["stage2_num_instances"] == 4  # their Celeb-reID command
    assert config.recipe("resnet50", "prcc")["stage2_epochs"] == 120 and config.recipe("RN50", "celebreid") == \
        config.recipe("RN50", "ltcc")  # each method's per-dataset settings stay its own
    args = train_stage2.parse_args(["--method", "cssc"])
    args, _ = train_stage2.resolve_args(args, resumed=False)
    assert args.arch == "resnet50" and args.weights == cssc.IMAGENET_WEIGHTS and args.tri_start == 35
    # the authors' WarmupMultiStepLR counts epochs done: factor 0.1 in the first epoch, 0.19 in the second,
    # 1 from the eleventh, x0.1 from the 31st (CLIP-ReID's counts the epoch's number: 0.109 in the first)
    factors = [train_stage2.schedule(e, args) for e in (1, 2, 11, 30, 31, 61)]
    assert factors == pytest.approx([0.1, 0.19, 1.0, 1.0, 0.1, 0.01])
    rn50, _ = train_stage2.resolve_args(train_stage2.parse_args(["--method", "bnneck"]), resumed=False)
    assert train_stage2.schedule(1, rn50) == pytest.approx(0.01 * 0.9 + 0.1)


def test_cssc_trains_evaluates_and_resumes(data_root, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    argv = COMMON + ["--root", data_root, "--device", "cpu"]
    assert train_stage2.main(argv + ["--output-dir", str(full)]) == 0
    ckpt = torch.load(full / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["method"] == "cssc" and ckpt["config"]["arch"] == "resnet50"
    assert ckpt["config"]["pixel_mean"] == list(config.IMAGENET_MEAN)
    records = [json.loads(line) for line in (full / "metrics_stage2.jsonl").read_text().splitlines()]
    assert "tri" not in records[0] and records[1]["tri"] >= 0  # the triplet from the epoch after --tri-start
    args = json.loads((full / "args_stage2.json").read_text())
    assert args["flip_test"] is True and args["augmentation"] == "cssc" and args["bias_lr_factor"] == 1.0

    # evaluate.py rebuilds it from the checkpoint alone, with the run's flip test, and gets the run's numbers
    # (in batches of the run's 8: ResNet-50's convolutions sum in another order for another batch size)
    assert evaluate.main(["--checkpoint", str(full / "last.pt"), "--workers", "0", "--device", "cpu",
                          "--batch-size", "8"]) == 0
    evaluated = json.loads((full / "results.json").read_text())
    assert evaluated["evaluate"]["flip"] is True and evaluated["evaluate"]["metrics"] == evaluated["metrics"]

    # stopped after epoch 1 and resumed: the uninterrupted run's weights
    original = train_stage2.training.Run.stopped
    with monkeypatch.context() as m:
        m.setattr(train_stage2.training.Run, "stopped", lambda self: original(self) or True)
        assert train_stage2.main(argv + ["--output-dir", str(cut)]) == 130
    assert train_stage2.main(["--output-dir", str(cut), "--resume"]) == 0
    resumed = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], v) for k, v in ckpt["model"].items())


def test_cssc_on_the_cuda_look_alike(data_root, tmp_path):
    with fake_cuda():
        assert train_stage2.main(COMMON + ["--root", data_root, "--device", "cuda", "--output-dir", str(tmp_path),
                                           "--epochs", "1", "--eval-every", "1"]) == 0
        assert evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--workers", "0", "--device", "cuda",
                              "--batch-size", "8"]) == 0
    evaluated = json.loads((tmp_path / "results.json").read_text())
    # without deterministic kernels (the CUDA default) the features differ in the last bits, and a near-tie
    # in the ranking may swap: the same numbers up to that
    for setting, metrics in evaluated["metrics"].items():
        assert evaluated["evaluate"]["metrics"][setting] == pytest.approx(metrics, abs=1.0), setting


def test_cssc_errors(data_root, tmp_path, capsys):
    assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--output-dir", str(tmp_path),
                                                      "--weights", "resnet50-0676ba61.pth"]) == 2
    assert "put https://download.pytorch.org/models/resnet50-0676ba61.pth at" in capsys.readouterr().err
    assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--output-dir", str(tmp_path),
                                                      "--arch", "tiny"]) == 2
    assert "--method cssc trains --arch resnet50, not tiny" in capsys.readouterr().err
    assert utils.run_cli(train_stage2.main, COMMON + ["--root", data_root, "--output-dir", str(tmp_path),
                                                      "--no-sim"]) == 2
    assert "method cssc does not read them" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train_stage1.parse_args(["--arch", "resnet50"])
    assert exc.value.code == 2 and "has no stage 1" in capsys.readouterr().err


def test_imagenet_weights_load_from_a_file(tmp_path):
    """A file in torchvision's format (random weights here) is what --weights reads."""
    torch.manual_seed(1)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path / cssc.IMAGENET_WEIGHTS
    torch.save(state, path)
    net = cssc.resnet50_backbone(str(path))
    assert torch.equal(net.conv1.weight, state["conv1.weight"]) and net.layer4[0].conv2.stride == (1, 1)
    built = registry.build_model(models.ModelConfig(arch="resnet50", img_size=list(SIZE), num_classes=3, method="cssc"),
                               weights=str(path))
    assert torch.equal(built.visual.block1[1].conv1.weight, state["layer4.0.conv1.weight"])  # the copy too
