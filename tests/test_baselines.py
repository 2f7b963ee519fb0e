"""RoLR and TCL as their official code runs them (chenmc1996/Robust-LR, Hzzone/TCL): each new piece against a
naive reference written from the code (values and gradients, float64), the schedules and state of the two methods,
TCL's heads, and short digits runs."""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

from ccl.model.heads import TCLNet
from ccl.train import losses as L
from ccl.train.config import RoLRConfig, TCLConfig, TrainConfig
from ccl.train.losses.tcl import (clean_fraction, tcl_code_confidence, tcl_confidence_per_class, tcl_entropy_terms,
                                  tcl_total)
from ccl.train.methods import Rng, build_method

N, C, D = 4, 3, 5


def check(impl, ref, inputs, tol=1e-10):
    """Values equal, and the gradients of a random projection of both equal, for every input."""
    assert torch.allclose(impl, ref, atol=tol, rtol=tol), (impl, ref)
    proj = torch.randn(impl.shape, generator=torch.Generator().manual_seed(1))
    gi = torch.autograd.grad((impl * proj).sum(), inputs, retain_graph=True, allow_unused=True)
    gr = torch.autograd.grad((ref * proj).sum(), inputs, retain_graph=True, allow_unused=True)
    for a, b in zip(gi, gr):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        assert torch.allclose(a, b, atol=tol, rtol=tol), (a, b)


# ----------------------------------------------------------------------------------------------------------------
# naive references, one sample and one class at a time, written from the official code


def ref_log_softmax(row):
    """row: 1-d tensor -> list of 0-d tensors log p_j."""
    log_total = torch.log(sum(torch.exp(v) for v in row))
    return [row[j] - log_total for j in range(len(row))]


def ref_soft_ce_mean(logits, target):
    """SoftCELoss of RoLR.py l.60-64 / CE of tcl_wrapper.py l.119-120: -mean_i sum_j t_ij log p_ij."""
    return -sum(sum(float(target[i][j]) * ref_log_softmax(logits[i])[j] for j in range(logits.shape[1]))
                for i in range(logits.shape[0])) / logits.shape[0]


def ref_probs(logits):
    return torch.tensor([[float(torch.exp(v).detach()) for v in ref_log_softmax(logits[i])] for i in range(len(logits))])


def ref_rolr_step(outputs_s, labels, w, p1, p2, T, lambda_p):
    """RoLR.py l.122-138 for one batch: probs = (p1 + p2) / 2, probs ** T normalised, target = onehot w +
    (1 - w) probs_T, loss = softCE + lambda_p * sum(prior * log(prior / pred_mean))."""
    n, c = outputs_s.shape
    target = torch.zeros(n, c)
    for i in range(n):
        q = [((float(p1[i][j]) + float(p2[i][j])) / 2) ** T for j in range(c)]
        for j in range(c):
            target[i, j] = float(w[i]) * (1.0 if j == int(labels[i]) else 0.0) + (1 - float(w[i])) * q[j] / sum(q)
    probs = [[torch.exp(v) for v in ref_log_softmax(outputs_s[i])] for i in range(n)]
    penalty = sum((1 / c) * torch.log((1 / c) / (sum(probs[i][j] for i in range(n)) / n)) for j in range(c))
    return ref_soft_ce_mean(outputs_s, target) + lambda_p * penalty


def ref_infonce(z1, z2, temp):
    """utils/infonce.py InstanceLoss: per anchor CE of [positive, negatives] at target 0, summed, / 2N."""
    z = torch.cat([z1, z2])
    n2, n = len(z), len(z1)
    total = 0.0
    for a in range(n2):
        pos = a + n if a < n else a - n
        row = [torch.dot(z[a], z[pos]) / temp] + [torch.dot(z[a], z[k]) / temp for k in range(n2) if k not in (a, pos)]
        total = total - ref_log_softmax(torch.stack(row))[0]
    return total / n2


