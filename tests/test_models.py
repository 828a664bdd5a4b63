"""Tests of models.py: prompts (Eq. 1-3), text encoder, orthogonalisation (Eq. 4-5), SSE prompts,
the non-local block and SIM (Eq. 12-16) against literal transcriptions, the stage-2 Re-ID model,
build_clip and inference_cost. CPU, tiny CLIP presets, no network."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import clip
from models import (reid_options, CLOTHES_TEMPLATE, ID_TEMPLATE, SIM, NonLocalBlock, PromptLearner, SCIReID,
                    SemanticPrompts, TextEncoder, build_clip, inference_cost, match_norm, orthogonalize,
                    remove_subspace)
from utils import UserError

IMG = (128, 64)  # tiny ResNet, last stride 1: an 8x4 grid; tiny ViT (16x16 patches): also 8x4
N_TOKENS = 1 + 8 * 4
WIDTH = 64       # tiny text transformer width
EMBED = 64       # tiny joint embedding D


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet_state():
    return clip.tiny_state_dict("resnet", seed=0)


@pytest.fixture(scope="module")
def vit_state():
    return clip.tiny_state_dict("vit", seed=0)


@pytest.fixture
def clip_model(resnet_state):
    # what build_clip("tiny", "none", IMG) returns (checked in test_build_clip_tiny), cheaper
    return tiny_resnet(resnet_state)


def tiny_resnet(state):
    return clip.build_model(state, last_stride=1, input_size=IMG)


def tiny_vit(state):
    return clip.build_model(state, input_size=IMG)


def ctx_positions(n_ctx):
    # <start> a photo of a|the  -> the [X] tokens start at position 5 in both templates
    return list(range(5, 5 + n_ctx))


# ---- Eq. 1-3: prompt learner -----------------------------------------------------------

@pytest.mark.parametrize("template,text", [
    (ID_TEMPLATE, "A photo of a {} person."),
    (CLOTHES_TEMPLATE, "A photo of the {} clothes."),
])
@pytest.mark.parametrize("n_ctx", [4, 2, 6])
def test_prompt_learner_splices_context_into_template(clip_model, template, text, n_ctx):
    assert template == text
    torch.manual_seed(1)
    num_ids = 7
    learner = PromptLearner(clip_model, num_ids, template, n_ctx=n_ctx)
    sentence = text.format(" ".join(["X"] * n_ctx))
    tokens = clip.tokenize(sentence)
    assert torch.equal(learner.tokens, tokens)
    with torch.no_grad():
        expected = clip_model.token_embedding(tokens)[0]  # [77, W]

    labels = torch.tensor([3, 0, 3, 6])
    prompts = learner(labels)
    assert prompts.shape == (4, 77, WIDTH)
    ctx = ctx_positions(n_ctx)
    other = [p for p in range(77) if p not in ctx]
    # the placeholder tokens sit exactly at the context positions
    assert all(tokens[0, p] == clip.tokenize("X")[0, 1] for p in ctx)
    assert tokens[0, ctx[-1] + 1] != clip.tokenize("X")[0, 1]
    for b, label in enumerate(labels.tolist()):
        assert torch.equal(prompts[b, other], expected[other])
        assert torch.equal(prompts[b, ctx], learner.ctx[label])
    assert not torch.allclose(prompts[0, ctx], prompts[1, ctx])


@pytest.mark.parametrize("n_ctx", [4, 3])
def test_prompt_context_shape_and_init(clip_model, n_ctx):
    torch.manual_seed(0)
    learner = PromptLearner(clip_model, 50, ID_TEMPLATE, n_ctx=n_ctx)
    assert learner.ctx.shape == (50, n_ctx, WIDTH)
    assert learner.ctx.requires_grad
    assert learner.ctx.std().item() == pytest.approx(0.02, abs=0.0015)
    assert abs(learner.ctx.mean().item()) < 0.002
    # prefix/suffix are frozen buffers, not parameters
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]
    assert learner.prefix.shape[1] + n_ctx + learner.suffix.shape[1] == 77


def test_prompt_gradient_reaches_only_the_selected_contexts(clip_model):
    learner = PromptLearner(clip_model, 5, ID_TEMPLATE)
    learner(torch.tensor([1, 3, 3])).pow(2).sum().backward()
    grad = learner.ctx.grad
    assert grad is not None
    for c in range(5):
        assert (grad[c].abs().sum() > 0) == (c in (1, 3))


# ---- text encoder ----------------------------------------------------------------------

def test_text_encoder_reproduces_encode_text(clip_model):
    sentences = ["a photo of a person.", "A photo of the red clothes.", "x", "a much longer sentence about a man"]
    tokens = clip.tokenize(sentences)
    encoder = TextEncoder(clip_model)
    with torch.no_grad():
        expected = clip_model.encode_text(tokens)
        got = encoder(clip_model.token_embedding(tokens), tokens)
    assert got.shape == (4, EMBED)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # one shared token row for a batch of prompts (how SemanticPrompts calls it)
    one = tokens[1:2]
    with torch.no_grad():
        got = encoder(clip_model.token_embedding(one).expand(3, -1, -1), one)
        expected = clip_model.encode_text(one)
    torch.testing.assert_close(got, expected.expand(3, -1), rtol=1e-5, atol=1e-5)


def test_text_encoder_pools_the_end_token(clip_model):
    # changing an embedding after the end token must not change the feature (causal mask +
    # EOT pooling); changing one before it must
    tokens = clip.tokenize("A photo of a X X X X person.")
    eot = int(tokens.argmax())
    encoder = TextEncoder(clip_model)
    with torch.no_grad():
        emb = clip_model.token_embedding(tokens)
        base = encoder(emb, tokens)
        after, before = emb.clone(), emb.clone()
        after[0, eot + 1] += 1.0
        before[0, eot - 1] += 1.0
        assert torch.equal(encoder(after, tokens), base)
        assert not torch.allclose(encoder(before, tokens), base)


# ---- Eq. 4-5: orthogonalisation --------------------------------------------------------

def paper_ref(f_id, f_clo):
    out = torch.empty_like(f_id)
    for i in range(f_id.shape[0]):
        c = float(f_clo[i] @ f_id[i]) / float(f_id[i] @ f_id[i])
        out[i] = f_id[i] - c * f_id[i]
    return out


def gram_schmidt_ref(f_id, f_clo):
    out = torch.empty_like(f_id)
    for i in range(f_id.shape[0]):
        out[i] = f_id[i] - float(f_id[i] @ f_clo[i]) / float(f_clo[i] @ f_clo[i]) * f_clo[i]
    return out


def test_orthogonalize_paper_is_literal_eq4_5():
    f_id, f_clo = rand(6, 8, seed=1), rand(6, 8, seed=2)
    got = orthogonalize(f_id, f_clo, "paper")
    torch.testing.assert_close(got, paper_ref(f_id, f_clo), rtol=1e-12, atol=1e-12)
    c = (f_clo * f_id).sum(1, keepdim=True) / (f_id * f_id).sum(1, keepdim=True)
    torch.testing.assert_close(got, (1 - c) * f_id, rtol=1e-12, atol=1e-12)
    assert torch.equal(orthogonalize(f_id, f_clo), got)  # the default


def test_orthogonalize_gram_schmidt():
    f_id, f_clo = rand(6, 8, seed=3), rand(6, 8, seed=4)
    got = orthogonalize(f_id, f_clo, "gram-schmidt")
    torch.testing.assert_close(got, gram_schmidt_ref(f_id, f_clo), rtol=1e-12, atol=1e-12)
    dots = (got * f_clo).sum(1)
    assert dots.abs().max().item() < 1e-12
    assert not torch.allclose(got, orthogonalize(f_id, f_clo, "paper"))


@pytest.mark.parametrize("ortho", ["paper", "gram-schmidt"])
def test_match_norm_keeps_the_direction_and_takes_the_norm_of_f_id(ortho):
    """The norm-matched control: each F_ort row rescaled to its F_id row's norm, direction (sign
    included) unchanged; for the printed Eq. 4-5 that is F_id itself, or -F_id where c > 1."""
    f_id, f_clo = rand(6, 8, seed=5), rand(6, 8, seed=6)
    f_ort = orthogonalize(f_id, f_clo, ortho)
    got = match_norm(f_ort, f_id)
    for i in range(6):  # row by row, as written
        expected = f_ort[i] * (float(f_id[i].norm()) / float(f_ort[i].norm()))
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.norm(dim=1), f_id.norm(dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.cosine_similarity(got, f_ort, dim=1), torch.ones(6, dtype=got.dtype))
    if ortho == "paper":
        c = (f_clo * f_id).sum(1, keepdim=True) / (f_id * f_id).sum(1, keepdim=True)
        torch.testing.assert_close(got, torch.sign(1 - c) * f_id, rtol=1e-12, atol=1e-12)


def test_semantic_prompts_norm_matched(clip_model):
    torch.manual_seed(0)
    plain = SemanticPrompts(clip_model, 4, use_sse=True, ortho="gram-schmidt")
    matched = SemanticPrompts(clip_model, 4, use_sse=True, ortho="gram-schmidt", norm_matched=True)
    matched.load_state_dict(plain.state_dict())
    labels = torch.tensor([0, 3, 1])
    f_id, _, f_ort = plain(labels)
    _, _, g_ort = matched(labels)
    torch.testing.assert_close(g_ort.norm(dim=1), f_id.norm(dim=1))
    torch.testing.assert_close(F.normalize(g_ort, dim=1), F.normalize(f_ort, dim=1))
    banks = matched.banks(4)
    torch.testing.assert_close(banks["F_ort"].norm(dim=1), banks["F_id"].norm(dim=1))


def test_orthogonalize_bad_mode():
    with pytest.raises(ValueError, match="gram-schmidt"):
        orthogonalize(rand(2, 3), rand(2, 3), "schmidt")


# ---- stage 1: SemanticPrompts ----------------------------------------------------------

@pytest.mark.parametrize("ortho", ["paper", "gram-schmidt"])
def test_semantic_prompts_forward(clip_model, ortho):
    torch.manual_seed(0)
    sp = SemanticPrompts(clip_model, 6, use_sse=True, ortho=ortho)
    labels = torch.tensor([4, 1, 4, 0, 1])
    f_id, f_clo, f_ort = sp(labels)
    for f in (f_id, f_clo, f_ort):
        assert f.shape == (5, EMBED)
        assert torch.equal(f[0], f[2]) and torch.equal(f[1], f[4])
        assert not torch.allclose(f[0], f[1])
    torch.testing.assert_close(f_ort, orthogonalize(f_id, f_clo, ortho))
    assert not torch.allclose(f_id, f_clo)
    # each row is the text feature of that row's own identity prompt
    with torch.no_grad():
        for b, label in enumerate(labels.tolist()):
            one = torch.tensor([label])
            ref_id = sp.text_encoder(sp.id_prompt(one), sp.id_prompt.tokens)[0]
            ref_clo = sp.text_encoder(sp.clothes_prompt(one), sp.clothes_prompt.tokens)[0]
            torch.testing.assert_close(f_id[b], ref_id, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(f_clo[b], ref_clo, rtol=1e-5, atol=1e-6)


def test_semantic_prompts_without_sse(clip_model):
    sp = SemanticPrompts(clip_model, 4, use_sse=False)
    assert sp.clothes_prompt is None
    f_id, f_clo, f_ort = sp(torch.tensor([2, 0, 2]))
    assert f_clo is None
    assert torch.equal(f_ort, f_id)
    assert f_id.shape == (3, EMBED)
    banks = sp.banks(4)
    assert torch.equal(banks["F_clo"], torch.zeros(4, EMBED))
    assert torch.equal(banks["F_ort"], banks["F_id"])


def test_semantic_prompts_banks(clip_model):
    torch.manual_seed(0)
    sp = SemanticPrompts(clip_model, 5, ortho="gram-schmidt")
    banks = sp.banks(5, batch=2)  # chunked: 2 + 2 + 1
    assert set(banks) == {"F_id", "F_clo", "F_ort"}
    with torch.no_grad():
        expected = sp(torch.arange(5))
    for name, ref in zip(("F_id", "F_clo", "F_ort"), expected):
        assert banks[name].shape == (5, EMBED)
        assert banks[name].dtype == torch.float32
        assert not banks[name].requires_grad
        torch.testing.assert_close(banks[name], ref, rtol=1e-5, atol=1e-6)


def test_stage1_only_contexts_get_gradients(clip_model):
    sp = SemanticPrompts(clip_model, 5)
    trainable = sorted(n for n, p in sp.named_parameters() if p.requires_grad)
    assert trainable == ["clothes_prompt.ctx", "id_prompt.ctx"]
    f_id, f_clo, f_ort = sp(torch.tensor([0, 3, 3]))
    (f_id.pow(2).sum() + f_clo.sum() + f_ort.abs().sum()).backward()
    for name in trainable:
        grad = dict(sp.named_parameters())[name].grad
        assert grad is not None and grad[[0, 3]].abs().sum() > 0
        assert grad[[1, 2, 4]].abs().sum() == 0
    for name, p in sp.text_encoder.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    assert clip_model.token_embedding.weight.grad is None
    # the encoder's weights are CLIP's own (shared, not copied), and stay frozen there too
    assert sp.text_encoder.text_projection is clip_model.text_projection
    assert not clip_model.text_projection.requires_grad


@pytest.mark.parametrize("use_sse,calls", [(True, [3, 3]), (False, [3])])
def test_text_encoder_runs_once_per_distinct_identity(clip_model, use_sse, calls):
    sp = SemanticPrompts(clip_model, 8, use_sse=use_sse)
    rows = []
    sp.text_encoder.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    sp(torch.tensor([5, 2, 5, 5, 7, 2, 7, 5]))
    assert rows == calls


# ---- Eq. 12-16: non-local block and SIM ------------------------------------------------

def linear_ref(x, layer):
    return x @ layer.weight.t() + layer.bias


def non_local_ref(x, block, softmax):
    B, N, _ = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        theta, phi, g = linear_ref(x[b], block.theta), linear_ref(x[b], block.phi), linear_ref(x[b], block.g)
        aff = theta @ phi.t()
        if softmax:
            aff = torch.exp(aff) / torch.exp(aff).sum(dim=1, keepdim=True)
        else:
            aff = aff / N
        f_con = aff @ g
        out[b] = linear_ref(f_con, block.W) + x[b]
    return out


def layer_norm_ref(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def gelu_ref(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def sim_ref(f_ori, bank, sim, softmax):
    f_res = non_local_ref(f_ori, sim.non_local, softmax)
    d = bank.shape[1]
    scores = f_res @ bank.t() / math.sqrt(d)
    attn = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
    f_out = f_res + attn @ bank
    h = layer_norm_ref(f_out, sim.norm)
    f_diff = linear_ref(gelu_ref(linear_ref(h, sim.mlp[0])), sim.mlp[2])
    return f_ori + sim.alpha * f_diff


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


@pytest.mark.parametrize("norm", ["dot", "softmax"])
def test_non_local_block_matches_eq12_13(norm):
    block = NonLocalBlock(8, normalization=norm).double()
    assert block.theta.out_features == block.phi.out_features == block.g.out_features == 4
    assert block.W.in_features == 4 and block.W.out_features == 8
    assert torch.equal(block.W.weight, torch.zeros_like(block.W.weight))
    x = rand(2, 5, 8, seed=3)
    assert torch.equal(block(x), x)  # zero W: the identity at init
    randomize(block, seed=4)
    got = block(x)
    torch.testing.assert_close(got, non_local_ref(x, block, norm == "softmax"), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, non_local_ref(x, block, norm != "softmax"))


@pytest.mark.parametrize("norm", ["dot", "softmax"])
def test_sim_matches_eq12_16(norm):
    sim = randomize(SIM(8, normalization=norm).double(), seed=5)
    assert sim.alpha.shape == (8,)
    f_ori, bank = rand(2, 5, 8, seed=6), rand(3, 8, seed=7)
    got = sim(f_ori, bank)
    assert got.shape == f_ori.shape
    torch.testing.assert_close(got, sim_ref(f_ori, bank, sim, norm == "softmax"), rtol=1e-10, atol=1e-10)
    # the cross-attention alone (Eq. 14)
    f_res = rand(2, 5, 8, seed=8)
    scores = f_res @ bank.t() / math.sqrt(8)
    expected = f_res + scores.softmax(-1) @ bank
    torch.testing.assert_close(sim.cross_attention(f_res, bank), expected, rtol=1e-12, atol=1e-12)
    # a float32 bank (the stored one) is cast to the tokens' dtype
    torch.testing.assert_close(sim(f_ori, bank.float()), got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["dot", "softmax"])
def test_sim_first_token_only_equals_token_0_of_the_full_output(norm):
    sim = randomize(SIM(8, normalization=norm).double(), seed=13)
    f_ori, bank = rand(2, 5, 8, seed=14), rand(3, 8, seed=15)
    first = sim(f_ori, bank, first_token_only=True)
    assert first.shape == (2, 1, 8)
    torch.testing.assert_close(first, sim(f_ori, bank)[:, :1], rtol=1e-12, atol=1e-12)


def test_sim_bank_matters():
    sim = randomize(SIM(8).double(), seed=9)
    f_ori = rand(1, 4, 8, seed=10)
    assert not torch.allclose(sim(f_ori, rand(3, 8, seed=11)), sim(f_ori, rand(3, 8, seed=12)))


def test_sim_starts_as_identity_but_alpha_learns():
    sim = SIM(16)
    f_ori = rand(2, 6, 16, seed=1, dtype=torch.float32)
    bank = rand(4, 16, seed=2, dtype=torch.float32)
    out = sim(f_ori, bank)
    assert torch.equal(out, f_ori)
    (out * rand(2, 6, 16, seed=3, dtype=torch.float32)).sum().backward()
    assert sim.alpha.grad is not None and sim.alpha.grad.abs().min() > 0


# ---- stage 2: SCIReID ------------------------------------------------------------------

def build_reid(family, state, num_classes=5, **kwargs):
    torch.manual_seed(0)
    model = tiny_resnet(state) if family == "resnet" else tiny_vit(state)
    bank = rand(num_classes, EMBED, seed=3, dtype=torch.float32)
    return SCIReID(model, num_classes, bank, **kwargs)


@pytest.fixture(params=["resnet", "vit"])
def family_state(request, resnet_state, vit_state):
    return request.param, (resnet_state if request.param == "resnet" else vit_state)


def images(b=3, seed=0):
    return rand(b, 3, *IMG, seed=seed, dtype=torch.float32)


@pytest.mark.parametrize("use_sim", [True, False])
def test_reid_train_outputs(family_state, use_sim):
    family, state = family_state
    model = build_reid(family, state, use_sim=use_sim).train()
    feat_dim = 256 if family == "resnet" else 64
    assert model.feature_dim == feat_dim + EMBED
    x = images()
    out = model(x)
    assert set(out) == {"f_glob", "f_proj", "logits", "bn_feat", "triplet_feats"}
    assert out["f_glob"].shape == (3, feat_dim)
    assert out["f_proj"].shape == (3, EMBED)
    assert len(out["logits"]) == 2 and all(l.shape == (3, 5) for l in out["logits"])
    assert out["bn_feat"].shape == (3, feat_dim + EMBED)
    # bn_feat = batch-normalised (train mode) features; logits = bias-free classifiers on them
    for part, f in ((out["bn_feat"][:, :feat_dim], out["f_glob"]), (out["bn_feat"][:, feat_dim:], out["f_proj"])):
        ref = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + 1e-5)
        torch.testing.assert_close(part, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["logits"][0], out["bn_feat"][:, :feat_dim] @ model.neck_glob.classifier.weight.t())
    torch.testing.assert_close(out["logits"][1], out["bn_feat"][:, feat_dim:] @ model.neck_proj.classifier.weight.t())
    # f_proj is token 0: of the raw tokens without SIM, and also with SIM at init (identity)
    glob, tokens = model.visual(x, return_tokens=True)
    torch.testing.assert_close(out["f_glob"], glob)
    torch.testing.assert_close(out["f_proj"], tokens[:, 0])
    assert (model.sim is None) == (not use_sim)


def test_reid_triplet_features_are_clipreids(family_state):
    """CLIP-ReID's triplet features: RN50 - pooled layer3 map, pooled layer4 map, projected token 0;
    ViT - class token entering the last block (no ln_post), class token after ln_post, projected."""
    family, state = family_state
    model = build_reid(family, state).train()
    x = images()
    f_mid, f_glob, f_proj = model(x)["triplet_feats"]
    visual = model.visual
    with torch.no_grad():
        if family == "resnet":
            h = visual.avgpool(visual.relu3(visual.bn3(visual.conv3(visual.relu2(visual.bn2(visual.conv2(
                visual.relu1(visual.bn1(visual.conv1(x))))))))))
            layer3 = visual.layer3(visual.layer2(visual.layer1(h)))
            expected_mid = layer3.mean(dim=(2, 3))  # [B, width*16]
            expected_glob = visual.layer4(layer3).mean(dim=(2, 3))
        else:
            t = visual.conv1(x).flatten(2).transpose(1, 2)
            t = torch.cat([visual.class_embedding.expand(len(x), 1, -1), t], 1) + visual.positional_embedding
            t = visual.ln_pre(t).transpose(0, 1)
            for block in visual.transformer.resblocks[:-1]:
                t = block(t)
            expected_mid = t[0]
            expected_glob = visual.ln_post(visual.transformer.resblocks[-1](t)[0])
    assert f_mid.shape == ((3, 128) if family == "resnet" else (3, 64))
    torch.testing.assert_close(f_mid, expected_mid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_glob, expected_glob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_proj, model(x)["f_proj"])


def test_reid_eval_feature_before_and_after_bn(family_state):
    family, state = family_state
    model = build_reid(family, state).eval()
    feat_dim = model.visual.feature_dim
    g = torch.Generator().manual_seed(7)
    for neck in (model.neck_glob, model.neck_proj):  # non-trivial running statistics and affine
        n = neck.bn.num_features
        neck.bn.running_mean.copy_(torch.randn(n, generator=g))
        neck.bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        with torch.no_grad():
            neck.bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            neck.bn.bias.copy_(torch.randn(n, generator=g))
    x = images(2, seed=1)
    with torch.no_grad():
        glob, tokens = model.visual(x, return_tokens=True)
        before = model(x)
        model.neck_feat = "after"
        after = model(x)
    assert before.shape == after.shape == (2, feat_dim + EMBED)
    torch.testing.assert_close(before, torch.cat([glob, tokens[:, 0]], 1))

    def bn_ref(f, bn):
        return (f - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = torch.cat([bn_ref(glob, model.neck_glob.bn), bn_ref(tokens[:, 0], model.neck_proj.bn)], 1)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


def test_reid_f_proj_is_sim_token0_once_sim_is_active(resnet_state):
    model = build_reid("resnet", resnet_state).eval()
    randomize(model.sim, seed=2)
    x = images(2)
    with torch.no_grad():
        glob, tokens = model.visual(x, return_tokens=True)
        refined = model.sim(tokens, model.text_bank)
        feat = model(x)
    assert not torch.allclose(refined[:, 0], tokens[:, 0])
    torch.testing.assert_close(feat, torch.cat([glob, refined[:, 0]], 1), rtol=1e-4, atol=1e-4)  # float32, other matmul shapes


def test_reid_vit_built_as_documented(vit_state):
    # the brief's construction: a tiny ViT at 128x64 with its default patch stride
    model = SCIReID(clip.build_model(vit_state, input_size=IMG), 4, torch.zeros(4, EMBED)).eval()
    with torch.no_grad():
        feat = model(images(2))
    assert feat.shape == (2, 64 + EMBED)
    assert torch.isfinite(feat).all()


def test_reid_stage2_gradients(family_state):
    family, state = family_state
    model = build_reid(family, state).train()
    randomize(model.sim, seed=1)  # alpha = 0 at init would leave SIM's inner weights a zero gradient
    assert "text_bank" in dict(model.named_buffers())
    assert "text_bank" not in dict(model.named_parameters())
    assert not model.neck_glob.bn.bias.requires_grad and not model.neck_proj.bn.bias.requires_grad
    bank_before = model.text_bank.clone()
    out = model(images())
    labels = torch.tensor([0, 1, 4])
    loss = sum(F.cross_entropy(l, labels) for l in out["logits"]) + out["f_proj"].pow(2).mean() \
        + F.cross_entropy(out["f_proj"] @ model.text_bank.t(), labels)
    loss.backward()
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith("bn.bias"):
            assert p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    nonzero = [n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0]
    for prefix in ("visual.conv1", "sim.alpha", "sim.non_local.W", "sim.non_local.theta", "sim.mlp.0",
                   "sim.norm", "neck_glob.bn.weight", "neck_proj.bn.weight",
                   "neck_glob.classifier", "neck_proj.classifier"):
        assert any(n.startswith(prefix) for n in nonzero), prefix
    assert torch.equal(model.text_bank, bank_before)


# ---- build_clip ------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["RN50", "ViT-B/16"])
def test_build_clip_tiny_rejects_openai_names(weights):
    with pytest.raises(UserError, match="tiny"):
        build_clip("tiny", weights, IMG)


def test_build_clip_tiny_reads_a_weights_file(tmp_path):
    """--arch tiny / tiny-vit with a checkpoint of their family (what synthetic/pretrain.py writes)."""
    for arch, family in (("tiny", "resnet"), ("tiny-vit", "vit")):
        state = clip.tiny_state_dict(family, seed=5)
        torch.save(state, tmp_path / f"{arch}.pt")
        model = build_clip(arch, str(tmp_path / f"{arch}.pt"), IMG)
        expected = clip.build_model(state, **reid_options(arch, IMG)).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        assert not torch.equal(model.state_dict()["token_embedding.weight"],
                               build_clip(arch, "none", IMG).state_dict()["token_embedding.weight"])
    with pytest.raises(UserError, match="holds a ViT model but --arch is tiny"):
        build_clip("tiny", str(tmp_path / "tiny-vit.pt"), IMG)
    with pytest.raises(clip.CheckpointError, match="no such file"):
        build_clip("tiny", str(tmp_path / "absent.pt"), IMG)


def test_random_init_warning_only_for_random_weights(tmp_path, monkeypatch, caplog):
    """--weights defaults to the arch's name (RN50, ViT-B/16): pretrained, so no RANDOMLY warning; no
    download either: clip.load is replaced by a tiny model of the same family."""
    import logging

    import models

    def fake_load(name, device="cpu", **opts):
        family = "vit" if name.startswith("ViT") else "resnet"
        return clip.build_model(clip.tiny_state_dict(family, seed=0), **reid_options(f"tiny{'-vit' * (family == 'vit')}", IMG)), None
    monkeypatch.setattr(models.clip, "load", fake_load)
    logger = logging.getLogger("test_random_init")
    for arch, weights, warned in (("RN50", "RN50", False), ("ViT-B/16", "ViT-B/16", False),
                                  ("RN50", str(tmp_path / "weights.pt"), False), ("tiny", "none", True),
                                  ("tiny", "tiny", True), ("tiny-vit", "none", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="test_random_init"):
            build_clip(arch, weights, IMG, logger=logger)
        assert ("RANDOMLY" in caplog.text) == warned, (arch, weights, caplog.text)


def test_build_clip_tiny():
    model = build_clip("tiny", "none", IMG, seed=3)
    assert not model.training
    reference = tiny_resnet(clip.tiny_state_dict("resnet", seed=3)).state_dict()
    assert model.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert model.visual.last_stride == 1 and model.visual.grid_size == (8, 4)
    assert next(model.parameters()).dtype == torch.float32
    again = build_clip("tiny", "none", IMG, seed=3)
    other = build_clip("tiny", "none", IMG, seed=4)
    w = "visual.conv1.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


def test_build_clip_rn50_random_full_size():
    # SLOW (a few seconds): builds and runs one full-size RN50 with random weights
    model = build_clip("RN50", "none", (384, 192))
    assert model.visual.output_dim == 1024
    assert model.visual.feature_dim == 2048
    assert model.visual.last_stride == 1 and model.visual.grid_size == (24, 12)
    with torch.no_grad():
        glob, tokens = model.visual(torch.zeros(1, 3, 384, 192), return_tokens=True)
    assert glob.shape == (1, 2048)
    assert tokens.shape == (1, 1 + 288, 1024)


# ---- inference_cost --------------------------------------------------------------------

def test_inference_cost(resnet_state):
    with_sim = build_reid("resnet", resnet_state, use_sim=True)
    without = build_reid("resnet", resnet_state, use_sim=False)
    p_sim, g_sim = inference_cost(with_sim, IMG)
    p_no, g_no = inference_cost(without, IMG)
    assert p_no > 0 and g_no > 0
    assert g_sim > g_no
    assert p_sim > p_no
    # parameters: everything but the identity classifiers, in millions
    expected = sum(p.numel() for n, p in with_sim.named_parameters() if "classifier" not in n) / 1e6
    assert p_sim == pytest.approx(expected)
    sim_params = sum(p.numel() for p in with_sim.sim.parameters()) / 1e6
    assert p_sim - p_no == pytest.approx(sim_params)


def test_inference_cost_leaves_out_the_classifiers(resnet_state):
    few = build_reid("resnet", resnet_state, num_classes=5, use_sim=False)
    many = build_reid("resnet", resnet_state, num_classes=5000, use_sim=False)
    assert inference_cost(few, IMG) == inference_cost(many, IMG)


class TokensThroughAttention(torch.nn.Module):
    """[1, 3, 10, 4] image -> 10 tokens of width 12 -> one multi-head attention layer."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(12, 2)

    def forward(self, x):
        tokens = x.permute(2, 0, 1, 3).reshape(10, 1, 12)  # [L, B, D]
        return self.attn(tokens, tokens, tokens, need_weights=False)[0]


