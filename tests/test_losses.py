"""Losses of ccl.train.losses against deliberately naive references (loops over samples and classes on scalar
tensors, float64), values and gradients, including the degenerate cases."""

import dataclasses
import math

import pytest
import torch

from ccl.errors import UserError
from ccl.train import losses as L

N, C = 5, 4


@pytest.fixture(autouse=True)
def float64():
    """References and gradients in float64; restored so other test modules keep their default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------------------------------------------
# naive references: one sample, one class at a time


def ref_log_softmax(row):
    """row: 1-d tensor -> list of 0-d tensors log p_j, via an explicit max-shifted sum."""
    m = max(row[j].item() for j in range(len(row)))
    total = sum(torch.exp(row[j] - m) for j in range(len(row)))
    return [row[j] - m - torch.log(total) for j in range(len(row))]


def ref_softmax(row):
    return [torch.exp(v) for v in ref_log_softmax(row)]


def ref_ce(logits, labels):
    return torch.stack([-ref_log_softmax(logits[i])[int(labels[i])] for i in range(len(logits))])


def ref_soft_ce(logits, target):
    out = []
    for i in range(len(logits)):
        lp = ref_log_softmax(logits[i])
        out.append(-sum(float(target[i][j]) * lp[j] for j in range(logits.shape[1])))
    return torch.stack(out)


def ref_refurbish(w, labels, target):
    n, c = target.shape
    out = torch.zeros(n, c)
    for i in range(n):
        for j in range(c):
            out[i, j] = float(w[i]) * (1.0 if j == int(labels[i]) else 0.0) + (1 - float(w[i])) * float(target[i][j])
    return out


def ref_argmax(row):
    best = 0
    for j in range(len(row)):
        if float(row[j]) > float(row[best]):
            best = j
    return best


def ref_pg(logits_s, probs_w, c):
    out = []
    for i in range(len(logits_s)):
        k = ref_argmax(probs_w[i])
        conf = float(probs_w[i][k])
        if c is None or conf >= c:
            out.append(-conf * ref_log_softmax(logits_s[i])[k])
        else:
            out.append(torch.zeros(()))
    return torch.stack(out)


def ref_div(logits, prior=None):
    n, c = logits.shape
    probs = [ref_softmax(logits[j]) for j in range(n)]
    total = 0.0
    for i in range(c):
        pi = 1.0 / c if prior is None else float(prior[i])
        mean_i = sum(probs[j][i] for j in range(n)) / n
        if pi > 0:
            total = total + pi * torch.log(pi / mean_i)
    return total


def ref_sharpen(p, T):
    out = torch.zeros_like(p)
    for i in range(p.shape[0]):
        z = sum(float(p[i][j]) ** (1 / T) for j in range(p.shape[1]))
        for j in range(p.shape[1]):
            out[i, j] = float(p[i][j]) ** (1 / T) / z
    return out


def ref_ccl_total(logits_s, labels, w, own, peer, acl, vm, cclrl, mm, c, abl):
    n = len(logits_s)
    ce_v = ref_ce(logits_s, labels)
    pg_v = ref_pg(logits_s, own, None if abl.no_threshold else c)
    cml_ce = ref_soft_ce(logits_s, peer)
    total = 0.0
    for i in range(n):
        cvl = 0.0 if abl.no_cvl else pg_v[i] + acl[i] + (0.0 if abl.no_mimicry else vm[i])
        cml = 0.0 if abl.no_cml else cml_ce[i] + cclrl[i] + (0.0 if abl.no_mimicry else mm[i])
        total = total + float(w[i]) * ce_v[i] + (1 - float(w[i])) / 2 * (cvl + cml)
    return total / n + ref_div(logits_s)


def ref_infonce(z1, z2, temp):
    z = torch.cat([z1, z2])
    n2, n = len(z), len(z1)
    terms = []
    for a in range(n2):
        pos = a + n if a < n else a - n
        num = torch.exp(torch.dot(z[a], z[pos]) / temp)
        den = sum(torch.exp(torch.dot(z[a], z[k]) / temp) for k in range(n2) if k != a)
        terms.append(-torch.log(num / den))
    return sum(terms) / n2


def ref_entropy_reg(logits):
    n, c = logits.shape
    probs = [ref_softmax(logits[i]) for i in range(n)]
    mean_h = sum(-sum(p[j] * torch.log(p[j]) for j in range(c)) for p in probs) / n
    pbar = [sum(probs[i][j] for i in range(n)) / n for j in range(c)]
    h_mean = -sum(pbar[j] * torch.log(pbar[j]) for j in range(c))
    return mean_h - h_mean


# ----------------------------------------------------------------------------------------------------------------
# fixtures and helpers


def make(seed=0, n=N, c=C):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, c, (n,), generator=g)
    own = torch.softmax(torch.randn(n, c, generator=g) * 4, -1)
    peer = torch.softmax(torch.randn(n, c, generator=g) * 2, -1)
    w = torch.rand(n, generator=g)
    vecs = [torch.rand(n, generator=g).requires_grad_() for _ in range(4)]  # acl, vm, cclrl, mm
    return logits, labels, own, peer, w, vecs


def grads(out, inputs):
    return torch.autograd.grad(out, inputs, allow_unused=True, retain_graph=True)


def close(a, b, tol=1e-10):
    a = torch.zeros(()) if a is None else a
    b = torch.zeros(()) if b is None else b
    return torch.allclose(a, b, atol=tol, rtol=tol)


def check_against(impl, ref, inputs, tol=1e-10):
    """Values equal and gradients (of a random projection) equal."""
    assert torch.allclose(impl, ref, atol=tol, rtol=tol), (impl, ref)
    proj = torch.randn(impl.shape, generator=torch.Generator().manual_seed(1))
    gi = grads((impl * proj).sum(), inputs)
    gr = grads((ref * proj).sum(), inputs)
    for a, b in zip(gi, gr):
        assert close(a, b, tol), (a, b)


# ----------------------------------------------------------------------------------------------------------------
# building blocks


@pytest.mark.parametrize("seed", [0, 1])
def test_ce_and_soft_ce(seed):
    logits, labels, own, peer, *_ = make(seed)
    check_against(L.ce(logits, labels), ref_ce(logits, labels), [logits])
    target = peer.clone().requires_grad_()
    out = L.soft_ce(logits, target)
    check_against(out, ref_soft_ce(logits, peer), [logits])
    assert grads(out.sum(), [target])[0] is None  # the target is detached
    # a one-hot soft target is the hard CE
    onehot = torch.nn.functional.one_hot(labels, C).double()
    assert torch.allclose(L.soft_ce(logits, onehot), L.ce(logits, labels))


def test_half_precision_logits_are_upcast():
    logits, labels, *_ = make()
    out = L.ce(logits.detach().bfloat16(), labels)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref_ce(logits.detach().bfloat16().double(), labels), atol=1e-5)


def test_sharpen_t_half_is_square_normalised():
    _, _, own, peer, *_ = make()
    sq = own**2 / (own**2).sum(-1, keepdim=True)
    assert torch.allclose(L.sharpen(own, 0.5), sq)
    assert torch.allclose(L.sharpen(peer, 0.3), ref_sharpen(peer, 0.3))
    assert torch.allclose(L.sharpen(peer, 1.0), peer)
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])  # zeros stay zeros, no NaN
    assert torch.allclose(L.sharpen(p, 0.5), p)
    with pytest.raises(ValueError):
        L.sharpen(p, 0.0)


def test_refurbish_matches_reference_and_is_detached():
    _, labels, _, peer, w, _ = make()
    target = peer.clone().requires_grad_()
    out = L.refurbish(w, labels, target, C)
    assert torch.allclose(out, ref_refurbish(w, labels, peer))
    assert not out.requires_grad
    assert torch.allclose(out.sum(-1), torch.ones(N))  # still a distribution
    # w = 1 is the noisy label, w = 0 the target; a scalar w is broadcast
    assert torch.equal(L.refurbish(1.0, labels, peer), torch.nn.functional.one_hot(labels, C).double())
    assert torch.allclose(L.refurbish(torch.zeros(N), labels, peer), peer)
    with pytest.raises(ValueError):
        L.refurbish(w, labels, peer, C + 1)
    with pytest.raises(ValueError):
        L.refurbish(w[:2], labels, peer)


def test_rolr_pseudo_label_eq1():
    _, _, own, peer, *_ = make()
    out = L.rolr_pseudo_label(own.requires_grad_(), peer, T=0.5)
    assert not out.requires_grad
    assert torch.allclose(out, ref_sharpen((own.detach() + peer) / 2, 0.5))


@pytest.mark.parametrize("c", [0.95, 0.5, None])
def test_pg_matches_reference(c):
    logits, _, own, *_ = make(3)
    own = own.clone().requires_grad_()
    out = L.pg(logits, own, c)
    check_against(out, ref_pg(logits, own.detach(), c), [logits])
    assert grads(out.sum(), [own])[0] is None  # own weak probabilities are a detached target


def test_pg_threshold_is_inclusive_and_uses_argmax_of_weak_probs():
    logits = torch.zeros(2, 3, requires_grad=True)
    probs_w = torch.tensor([[0.95, 0.05, 0.0], [0.1, 0.2, 0.7]])
    out = L.pg(logits, probs_w, c=0.95)
    assert torch.allclose(out, torch.tensor([0.95 * math.log(3), 0.0]))


def test_pg_no_sample_above_threshold_is_zero_with_finite_zero_grad():
    logits, _, _, peer, *_ = make()
    out = L.pg(logits, peer, c=0.999)
    assert torch.equal(out, torch.zeros(N))
    (g,) = grads(out.sum(), [logits])
    assert g is not None and torch.isfinite(g).all() and torch.equal(g, torch.zeros_like(g))
    # even where the masked-out log-probability is -inf (saturated logits)
    big = torch.tensor([[0.0, -1e308 * 10]], requires_grad=True)  # -inf logit
    out = L.pg(big, torch.tensor([[0.1, 0.9]]), c=0.95)
    (g,) = grads(out.sum(), [big])
    assert out.item() == 0.0 and not torch.isnan(g).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_div_matches_reference(seed):
    logits, *_ = make(seed)
    check_against(L.div(logits), ref_div(logits), [logits])
    prior = torch.tensor([0.4, 0.3, 0.3, 0.0])
    check_against(L.div(logits, prior), ref_div(logits, prior), [logits])


def test_div_zero_at_uniform_mean_and_finite_when_collapsed():
    logits = torch.eye(C, requires_grad=True) * 3  # every class predicted equally often
    assert abs(L.div(logits).item()) < 1e-12
    collapsed = torch.tensor([[0.0, -800.0, -800.0, -800.0]] * 3, requires_grad=True)  # probs underflow to 0
    d = L.div(collapsed)
    (g,) = grads(d, [collapsed])
    assert torch.isfinite(d) and d > 100 and torch.isfinite(g).all()


# ----------------------------------------------------------------------------------------------------------------
# CCL total


ALL_ABLATIONS = [L.Ablation()] + [L.Ablation(**{f.name: True}) for f in dataclasses.fields(L.Ablation)] + [
    L.Ablation(no_mimicry=True, no_threshold=True, no_cvl=True)]


@pytest.mark.parametrize("abl", ALL_ABLATIONS, ids=lambda a: ",".join(k for k, v in vars(a).items() if v) or "full")
@pytest.mark.parametrize("c", [0.95, 0.6])
def test_ccl_total_matches_reference(abl, c):
    logits, labels, own, peer, w, vecs = make(4)
    own_t = own.clone().requires_grad_()
    peer_t = peer.clone().requires_grad_()
    out = L.ccl_total(logits, labels, w, own_t, peer_t, *vecs, c=c, ablation=abl)
    ref = ref_ccl_total(logits, labels, w, own, peer, *vecs, c=c, abl=abl)
    inputs = [logits, *vecs, own_t, peer_t]
    check_against(out["loss"], ref, inputs)
    g_own, g_peer = grads(out["loss"], [own_t, peer_t])
    assert g_own is None and g_peer is None  # both weak predictions are detached targets
    # the reported parts add up to the loss
    recon = (w * out["ce"] + (1 - w) / 2 * (out["cvl"] + out["cml"])).mean() + out["div"]
    assert torch.allclose(recon, out["loss"])
    assert torch.allclose(out["cvl"], out["pg"] + out["acl"] + out["vm"])
    assert torch.allclose(out["cml"], out["cml_ce"] + out["cclrl"] + out["mm"])


def test_ablations_drop_exactly_their_terms():
    logits, labels, own, peer, w, vecs = make(5)
    acl, vm, cclrl, mm = vecs

    def run(abl):
        return L.ccl_total(logits, labels, w, own, peer, acl, vm, cclrl, mm, ablation=abl)

    full = run(L.Ablation())
    dropped = {
        "no_mimicry": {"vm", "mm"},
        "no_cvl": {"pg", "acl", "vm"},
        "no_cml": {"cml_ce", "cclrl", "mm"},
        "no_threshold": set(),
        "no_refurbished": set(),
    }
    for flag, gone in dropped.items():
        out = run(L.Ablation(**{flag: True}))
        for term in ["pg", "acl", "vm", "cclrl", "mm", "cml_ce"]:
            if term in gone:
                assert torch.equal(out[term], torch.zeros(N)), (flag, term)
            elif not (flag == "no_threshold" and term == "pg"):
                assert torch.equal(out[term], full[term]), (flag, term)
        # a dropped term gets no gradient
        g = grads(out["loss"], vecs)
        for name, gi in zip(["acl", "vm", "cclrl", "mm"], g):
            assert (gi is None) == (name in gone), (flag, name)
    # no_threshold changes PG only: samples below c now count
    out = run(L.Ablation(no_threshold=True))
    assert torch.allclose(out["pg"], L.pg(logits, own, None))
    # no_refurbished only changes the classes the caller passes to CCLRL: the total is unchanged
    assert torch.equal(run(L.Ablation(no_refurbished=True))["loss"], full["loss"])
    # dropped terms may be omitted
    L.ccl_total(logits, labels, w, own, peer, acl, None, cclrl, None, ablation=L.Ablation(no_mimicry=True))
    L.ccl_total(logits, labels, w, own, peer, None, None, cclrl, mm, ablation=L.Ablation(no_cvl=True))
    with pytest.raises(ValueError):
        L.ccl_total(logits, labels, w, own, peer, acl, None, cclrl, mm)


def test_ccl_total_w_one_is_ce_plus_div_and_w_zero_is_half_cvl_cml():
    logits, labels, own, peer, _, vecs = make(6)
    acl, vm, cclrl, mm = vecs
    div = ref_div(logits)
    out1 = L.ccl_total(logits, labels, torch.ones(N), own, peer, *vecs)
    check_against(out1["loss"], ref_ce(logits, labels).mean() + div, [logits, *vecs])
    # w = 1: the contrastive terms have no weight
    assert all(g is None or not g.any() for g in grads(out1["loss"], vecs))
    out0 = L.ccl_total(logits, labels, 0.0, own, peer, *vecs)
    cvl = ref_pg(logits, own, 0.95) + acl + vm
    cml = ref_soft_ce(logits, peer) + cclrl + mm
    check_against(out0["loss"], ((cvl + cml) / 2).mean() + div, [logits, *vecs])
    # per_sample_ce is CE to the noisy label, detached, whatever w
    assert torch.allclose(out0["per_sample_ce"], ref_ce(logits, labels).detach())
    assert not out0["per_sample_ce"].requires_grad


def test_ccl_total_degenerate_batches():
    # all samples one class, no weak prediction above c, N = 1: finite values and gradients
    logits = torch.randn(6, C, requires_grad=True)
    labels = torch.zeros(6, dtype=torch.long)
    flat = torch.full((6, C), 1.0 / C)
    vecs = [torch.rand(6, requires_grad=True) for _ in range(4)]
    out = L.ccl_total(logits, labels, torch.rand(6), flat, flat, *vecs)
    assert torch.equal(out["pg"], torch.zeros(6)) and out["pg_active"] == 0
    g = grads(out["loss"], [logits, *vecs])
    assert all(torch.isfinite(x).all() for x in g)
    one = make(7, n=1)
    logits1, labels1, own1, peer1, w1, vecs1 = one
    out = L.ccl_total(logits1, labels1, w1, own1, peer1, *vecs1, c=0.0)
    check_against(out["loss"], ref_ccl_total(logits1, labels1, w1, own1, peer1, *vecs1, c=0.0, abl=L.Ablation()),
                  [logits1, *vecs1])


def test_ccl_total_half_precision_logits():
    logits, labels, own, peer, w, vecs = make(8)
    out = L.ccl_total(logits.detach().bfloat16(), labels, w.float(), own.float(), peer.float(),
                      *[v.detach().float() for v in vecs])
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_cclrl_classes():
    labels = torch.tensor([0, 1, 2, 3])
    peer = torch.tensor([[0.1, 0.9, 0.0, 0.0]] * 4)
    w = torch.tensor([1.0, 0.0, 0.6, 0.4])
    # w = 1: noisy label; w = 0: peer argmax; otherwise argmax of the mixture (Eq. 10)
    assert L.cclrl_classes(w, labels, peer, 4).tolist() == [0, 1, 2, 1]
    expected = ref_refurbish(w, labels, peer).argmax(-1)
    assert torch.equal(L.cclrl_classes(w, labels, peer, 4), expected)
    assert L.cclrl_classes(w, labels, peer, 4, L.Ablation(no_refurbished=True)).tolist() == [0, 1, 2, 3]


def test_ablation_from_names():
    assert L.Ablation.from_names(["no_mimicry", "no-cml", ""]) == L.Ablation(no_mimicry=True, no_cml=True)
    with pytest.raises(UserError, match="no_such"):
        L.Ablation.from_names(["no_such"])


# ----------------------------------------------------------------------------------------------------------------
# RoLR


def test_rolr_total_matches_reference_and_shares_refurbish(monkeypatch):
    logits, labels, own, peer, w, _ = make(9)
    pseudo = L.rolr_pseudo_label(own, peer, 0.5)
    out = L.rolr_total(logits, labels, w, pseudo)
    ref = ref_soft_ce(logits, ref_refurbish(w, labels, pseudo)).mean() + ref_div(logits)
    check_against(out["loss"], ref, [logits])
    assert torch.allclose(out["per_sample_ce"], ref_ce(logits, labels).detach())
    # RoLR and CCL both go through the one refurbish function
    calls = []
    real = L.refurbish
    monkeypatch.setattr(L, "refurbish", lambda *a, **k: calls.append(1) or real(*a, **k))
    L.rolr_total(logits, labels, w, pseudo)
    L.cclrl_classes(w, labels, peer, C)
    assert len(calls) == 2


def test_rolr_eq2_decomposition_with_t_one():
    """Eq. 2 with T = 1: CE to the refurbished label = w CE(noisy) + (1-w)/2 (CE to own + CE to peer weak)."""
    logits, labels, own, peer, w, _ = make(10)
    out = L.rolr_total(logits, labels, w, L.rolr_pseudo_label(own, peer, T=1.0))
    parts = w * ref_ce(logits, labels) + (1 - w) / 2 * (ref_soft_ce(logits, own) + ref_soft_ce(logits, peer))
    assert torch.allclose(out["soft_ce"], parts)


def test_rolr_w_extremes_and_prior():
    logits, labels, own, peer, _, _ = make(11)
    pseudo = L.rolr_pseudo_label(own, peer)
    out1 = L.rolr_total(logits, labels, 1.0, pseudo)
    assert torch.allclose(out1["loss"], ref_ce(logits, labels).mean() + ref_div(logits))
    out0 = L.rolr_total(logits, labels, torch.zeros(N), pseudo, div_weight=2.0)
    assert torch.allclose(out0["loss"], ref_soft_ce(logits, pseudo).mean() + 2 * ref_div(logits))
    prior = torch.tensor([0.7, 0.1, 0.1, 0.1])
    out = L.rolr_total(logits, labels, 0.5, pseudo, prior)
    assert torch.allclose(out["div"], ref_div(logits, prior))


# ----------------------------------------------------------------------------------------------------------------
# TCL


@pytest.mark.parametrize("n", [1, 2, 5])
def test_infonce_matches_per_anchor_loop(n):
    g = torch.Generator().manual_seed(n)
    z1 = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1).requires_grad_()
    z2 = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1).requires_grad_()
    check_against(L.infonce(z1, z2, 0.25), ref_infonce(z1, z2, 0.25), [z1, z2])
    # symmetric in the two views
    assert torch.allclose(L.infonce(z1, z2), L.infonce(z2, z1))


def test_tcl_cross_supervision_matches_reference():
    logits1, labels, _, _, w, _ = make(12)
    logits2 = torch.randn(N, C, requires_grad=True)
    out = L.tcl_cross_supervision(logits1, logits2, w, labels)
    p1 = torch.stack([torch.stack(ref_softmax(logits1[i])) for i in range(N)]).detach()
    p2 = torch.stack([torch.stack(ref_softmax(logits2[i])) for i in range(N)]).detach()
    ref = ref_soft_ce(logits1, ref_refurbish(w, labels, p2)) + ref_soft_ce(logits2, ref_refurbish(w, labels, p1))
    check_against(out, ref, [logits1, logits2])
    # w = 1 is CE to the noisy label for both views; scale multiplies w
    assert torch.allclose(L.tcl_cross_supervision(logits1, logits2, 1.0, labels),
                          ref_ce(logits1, labels) + ref_ce(logits2, labels))
    assert torch.allclose(L.tcl_cross_supervision(logits1, logits2, w, labels, scale=0.5),
                          L.tcl_cross_supervision(logits1, logits2, w / 2, labels))


@pytest.mark.parametrize("seed", [0, 1])
def test_tcl_entropy_terms_match_reference(seed):
    from ccl.train.losses.tcl import tcl_entropy_terms

    logits, *_ = make(seed)
    ent, ne = tcl_entropy_terms(logits)
    check_against(ent + ne, ref_entropy_reg(logits), [logits])
    # identical rows: mean H(p) = H(mean p), so the two terms cancel
    ent, ne = tcl_entropy_terms(torch.tensor([[30.0, 0, 0, 0]] * 3))
    assert abs((ent + ne).item()) < 1e-9


def test_tcl_cluster_logits_and_align_target():
    logits_mix, labels, own, peer, w, _ = make(13)
    z = torch.nn.functional.normalize(torch.randn(N, 3), dim=1).requires_grad_()
    centres = torch.nn.functional.normalize(torch.randn(C, 3), dim=1).requires_grad_()
    cl = L.tcl_cluster_logits(z, centres, 0.25)
    assert torch.allclose(cl, z @ centres.T / 0.25)
    target = L.tcl_align_target(w, labels, own, peer)
    assert torch.allclose(target, ref_refurbish(w, labels, (own + peer) / 2))
    out = ref_soft_ce(cl, target).sum()
    assert grads(out, [centres])[0] is None  # centres are a fixed buffer