def ref_tcl_step(l1, l2, lm, z1, z2, zm, labels, w, centres, lam, perm, temp, s1, s2):
    """tcl.py l.80-84 with unit weights, over tcl_wrapper.py l.89-131 and l.79-84 (the non-warm-up branch)."""
    n, c = l1.shape
    p1, p2 = ref_probs(l1), ref_probs(l2)
    onehot = torch.zeros(n, c)
    for i in range(n):
        onehot[i, int(labels[i])] = 1.0

    def comb(a, b, lam_):  # tcl_wrapper.py l.105-106
        return (1 - lam_) * a + lam_ * b

    ws1, ws2 = (w * s1)[:, None], (w * s2)[:, None]
    t1, t2 = comb(p2, onehot, ws1), comb(p1, onehot, ws1)
    tm = comb((p1 + p2) * 0.5, onehot, ws2).repeat(3, 1)
    tm = comb(tm[perm], tm, lam)
    cls1 = ref_soft_ce_mean(l1, t1) + ref_soft_ce_mean(l2, t2)
    cls2 = ref_soft_ce_mean(lm, tm)
    align = ref_soft_ce_mean(torch.stack([torch.stack([torch.dot(zm[i], centres[k]) / temp for k in range(c)])
                                          for i in range(len(zm))]), tm)
    allp = torch.cat([l1, l2, lm])
    probs = [[torch.exp(v) for v in ref_log_softmax(allp[i])] for i in range(len(allp))]
    ent = -sum(sum(p * torch.log(p) for p in row) for row in probs) / len(allp)
    pbar = [sum(probs[i][j] for i in range(len(allp))) / len(allp) for j in range(c)]
    ne = sum(p * torch.log(p) for p in pbar)
    return ref_infonce(z1, z2, temp) + (cls1 + cls2) + ent + ne + align


def tcl_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    l1, l2 = (torch.randn(N, C, generator=g) * 2).requires_grad_(), (torch.randn(N, C, generator=g) * 2).requires_grad_()
    lm = (torch.randn(3 * N, C, generator=g) * 2).requires_grad_()
    z1, z2 = F.normalize(torch.randn(N, D, generator=g), dim=1), F.normalize(torch.randn(N, D, generator=g), dim=1)
    zm = F.normalize(torch.randn(3 * N, D, generator=g), dim=1)
    z1, z2, zm = z1.requires_grad_(), z2.requires_grad_(), zm.requires_grad_()
    labels = torch.randint(0, C, (N,), generator=g)
    w = torch.rand(N, generator=g)
    centres = F.normalize(torch.randn(C, D, generator=g), dim=1)
    perm = torch.randperm(3 * N, generator=g)
    return l1, l2, lm, z1, z2, zm, labels, w, centres, 0.7, perm


# ----------------------------------------------------------------------------------------------------------------
# RoLR


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_rolr_code_target_raises_to_t_not_one_over_t(float64, T):
    g = torch.Generator().manual_seed(0)
    p1, p2 = torch.softmax(torch.randn(N, C, generator=g) * 3, -1), torch.softmax(torch.randn(N, C, generator=g), -1)
    mean = (p1 + p2) / 2
    ref = torch.tensor([[float(mean[i, j]) ** T / sum(float(mean[i, k]) ** T for k in range(C)) for j in range(C)]
                        for i in range(N)])
    out = L.rolr_code_pseudo_label(p1, p2, T)
    assert torch.allclose(out, ref) and not out.requires_grad
    if T == 1.0:  # the README's T: no sharpening at all
        assert torch.allclose(out, mean)
    # the paper's Eq. 1 is the same map with 1/T
    assert torch.allclose(L.rolr_pseudo_label(p1, p2, 1 / T), out)
    # large exponents stay finite (computed in log space)
    assert torch.isfinite(L.rolr_code_pseudo_label(p1, p2, 500.0)).all()


