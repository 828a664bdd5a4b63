"""Each loss against a literal loop transcription of its equation (float64, small tensors)."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (ClothesAdversarialLoss, CosineClothesClassifier, CrossEntropyLabelSmooth,
                    TripletLoss, image_to_text_loss, prompt_loss, semantic_similarity_loss,
                    text_logits, text_to_image_loss, total_loss)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rand(*shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)


# ---- literal transcriptions ------------------------------------------------------------

def s_ref(v, t, scale, cosine):
    if cosine:
        return scale * float(v @ t) / (float(v.norm()) * float(t.norm()))
    return scale * float(v @ t)


def i2t_ref(V, T, scale, cosine):  # Eq. 9
    B = V.shape[0]
    total = 0.0
    for i in range(B):
        num = math.exp(s_ref(V[i], T[i], scale, cosine))
        den = sum(math.exp(s_ref(V[i], T[k], scale, cosine)) for k in range(B))
        total += -math.log(num / den)
    return total / B


def t2i_ref(T, V, labels, scale, cosine):  # Eq. 10
    B = V.shape[0]
    total = 0.0
    for i in range(B):
        P = [p for p in range(B) if labels[p] == labels[i]]
        den = sum(math.exp(s_ref(V[k], T[i], scale, cosine)) for k in range(B))
        acc = 0.0
        for p in P:
            acc += math.log(math.exp(s_ref(V[p], T[i], scale, cosine)) / den)
        total += -acc / len(P)
    return total / B


def cos_ref(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def sim_ref(f_ort, f_id, f_clo, l1, l2):  # Eq. 6-8
    B = f_ort.shape[0]
    sim_id = sum(cos_ref(f_ort[i], f_id[i]) for i in range(B)) / B
    sim_clo = sum(cos_ref(f_ort[i], f_clo[i]) for i in range(B)) / B
    return l1 * (1 - sim_id) + l2 * sim_clo


def ce_ls_ref(logits, targets, eps):  # Eq. 17 / 19
    B, C = logits.shape
    total = 0.0
    for i in range(B):
        Z = sum(math.exp(float(logits[i, c])) for c in range(C))
        for c in range(C):
            q = (1 - eps) * (1.0 if c == int(targets[i]) else 0.0) + eps / C
            total += -q * math.log(math.exp(float(logits[i, c])) / Z)
    return total / B


def cal_ref(logits, clothes_ids, pos_mask, eps):  # Eq. 18
    B, N = logits.shape
    total = 0.0
    for i in range(B):
        S_pos = [c for c in range(N) if pos_mask[i, c] > 0]
        S_neg = [j for j in range(N) if pos_mask[i, j] == 0]
        neg_sum = sum(math.exp(float(logits[i, j])) for j in S_neg)
        for c in S_pos:
            q = (1 - eps) * (1.0 if c == int(clothes_ids[i]) else 0.0) + eps / len(S_pos)
            e = math.exp(float(logits[i, c]))
            total += -q * math.log(e / (e + neg_sum))
    return total / B


def triplet_ref(X, labels, margin):
    B = X.shape[0]
    total = 0.0
    for i in range(B):
        d_ap = max(float((X[i] - X[p]).norm()) for p in range(B) if labels[p] == labels[i])
        d_an = min(float((X[i] - X[n]).norm()) for n in range(B) if labels[n] != labels[i])
        total += max(0.0, d_ap - d_an + margin)
    return total / B


# ---- a clothes layout: 3 identities owning 2, 3 and 1 outfits --------------------------

PID2CLOTHES_LIST = [[0, 1], [2, 3, 4], [5]]


def clothes_batch(B=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_clo = sum(len(c) for c in PID2CLOTHES_LIST)
    pid2clothes = torch.zeros(len(PID2CLOTHES_LIST), n_clo)
    for pid, cs in enumerate(PID2CLOTHES_LIST):
        pid2clothes[pid, cs] = 1
    pids = torch.arange(B) % len(PID2CLOTHES_LIST)
    clothes = torch.tensor([PID2CLOTHES_LIST[p][int(torch.randint(len(PID2CLOTHES_LIST[p]), (1,),
                                                                  generator=g))]
                            for p in pids.tolist()])
    logits = 4 * torch.randn(B, n_clo, generator=g, dtype=torch.float64)
    return logits, clothes, pid2clothes[pids]


# ---- Eq. 9, 10 -------------------------------------------------------------------------

@pytest.mark.parametrize("cosine,scale", [(False, 1.0), (False, 0.7), (True, 1.0), (True, 10.0)])
def test_image_to_text_matches_eq9(cosine, scale):
    V, T = rand(6, 5, seed=1), rand(6, 5, seed=2)
    got = image_to_text_loss(V, T, logit_scale=scale, cosine=cosine)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(i2t_ref(V, T, scale, cosine), rel=1e-10)


def test_image_to_text_tensor_logit_scale():
    V, T = rand(4, 3, seed=1), rand(4, 3, seed=2)
    scale = torch.tensor(2.5, dtype=torch.float64)
    got = image_to_text_loss(V, T, logit_scale=scale, cosine=True)
    assert got.item() == pytest.approx(i2t_ref(V, T, 2.5, True), rel=1e-10)


@pytest.mark.parametrize("cosine,scale", [(False, 1.0), (False, 1.3), (True, 5.0)])
def test_text_to_image_matches_eq10_with_repeated_labels(cosine, scale):
    labels = torch.tensor([3, 1, 3, 0, 1, 3, 2, 0])  # |P| of 3, 2, 1 occur
    V = rand(8, 5, seed=3)
    bank = rand(4, 5, seed=4)
    T = bank[labels]  # row i = text of sample i's identity
    got = text_to_image_loss(T, V, labels, logit_scale=scale, cosine=cosine)
    assert got.item() == pytest.approx(t2i_ref(T, V, labels.tolist(), scale, cosine), rel=1e-10)


def test_text_to_image_equals_i2t_form_when_labels_unique():
    # with |P| = 1 everywhere Eq. 10 is Eq. 9 with the roles swapped
    V, T = rand(5, 4, seed=5), rand(5, 4, seed=6)
    labels = torch.arange(5)
    assert torch.allclose(text_to_image_loss(T, V, labels), image_to_text_loss(T, V))


# ---- Eq. 6-8, 11 -----------------------------------------------------------------------

def test_semantic_similarity_matches_eq6_8():
    f_ort, f_id, f_clo = rand(5, 6, seed=7), rand(5, 6, seed=8), rand(5, 6, seed=9)
    for l1, l2 in [(1.0, 1.0), (0.5, 2.0)]:
        got = semantic_similarity_loss(f_ort, f_id, f_clo, l1, l2)
        assert got.item() == pytest.approx(sim_ref(f_ort, f_id, f_clo, l1, l2), rel=1e-10)


def test_semantic_similarity_extremes():
    f_id = rand(3, 4, seed=10)
    f_clo = torch.stack([torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0]),
                         torch.tensor([0, 0, 1.0, 0])]).double()
    # f_ort == f_id -> sim_id = 1; orthogonal f_clo contributes 0
    f_ort = torch.tensor([[0, 2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1.0]]).double()
    assert semantic_similarity_loss(f_ort, f_ort, f_clo).item() == pytest.approx(0.0, abs=1e-12)
    assert semantic_similarity_loss(f_ort, f_id, f_clo, 0.0, 1.0).item() == pytest.approx(0.0)


def test_prompt_loss_matches_eq11():
    labels = torch.tensor([0, 2, 0, 1, 2, 2])
    V = rand(6, 5, seed=11)
    f_id, f_clo = rand(3, 5, seed=12)[labels], rand(3, 5, seed=13)[labels]
    f_ort = f_id - 0.3 * f_clo
    out = prompt_loss(V, f_ort, f_id, f_clo, labels, lambda_id=0.5, lambda_clo=2.0)
    assert set(out) == {"i2t", "t2i", "sim"}
    i2t, t2i = i2t_ref(V, f_ort, 1.0, False), t2i_ref(f_ort, V, labels.tolist(), 1.0, False)
    sim = sim_ref(f_ort, f_id, f_clo, 0.5, 2.0)
    assert out["i2t"].item() == pytest.approx(i2t, rel=1e-10)
    assert out["t2i"].item() == pytest.approx(t2i, rel=1e-10)
    assert out["sim"].item() == pytest.approx(sim, rel=1e-10)
    assert total_loss(out).item() == pytest.approx(i2t + t2i + sim, rel=1e-10)  # Eq. 11


def test_prompt_loss_without_sim():
    labels = torch.tensor([0, 1, 0, 1])
    V, f_id = rand(4, 3, seed=14), rand(2, 3, seed=15)[labels]
    out = prompt_loss(V, f_id, None, None, labels, use_sim=False, logit_scale=2.0, cosine=True)
    assert out["sim"].item() == 0.0 and out["sim"].shape == ()
    assert total_loss(out).item() == pytest.approx(out["i2t"].item() + out["t2i"].item())
    with pytest.raises(ValueError):
        prompt_loss(V, f_id, None, None, labels, use_sim=True)


# ---- Eq. 17 / 19 -----------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smooth_ce_matches_formula(eps):
    logits, targets = rand(5, 7, seed=16), torch.tensor([0, 6, 3, 3, 1])
    got = CrossEntropyLabelSmooth(eps)(logits, targets)
    assert got.item() == pytest.approx(ce_ls_ref(logits, targets, eps), rel=1e-10)
    # PyTorch's label_smoothing uses the same (1 - eps) onehot + eps / C target
    assert torch.allclose(got, F.cross_entropy(logits, targets, label_smoothing=eps))


def test_label_smooth_ce_eps0_is_cross_entropy():
    logits, targets = rand(4, 3, seed=17), torch.tensor([2, 0, 1, 2])
    assert torch.allclose(CrossEntropyLabelSmooth(0.0)(logits, targets),
                          F.cross_entropy(logits, targets))


# ---- cosine classifier -----------------------------------------------------------------

def test_cosine_classifier_is_scaled_cosine():
    torch.manual_seed(0)
    clf = CosineClothesClassifier(feat_dim=8, num_clothes=5, scale=16.0).double()
    assert isinstance(clf.scale, float) and clf.weight.shape == (5, 8)
    x = 100 * rand(4, 8, seed=18)  # feature norm must not matter
    out = clf(x)
    assert out.shape == (4, 5)
    assert out.abs().max().item() <= 16.0 + 1e-9
    for i in range(4):
        for c in range(5):
            assert out[i, c].item() == pytest.approx(16.0 * cos_ref(x[i], clf.weight[c].detach()), rel=1e-9)
    # a feature along a class weight scores exactly the scale
    assert clf(clf.weight[2:3].detach() * 3)[0, 2].item() == pytest.approx(16.0)


# ---- Eq. 18 ----------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_clothes_adversarial_matches_eq18(eps):
    logits, clothes, pos_mask = clothes_batch()
    got = ClothesAdversarialLoss(epsilon=eps)(logits, clothes, pos_mask)
    assert got.item() == pytest.approx(cal_ref(logits, clothes, pos_mask, eps), rel=1e-10)


def test_clothes_adversarial_large_logits_are_stable():
    logits, clothes, pos_mask = clothes_batch(seed=1)
    logits = logits * 200  # exp() of these overflows float64
    got = ClothesAdversarialLoss()(logits, clothes, pos_mask)
    assert torch.isfinite(got)
    # against the same equation written with explicit maxima subtracted
    z, ref = logits, 0.0
    for i in range(z.shape[0]):
        neg = z[i][pos_mask[i] == 0]
        m_neg = neg.max()
        lse_neg = m_neg + torch.log(torch.exp(neg - m_neg).sum())
        pos = [c for c in range(z.shape[1]) if pos_mask[i, c] > 0]
        for c in pos:
            q = 0.9 * (c == int(clothes[i])) + 0.1 / len(pos)
            ref += -q * (z[i, c] - torch.logaddexp(z[i, c], lse_neg)).item()
    assert got.item() == pytest.approx(ref / z.shape[0], rel=1e-9)


def test_clothes_adversarial_pulls_towards_same_identity_clothes():
    logits, clothes, pos_mask = clothes_batch()
    loss_fn = ClothesAdversarialLoss(0.1)
    base = loss_fn(logits, clothes, pos_mask)
    i = 1  # identity 1 owns clothes 2, 3, 4
    other_same_id = [c for c in PID2CLOTHES_LIST[1] if c != int(clothes[i])][0]
    up = logits.clone()
    up[i, other_same_id] += 2.0
    assert loss_fn(up, clothes, pos_mask) < base  # another outfit of the same person: rewarded
    up = logits.clone()
    up[i, 0] += 2.0  # clothes of identity 0: penalised
    assert loss_fn(up, clothes, pos_mask) > base


def test_clothes_adversarial_gradients():
    logits, clothes, pos_mask = clothes_batch()
    logits.requires_grad_(True)
    ClothesAdversarialLoss(0.1)(logits, clothes, pos_mask).backward()
    g = logits.grad
    assert torch.isfinite(g).all()
    assert (g[pos_mask == 0] > 0).all()  # other identities' clothes are pushed down
    assert (g[pos_mask == 1] < 0).all()  # every outfit of the own identity is pulled up


def test_clothes_adversarial_row_without_negatives_is_finite():
    logits = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    pos_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    loss = ClothesAdversarialLoss(0.1)(logits, torch.tensor([0, 1]), pos_mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_clothes_adversarial_with_classifier():
    torch.manual_seed(0)
    clf = CosineClothesClassifier(feat_dim=6, num_clothes=6)
    _, clothes, pos_mask = clothes_batch()
    feats = torch.randn(9, 6, requires_grad=True)
    loss = ClothesAdversarialLoss()(clf(feats), clothes, pos_mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()


# ---- triplet, Eq. 20 -------------------------------------------------------------------

@pytest.mark.parametrize("margin", [0.3, 5.0])
def test_triplet_matches_batch_hard_loop(margin):
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    X = rand(8, 4, seed=19)
    got = TripletLoss(margin)(X, labels)
    assert got.item() == pytest.approx(triplet_ref(X, labels.tolist(), margin), rel=1e-7)


def test_total_loss_weighting():
    terms = {"id": torch.tensor(2.0), "cal": torch.tensor(3.0), "i2tce": torch.tensor(5.0)}
    assert total_loss(terms, {"cal": 0.5, "tri": 10.0}).item() == pytest.approx(2 + 1.5 + 5)
    assert total_loss(terms, {}).item() == pytest.approx(10.0)
    assert total_loss(terms).item() == pytest.approx(10.0)
    with pytest.raises(ValueError):
        total_loss({})


# ---- gradients and low precision -------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_all_losses_backprop(device):
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 2], device=device)
    V = torch.randn(6, 8, device=device, requires_grad=True)
    bank = torch.randn(3, 8, device=device, requires_grad=True)
    f_clo = torch.randn(3, 8, device=device, requires_grad=True)
    f_id = bank[labels]
    f_ort = f_id - 0.5 * f_clo[labels]
    out = prompt_loss(V, f_ort, f_id, f_clo[labels], labels)
    logits_id = V @ bank.t()
    clf = CosineClothesClassifier(8, 6).to(device)
    _, clothes, pos_mask = clothes_batch(B=6)
    cal = ClothesAdversarialLoss()(clf(V), clothes.to(device), pos_mask.to(device))
    terms = {"prompt": total_loss(out), "id": CrossEntropyLabelSmooth()(logits_id, labels),
             "cal": cal, "tri": TripletLoss()(V, labels)}
    loss = total_loss(terms)
    loss.backward()
    for t in (V, bank, f_clo, clf.weight):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def _ce_style_losses(dtype, device="cpu"):
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 2], device=device)
    V = (8 * torch.randn(6, 16, device=device)).to(dtype)  # dot logits in the hundreds
    T = (8 * torch.randn(3, 16, device=device)).to(dtype)[labels]
    logits = (30 * torch.randn(6, 5, device=device)).to(dtype)
    c_logits, clothes, pos_mask = clothes_batch(B=6)
    c_logits = (4 * c_logits).to(device, dtype)  # beyond what exp() can hold in float16
    return {
        "i2t": image_to_text_loss(V, T),
        "i2t_cos": image_to_text_loss(V, T, logit_scale=50.0, cosine=True),
        "t2i": text_to_image_loss(T, V, labels),
        "ce": CrossEntropyLabelSmooth()(logits, labels),
        "cal": ClothesAdversarialLoss()(c_logits, clothes.to(device), pos_mask.to(device, dtype)),
        "sim": semantic_similarity_loss(V, T, T.flip(0)),
        "tri": TripletLoss()(V, labels),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_no_nan(dtype):
    low = _ce_style_losses(dtype)
    ref = _ce_style_losses(torch.float32)
    for name, value in low.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        # inputs were rounded to `dtype`, so agreement is only approximate
        assert value.item() == pytest.approx(ref[name].item(), rel=0.05, abs=0.05), name


def test_under_cpu_autocast():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1])
    V, T = 10 * torch.randn(4, 32), 10 * torch.randn(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        i2t = image_to_text_loss(V, T[labels])
        t2i = text_to_image_loss(T[labels], V, labels)
        clf = CosineClothesClassifier(32, 4)
        logits = clf(V)
    assert i2t.dtype == t2i.dtype == logits.dtype == torch.float32
    assert torch.isfinite(i2t) and torch.isfinite(t2i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_similarity_matmuls_run_in_float32_under_autocast(dtype):
    """Features with norms above ~256 overflow a float16 Gram matrix (256^2 > 65504): the losses
    must compute their matmuls in float32 even inside an autocast region, and match float32."""
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, 32)
    x = 300 * x / x.norm(dim=1, keepdim=True)  # norm 300: x.x = 90000 is inf in float16
    bank = 300 * torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    clf = CosineClothesClassifier(32, 5)

    def all_losses():
        return {"triplet": TripletLoss(0.3)(x, labels),
                "i2t": image_to_text_loss(x, bank[labels]),
                "t2i": text_to_image_loss(bank[labels], x, labels),
                "text_logits": text_logits(x, bank),
                "text_logits_cosine": text_logits(x, bank, 20.0),
                "clothes": clf(x)}

    reference = all_losses()
    with torch.autocast("cpu", dtype=dtype):
        mixed = all_losses()
    for name, value in mixed.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-4, msg=name)


def test_text_logits_cosine_is_the_scaled_cosine_of_every_pair():
    """Eq. 19's logits with stage 1's --cosine-sim: s * cos(f_proj_i, F_ort_c), element by element."""
    torch.manual_seed(1)
    x, bank = torch.randn(4, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    got = text_logits(x, bank, 12.5)
    for i in range(4):
        for c in range(3):
            expected = 12.5 * float(x[i] @ bank[c]) / (float(x[i].norm()) * float(bank[c].norm()))
            assert float(got[i, c]) == pytest.approx(expected, rel=1e-12)
    assert torch.equal(text_logits(x, bank), x @ bank.t())  # no scale: the plain dot product, as before