def test_inference_cost_counts_the_attention_products():
    """PyTorch's FLOP counter has no formula for the fused CPU attention kernel: without the math
    backend Q K^T and A V counted 0 (Table IV was 0.7 GFLOPs short for RN50, 3.1 for ViT-B/16)."""
    L, D, heads = 10, 12, 2
    projections = 2 * L * D * (3 * D) + 2 * L * D * D   # in_proj (q, k, v) and out_proj
    products = 2 * (2 * heads * L * L * (D // heads))   # Q K^T and A V, per head
    _, gflops = inference_cost(TokensThroughAttention(), (10, 4))
    assert round(gflops * 1e9) == projections + products


def test_remove_subspace_is_gram_schmidt_against_every_outfit():
    torch.manual_seed(0)
    f_id, f_clo = torch.randn(8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    out = remove_subspace(f_id, f_clo)
    # direct transcription: classical Gram-Schmidt over the outfit features, then subtract projections
    basis = []
    for v in f_clo:
        for b in basis:
            v = v - (v @ b) * b
        basis.append(v / v.norm())
    expected = f_id - sum((f_id @ b) * b for b in basis)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert (f_clo.float() @ out.float()).abs().max() < 1e-4
    one = remove_subspace(f_id, f_clo[:1])  # one outfit: Eq. 4-5's Gram-Schmidt reading
    assert torch.allclose(one.double(), orthogonalize(f_id[None], f_clo[:1], "gram-schmidt")[0], atol=1e-5)