@pytest.mark.parametrize("T,lambda_p", [(1.0, 2.0), (2.0, 1.0)])
def test_rolr_code_step_matches_robust_lr(float64, T, lambda_p):
    g = torch.Generator().manual_seed(3)
    outputs_s = (torch.randn(N, C, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, C, (N,), generator=g)
    w = torch.rand(N, generator=g)
    p1, p2 = torch.softmax(torch.randn(N, C, generator=g), -1), torch.softmax(torch.randn(N, C, generator=g), -1)
    out = L.rolr_total(outputs_s, labels, w, L.rolr_code_pseudo_label(p1, p2, T), div_weight=lambda_p)
    check(out["loss"], ref_rolr_step(outputs_s, labels, w, p1, p2, T, lambda_p), [outputs_s])


def rolr_method(**rolr):
    cfg = TrainConfig(method="rolr", arch="resnet_tiny", warmup=1, rolr=RoLRConfig(**rolr)).validate()
    return build_method(cfg, num_classes=C, num_train=40, arch="resnet_tiny", small_input=True)


def code_gmm(x, seed):
    """RoLR.py l.279 and l.210-212: the GMM fitted to the values as given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed).fit(x[:, None])
    return gmm.predict_proba(x[:, None])[:, gmm.means_.argmin()]


def test_rolr_loss_history_averages_the_last_k_normalised_epochs():
    method = rolr_method(loss_history=3)
    rng = np.random.default_rng(0)
    epochs = []
    for e in range(5):  # more refreshes than slots: the ring keeps the last three
        clean = rng.normal(0.5 + e, 0.2, (2, 25))
        noisy = rng.normal(3.0 + 2 * e, 0.5, (2, 15))
        epochs.append(torch.tensor(np.concatenate([clean, noisy], axis=1), dtype=torch.float32))
        w = method.confidence_from_losses(epochs[-1])
        assert int(method.history_count) == e + 1
    normalised = [(x - x.min(1, keepdim=True).values) / (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values)
                  for x in epochs]
    mean = torch.stack(normalised[-3:]).mean(0).numpy()  # [2, 40]: RoLR.py's history[-5:].mean(0), with k = 3
    # net 0's w from net 1's losses and the reverse (RoLR.py l.293-304), each the code's fit of the mean
    assert np.allclose(w[0].numpy(), code_gmm(mean[1], 0), atol=1e-5)
    assert np.allclose(w[1].numpy(), code_gmm(mean[0], 0), atol=1e-5)
    assert w[:, :25].mean() > 0.9 and w[:, 25:].mean() < 0.1
    # the history is per-sample state that checkpoints
    state = method.state_dict()
    assert state["loss_history"].shape == (2, 3, 40) and int(state["history_count"]) == 5
    # with k = 1 the GMM sees this epoch's losses alone
    one = rolr_method(loss_history=1)
    one.confidence_from_losses(epochs[0])
    w1 = one.confidence_from_losses(epochs[1])
    assert np.allclose(w1[0].numpy(), code_gmm(normalised[1][1].numpy(), 0), atol=1e-5)


def test_rolr_fits_the_trained_samples_only():
    method = rolr_method()
    rng = np.random.default_rng(1)
    losses = torch.tensor(np.concatenate([rng.normal(0.5, 0.2, (2, 25)), rng.normal(3.0, 0.5, (2, 15))], axis=1),
                          dtype=torch.float32)
    losses[:, :5] = 50.0  # held-out samples with huge losses: they must neither stretch the scale nor get a w
    method.active[:5] = False
    w = method.confidence_from_losses(losses)
    assert torch.equal(w[:, :5], torch.ones(2, 5))
    x = losses[1, 5:]
    assert np.allclose(w[0, 5:].numpy(), code_gmm(((x - x.min()) / (x.max() - x.min())).numpy(), 0), atol=1e-5)


def test_rolr_constant_losses_trust_every_label():
    method = rolr_method()
    assert torch.equal(method.confidence_from_losses(torch.full((2, 40), 0.3)), torch.ones(2, 40))


def test_rolr_schedule_reads_the_data_twice_per_net():
    method = rolr_method()  # warm-up 1: epoch 0 warms up, epoch 1 trains
    # warm-up: each net in a pass of its own (RoLR.py l.263-273)
    assert method.passes(0) == 2 and [method.training_nets(0, p) for p in range(2)] == [(0,), (1,)]
    assert method.views(0) == ("weak",)
    method.cfg = replace(method.cfg, schedule="alternate")
    assert method.passes(1) == 4 and [method.training_nets(1, p) for p in range(4)] == [(0,), (0,), (1,), (1,)]
    method.cfg = replace(method.cfg, schedule="joint")
    assert method.passes(1) == 2 and method.training_nets(1, 1) == (0, 1)
    method.cfg = replace(method.cfg, rolr=replace(method.cfg.rolr, passes_per_net=1), schedule="alternate")
    assert method.passes(1) == 2 and method.training_nets(1, 1) == (1,)


def test_rolr_defaults_are_the_readme_command():
    cfg = RoLRConfig()
    assert (cfg.variant, cfg.temperature(), cfg.lambda_p, cfg.confidence_view) == ("code", 1.0, 2.0, "weak")
    assert RoLRConfig(variant="paper").temperature() == 0.5 and RoLRConfig(sharpen_t=3).temperature() == 3
    assert type(rolr_method()).default_warmup == 15


def test_rolr_weak_view_carries_no_gradient_and_each_view_has_its_own_batch_statistics():
    method = rolr_method()
    g = torch.Generator().manual_seed(0)
    weak, strong = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g) * 3 + 1
    out = method.forward_views(0, weak, strong)
    assert not out["logits_w"].requires_grad and out["logits_s"].requires_grad
    # the strong view alone in train mode: the weak images take no part in its BatchNorm statistics
    assert torch.allclose(out["logits_s"], method.nets[0](strong)[0].float(), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# TCL: the objective


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.6, 0.3)])
def test_tcl_total_matches_the_official_objective(float64, scales):
    inputs = tcl_inputs(0)
    l1, l2, lm, z1, z2, zm, labels, w, centres, lam, perm = inputs
    out = tcl_total(*inputs, temp=0.25, scale1=scales[0], scale2=scales[1])
    ref = ref_tcl_step(*inputs, 0.25, *scales)
    check(out["loss"], ref, [l1, l2, lm, z1, z2, zm])
    parts = sum(out[k].detach() for k in ("ctr", "cross", "mix_ce", "ent", "ne", "align"))
    assert math.isclose(float(out["loss"].detach()), float(parts), rel_tol=1e-12)
    # a device-scalar scale (the clean-fraction buffer) gives the same as the float
    as_tensor = tcl_total(*inputs, temp=0.25, scale1=torch.tensor(scales[0]), scale2=torch.tensor(scales[1]))
    assert torch.allclose(as_tensor["loss"], out["loss"])


def test_tcl_weights_reach_their_terms(float64):
    inputs = tcl_inputs(1)
    base = tcl_total(*inputs)
    doubled = {"ctr_weight": "ctr", "ent_weight": "ent", "ne_weight": "ne", "align_weight": "align"}
    for weight, part in doubled.items():
        assert torch.allclose(tcl_total(*inputs, **{weight: 2.0})["loss"], base["loss"] + base[part])
    assert torch.allclose(tcl_total(*inputs, cls_weight=2.0)["loss"], base["loss"] + base["cross"] + base["mix_ce"])


def test_tcl_warmup_loss_at_w_one_is_the_codes_warmup_branch(float64):
    """tcl_wrapper.py l.122-126: hard CE of both views, and the mixed one-hot labels for the mixed batch and the
    cluster posterior. tcl_total with w = 1 and unit scales is that loss."""
    l1, l2, lm, z1, z2, zm, labels, w, centres, lam, perm = tcl_inputs(2)
    out = tcl_total(l1, l2, lm, z1, z2, zm, labels, torch.ones(N), centres, lam, perm, temp=0.25)
    onehot = F.one_hot(labels, C).double().repeat(3, 1)
    mixed = lam * onehot + (1 - lam) * onehot[perm]
    cls1 = F.cross_entropy(l1, labels) + F.cross_entropy(l2, labels)
    cls2 = ref_soft_ce_mean(lm, mixed)
    align = ref_soft_ce_mean(zm @ centres.T / 0.25, mixed)
    ent, ne = tcl_entropy_terms(torch.cat([l1, l2, lm]))
    check(out["loss"], ref_infonce(z1, z2, 0.25) + cls1 + cls2 + ent + ne + align, [l1, l2, lm, z1, z2, zm])
    # w = 1 makes the scales irrelevant: every target is the label
    other = tcl_total(l1, l2, lm, z1, z2, zm, labels, torch.ones(N), centres, lam, perm, scale1=1.0, scale2=1.0)
    assert torch.allclose(other["loss"], out["loss"])


def test_tcl_entropy_terms_split_the_regulariser(float64):
    logits = torch.randn(7, C, generator=torch.Generator().manual_seed(4)).requires_grad_()
    ent, ne = tcl_entropy_terms(logits)
    p = ref_probs(logits)
    assert math.isclose(float(ent.detach()), float(-(p * p.log()).sum(1).mean()), rel_tol=1e-10)
    assert math.isclose(float(ne.detach()), float((p.mean(0) * p.mean(0).log()).sum()), rel_tol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# TCL: the label confidence


def clustered(seed=0, n_per_class=60, classes=3, dim=8):
    """Embeddings in tight class clusters, with a fifth of the labels moved to the next class."""
    g = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    clean = torch.arange(classes).repeat_interleave(n_per_class)
    emb = F.normalize(centre[clean] + 0.15 * torch.randn(len(clean), dim, generator=g), dim=1)
    probs = F.one_hot(clean, classes).float() * 0.9 + 0.1 / classes
    noisy = clean.clone()
    flip = torch.rand(len(clean), generator=g) < 0.2
    noisy[flip] = (clean[flip] + 1) % classes
    return emb, probs, noisy, clean


def test_sep_gmm_fits_one_gmm_per_class_on_globally_normalised_losses():
    emb, probs, noisy, clean = clustered()
    w = tcl_confidence_per_class(emb, probs, noisy, 0.25, seed=0)
    # tcl.py l.202-218, step by step
    centres = F.normalize(probs.T @ emb, dim=1)
    loss = -torch.softmax(emb @ centres.T / 0.25, dim=1)[torch.arange(len(noisy)), noisy]
    loss = ((loss - loss.min()) / (loss.max() - loss.min())).double().numpy()[:, None]
    ref = np.zeros(len(noisy))
    for c in range(3):
        mask = noisy.numpy() == c
        gm = GaussianMixture(n_components=2, random_state=0).fit(loss[mask])
        ref[mask] = gm.predict_proba(loss[mask])[:, np.argmin(gm.means_)]
    assert np.allclose(w, ref, atol=1e-4)
    is_clean = (noisy == clean).numpy()
    assert w[is_clean].mean() > 0.8 and w[~is_clean].mean() < 0.2
    assert np.isclose(clean_fraction(w), (w > 0.5).mean())
    # one GMM over every sample without sep_gmm
    single = tcl_code_confidence(emb, probs, noisy, 0.25, per_class=False, seed=0)
    gm = GaussianMixture(n_components=2, random_state=0).fit(loss)
    assert np.allclose(single, gm.predict_proba(loss)[:, np.argmin(gm.means_)], atol=1e-4)


def test_sep_gmm_keeps_a_class_it_cannot_fit():
    emb, probs, noisy, _ = clustered()
    noisy[0] = 3  # a class with one sample
    probs = torch.cat([probs, torch.zeros(len(probs), 1)], dim=1)
    assert tcl_confidence_per_class(emb, probs, noisy, seed=0)[0] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# TCL: the network and the method


@pytest.mark.parametrize("arch,width", [("resnet_tiny", 32), ("resnet18", 512)])
def test_tcl_heads_are_the_official_ones(arch, width):
    net = TCLNet(arch, num_classes=10)
    kinds = [type(m).__name__ for m in net.classifier]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d"]
    assert [type(m).__name__ for m in net.head] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert (net.classifier[0].in_features, net.classifier[0].out_features, net.classifier[4].out_features) == \
        (width, width, 10)
    assert net.classifier[3].p == 0.25 and net.classifier[5].num_features == 10
    assert (net.head[0].in_features, net.head[3].out_features, net.head[4].num_features) == (width, 256, 256)
    if arch == "resnet_tiny":
        logits, z = net(torch.randn(6, 3, 16, 16))
        assert logits.shape == (6, 10) and z.shape == (6, 256) and z.dtype == torch.float32
        assert torch.allclose(z.norm(dim=1), torch.ones(6), atol=1e-5)


def tcl_method(**tcl):
    cfg = TrainConfig(method="tcl", arch="resnet_tiny", warmup=1, amp=False, tcl=TCLConfig(**tcl)).validate()
    return build_method(cfg, num_classes=C, num_train=40, arch="resnet_tiny", small_input=True)


def tcl_batch(n=6, seed=0):
    from ccl.pipeline.batch import Batch

    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(40, generator=g)[:n]
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, C, (n,), generator=g)
    views = tuple(torch.randn(n, 3, 16, 16, generator=g) for _ in range(3))  # weak, view 1, view 2
    return Batch(images=images, label=labels, index=index, clean=labels.clone()), views


def run_step(method, batch, views, epoch, seed=5):
    torch.manual_seed(seed)  # the classifier's dropout
    return method(batch, views, epoch, 0, Rng(torch.Generator().manual_seed(seed), random.Random(seed)))


def test_tcl_warmup_is_the_full_loss_at_w_one():
    method = tcl_method(scale1=1.0, scale2=1.0)
    batch, views = tcl_batch()
    assert method.views(0) == ("weak", "contrastive", "contrastive") and method.warming_up(0)
    warm = run_step(method, batch, views, epoch=0)
    method.w.fill_(1.0)
    after = run_step(method, batch, views, epoch=1)
    assert not method.warming_up(1) and torch.allclose(warm.loss, after.loss) and warm.names == after.names
    # with a real w the loss differs, and the warm-up ignores w
    method.w.uniform_(generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(run_step(method, batch, views, epoch=1).loss, warm.loss)
    assert torch.allclose(run_step(method, batch, views, epoch=0).loss, warm.loss)
    # the paper's reading: plain CE on the weak view
    ce = tcl_method(warmup_loss="ce")
    assert ce.views(0) == ("weak",) and run_step(ce, batch, views[:1], epoch=0).names == ("loss", "ce0")


def test_tcl_unset_scales_use_the_clean_fraction_buffer():
    method = tcl_method()
    batch, views = tcl_batch()
    method.w.uniform_(generator=torch.Generator().manual_seed(1))
    method.clean_fraction.fill_(0.4)
    unset = run_step(method, batch, views, epoch=1)
    method.cfg = replace(method.cfg, tcl=replace(method.cfg.tcl, scale1=0.4, scale2=0.4))
    assert torch.allclose(run_step(method, batch, views, epoch=1).loss, unset.loss)
    method.cfg = replace(method.cfg, tcl=replace(method.cfg.tcl, scale1=1.0, scale2=1.0))
    assert not torch.allclose(run_step(method, batch, views, epoch=1).loss, unset.loss)
    assert {"centres", "clean_fraction", "w"} <= set(method.state_dict())


def test_tcl_refresh_sets_centres_confidence_and_clean_fraction():
    method = tcl_method(sep_gmm=True)
    assert method.refresh_view(0) == "eval"  # every epoch, warm-up included
    batches = []
    for s in range(0, 40, 8):
        batch, _ = tcl_batch(8, seed=s)
        batch = replace(batch, index=torch.arange(s, s + 8))
        batches.append((batch, torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(s))))
    method.active[:8] = False  # the first batch is held out for validation
    method.refresh(batches)
    assert torch.allclose(method.centres.norm(dim=1), torch.ones(C), atol=1e-5)
    assert torch.equal(method.w[0, :8], torch.ones(8))
    assert math.isclose(float(method.clean_fraction), float((method.w[0, 8:] > 0.5).float().mean()), rel_tol=1e-6)
    assert bool(method.has_w)


# ----------------------------------------------------------------------------------------------------------------
# short digits runs


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["rolr", "tcl"])
def test_a_few_digits_epochs_beat_chance_clearly(digits, tmp_path, method):
    from ccl.train.loop import train

    cfg = TrainConfig(data=str(digits), method=method, arch="resnet_tiny", epochs=5, warmup=2, batch_size=64,
                      lr=3e-3, workers=0, out=str(tmp_path), name="run")
    summary = train(cfg, progress=False)
    hist = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print(method, [(r["ens_top1"], r["epoch_time"]) for r in hist], summary.get("auroc"))
    # Chance is 10%; 40% of the training labels are wrong.
    assert max(r["ens_top1"] for r in hist) > 30, [r["ens_top1"] for r in hist]
    assert all(math.isfinite(r["train_loss"]) for r in hist)
