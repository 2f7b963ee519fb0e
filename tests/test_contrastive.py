"""The contrastive primitive: reference vs a per-anchor loop, fused torch and Triton (interpreted) vs reference,
gradcheck, edge cases, the CCL wrappers, autocast and the benchmark function.

Sizes: torch vs reference over N in {1, 3, 17, 64} x D in {8, 32, 128} x detach_target in float64 (tolerance
1e-9), with small row blocks so several blocks and a ragged last block are exercised. Triton runs in the
interpreter (TRITON_INTERPRET=1, set only around the Triton tests) in float32 over the same grid, with 16 x 16
tiles up to N = 32 and 32 x 32 tiles at N = 64 (tolerance 1e-4; about 10 s of interpreter time in all).
"""

import json

import pytest
import torch
import torch.nn.functional as F

from ccl.errors import UserError
from ccl.train.losses import contrastive
from ccl.train.losses.contrastive import ccl_contrastive, ccl_contrastive_one, pair_losses

NS = (1, 3, 17, 64)
DS = (8, 32, 128)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _embed(k, n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(k, n, d, generator=g, dtype=dtype), dim=-1)  # [K, N, D]
    c = F.normalize(torch.randn(k, n, d, generator=g, dtype=dtype), dim=-1)  # [K, N, D]
    return a.requires_grad_(), c.requires_grad_()


def _classes(k, n, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    classes = torch.randint(0, num_classes, (k, n), generator=g)  # [K, N]
    classes[0] = torch.arange(n)  # the first matrix is ACL-like: the diagonal is the only positive
    return classes


def _values_and_grads(fn, a, c, seed=7):
    """(ce, kl, dA, dC) for a random upstream gradient on both outputs."""
    ce, kl = fn(a, c)
    g = torch.Generator().manual_seed(seed)  # drawn in fp32 so every dtype sees the same weights
    w_ce = torch.randn(ce.shape, generator=g).to(ce.dtype)
    w_kl = torch.randn(kl.shape, generator=g).to(kl.dtype)
    da, dc = torch.autograd.grad((ce * w_ce).sum() + (kl * w_kl).sum(), [a, c])
    return ce.detach(), kl.detach(), da, dc


def _assert_close_all(got, want, atol):
    for name, x, y in zip(("ce", "kl", "dA", "dC"), got, want):
        assert torch.isfinite(x).all(), name
        err = (x.double() - y.double()).abs().max().item()
        assert err <= atol, f"{name}: max error {err:.3g} > {atol}"


def _naive_loop(a, c, classes, tau, detach_target):
    """Per anchor, from the definitions (Eqs. 5, 6, 9, 12), with Python sums over scalars."""
    k_, n, _ = a.shape
    ces, kls = [], []
    for k in range(k_):
        s = [[(a[k, i] * c[k, j]).sum() / tau for j in range(n)] for i in range(n)]
        for i in range(n):
            row = sum(torch.exp(s[i][j]) for j in range(n))
            pos = sum(torch.exp(s[i][j]) for j in range(n) if classes[k, j] == classes[k, i])
            ces.append(-torch.log(pos / row))
            col = sum(torch.exp(s[j][i]) for j in range(n))  # normaliser of q^{w->s} of anchor i
            kl = 0.0
            for j in range(n):
                p = torch.exp(s[i][j]) / row
                p = p.detach() if detach_target else p
                q = torch.exp(s[j][i]) / col
                kl = kl + p * (torch.log(p) - torch.log(q))
            kls.append(kl)
    return torch.stack(ces).view(k_, n), torch.stack(kls).view(k_, n)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: a second thread only adds a barrier per operation, which costs milliseconds each
    when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ct(monkeypatch):
    """The Triton module, with its kernels defined and run by the CPU interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are defined and when they launch
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    from ccl.train.losses import contrastive_triton

    if not contrastive_triton.interpreted():
        pytest.skip("contrastive_triton was imported without TRITON_INTERPRET=1 earlier in this process")
    return contrastive_triton


def _triton(ct, classes, tau=0.5, detach_target=True):
    # Small tiles so that N = 17 and 64 span several tiles (a ragged last one at 17), at bearable interpreter cost.
    return lambda a, c: ct.pair_losses_triton(a, c, classes, tau, detach_target, block=16 if a.shape[1] <= 32 else 32)


def _impl(name, classes, tau=0.5, detach_target=True):
    return lambda a, c: pair_losses(a, c, classes, tau=tau, impl=name, detach_target=detach_target)


# ---------------------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("detach_target", [True, False])
def test_reference_matches_per_anchor_loop(detach_target):
    a, c = _embed(2, 5, 4)
    classes = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 0, 2, 1]])
    want = _values_and_grads(lambda a, c: _naive_loop(a, c, classes, 0.4, detach_target), a, c)
    got = _values_and_grads(_impl("reference", classes, 0.4, detach_target), a, c)
    _assert_close_all(got, want, 1e-12)


def test_reference_soft_graph():
    a, c = _embed(2, 6, 8)
    classes = _classes(2, 6)
    graph = (classes[:, :, None] == classes[:, None, :]).double()  # [K, N, N] a 0/1 graph is the class form
    ce_hard, kl_hard = pair_losses(a, c, classes, impl="reference")
    ce_soft, kl_soft = pair_losses(a, c, graph, impl="auto")  # a graph makes "auto" pick the reference
    torch.testing.assert_close(ce_soft, ce_hard, rtol=0, atol=1e-12)
    torch.testing.assert_close(kl_soft, kl_hard, rtol=0, atol=1e-12)
    # Soft weights: ce = -log(sum_j W_ij exp S_ij / sum_j exp S_ij).
    w = torch.rand(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ce_w, _ = pair_losses(a, c, w, impl="reference")
    s = a.detach() @ c.detach().transpose(1, 2) / 0.5
    want = -torch.log((w * s.exp()).sum(-1) / s.exp().sum(-1))
    torch.testing.assert_close(ce_w, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        pair_losses(a, c, w, impl="torch")


# ---------------------------------------------------------------------------------------------------------------
# fused torch vs reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("detach_target", [True, False])
def test_torch_matches_reference(n, d, detach_target, monkeypatch):
    k = 3
    rows = max(2, n // 5)  # several blocks of anchor rows, the last one shorter
    monkeypatch.setattr(contrastive, "_BLOCK_ELEMENTS", k * n * rows)
    a, c = _embed(k, n, d, seed=n * d)
    classes = _classes(k, n, seed=n)
    want = _values_and_grads(_impl("reference", classes, 0.3, detach_target), a, c)
    got = _values_and_grads(_impl("torch", classes, 0.3, detach_target), a, c)
    _assert_close_all(got, want, 1e-9)


@pytest.mark.parametrize("block_rows", [1, 2, 7])
def test_gradcheck_fused(block_rows):
    a, c = _embed(2, 7, 5)
    classes = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 0, 2, 1, 1, 3]])
    fused = contrastive._FusedPairLosses.apply
    # The full derivative of both outputs (no detached target).
    assert torch.autograd.gradcheck(lambda a, c: fused(a, c, classes, 0.4, False, block_rows), (a, c))
    # With a detached target only ce is the true derivative of its value (the kl one is so by design not);
    # the detached kl gradient is checked against the reference above.
    assert torch.autograd.gradcheck(lambda a, c: fused(a, c, classes, 0.4, True, block_rows)[0], (a, c))


# ---------------------------------------------------------------------------------------------------------------
# Triton (interpreted) vs reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("detach_target", [True, False])
def test_triton_matches_reference(ct, n, d, detach_target):
    k = 3
    a, c = _embed(k, n, d, dtype=torch.float32, seed=n * d)
    classes = _classes(k, n, seed=n)
    want = _values_and_grads(_impl("reference", classes, 0.3, detach_target), a.double(), c.double())
    got = _values_and_grads(_triton(ct, classes, 0.3, detach_target), a, c)
    _assert_close_all(got, want, 1e-4)


def test_triton_through_pair_losses(ct):
    a, c = _embed(2, 20, 24, dtype=torch.float32)  # D = 24 is padded to 32 inside the kernel
    classes = _classes(2, 20)
    want = _values_and_grads(_impl("reference", classes), a, c)
    got = _values_and_grads(_impl("triton", classes), a, c)
    _assert_close_all(got, want, 1e-4)
    with pytest.raises(UserError):
        pair_losses(a.double(), c.double(), classes, impl="triton")  # fp64 is not a Triton input type


# ---------------------------------------------------------------------------------------------------------------
# edge cases, every implementation
# ---------------------------------------------------------------------------------------------------------------


def _edge_case(name, n=12, d=16):
    """(a, c, classes, tau) of one edge case, float64."""
    a, c = _embed(2, n, d, seed=5)
    if name == "n1":
        a, c = _embed(2, 1, d, seed=5)
        return a, c, torch.zeros(2, 1, dtype=torch.int64), 0.5
    if name == "one_class":
        return a, c, torch.zeros(2, n, dtype=torch.int64), 0.5
    if name == "own_class":
        return a, c, torch.stack([torch.arange(n), torch.randperm(n, generator=torch.Generator().manual_seed(0))]), 0.5
    if name == "duplicates":
        with torch.no_grad():
            a[:, 1::2] = a[:, 0::2]
            c[:, 1::2] = c[:, 0::2]
            c[:, :3] = a[:, :3]  # and exact anchor/contrast ties
        return a, c, _classes(2, n), 0.5
    if name in ("tau_0.05", "tau_1"):
        return a, c, _classes(2, n), 0.05 if name == "tau_0.05" else 1.0
    raise ValueError(name)


EDGE_CASES = ("n1", "one_class", "own_class", "duplicates", "tau_0.05", "tau_1")


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_torch(case):
    a, c, classes, tau = _edge_case(case)
    want = _values_and_grads(_impl("reference", classes, tau), a, c)
    got = _values_and_grads(_impl("torch", classes, tau), a, c)
    _assert_close_all(got, want, 1e-9)
    _check_edge_semantics(case, a, c, classes, tau, got)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_triton(ct, case):
    a, c, classes, tau = _edge_case(case)
    a32, c32 = a.detach().float().requires_grad_(), c.detach().float().requires_grad_()
    want = _values_and_grads(_impl("reference", classes, tau), a, c)
    got = _values_and_grads(_triton(ct, classes, tau), a32, c32)
    _assert_close_all(got, want, 1e-4 if tau > 0.1 else 1e-3)  # |S| up to 20 at tau 0.05: fp32 rounding grows
    _check_edge_semantics(case, a32, c32, classes, tau, got, atol=1e-4)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_reference(case):
    a, c, classes, tau = _edge_case(case)
    got = _values_and_grads(_impl("reference", classes, tau), a, c)
    _check_edge_semantics(case, a, c, classes, tau, got)


def _check_edge_semantics(case, a, c, classes, tau, got, atol=1e-12):
    ce, kl, da, dc = got
    assert all(torch.isfinite(x).all() for x in got)
    if case == "n1":  # one anchor: its only contrast is its positive and both distributions are [1]
        assert ce.abs().max() <= atol and kl.abs().max() <= atol
        assert da.abs().max() <= atol and dc.abs().max() <= atol
    if case == "one_class":  # every contrast is a positive: ce = -log 1
        assert ce.abs().max() <= atol
    if case == "own_class":  # unique labels in any order give InfoNCE with the diagonal positive (ACL)
        arange = torch.arange(a.shape[1]).expand(2, -1)
        ce_acl, _ = pair_losses(a.detach(), c.detach(), arange, tau=tau, impl="reference")
        assert (ce.double() - ce_acl.double()).abs().max() <= 10 * atol
    assert (kl >= -10 * atol).all()  # a KL divergence


def test_own_class_cclrl_equals_acl_across_models():
    z = [F.normalize(torch.randn(9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)), dim=-1)
         for i in range(4)]  # fmt: skip
    unique = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    out = ccl_contrastive(*z, unique, unique.flip(0), impl="torch")
    acl_cross, mm_cross = pair_losses(torch.stack([z[0], z[2]]), torch.stack([z[3], z[1]]),
                                      torch.arange(9).expand(2, -1), impl="reference")  # fmt: skip
    torch.testing.assert_close(out["cclrl0"], acl_cross[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["cclrl1"], acl_cross[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["mm0"], mm_cross[0], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# CCL wrappers
# ---------------------------------------------------------------------------------------------------------------


def _views(n=10, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    return [F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_() for _ in range(4)]


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_ccl_contrastive_matrices(impl):
    z0s, z0w, z1s, z1w = _views()
    y0, y1 = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]), torch.tensor([1, 1, 0, 0, 2, 2, 1, 0, 2, 1])
    out = ccl_contrastive(z0s, z0w, z1s, z1w, y0, y1, tau=0.3, impl=impl)
    assert sorted(out) == sorted(["acl0", "acl1", "vm0", "vm1", "cclrl0", "cclrl1", "mm0", "mm1"])
    arange = torch.arange(10)[None]
    for (anchor, contrast, cls), (ce_key, kl_key) in [
        ((z0s, z0w, arange), ("acl0", "vm0")),
        ((z1s, z1w, arange), ("acl1", "vm1")),
        ((z0s, z1w, y0[None]), ("cclrl0", "mm0")),
        ((z1s, z0w, y1[None]), ("cclrl1", "mm1")),
    ]:
        ce, kl = pair_losses(anchor[None], contrast[None], cls, tau=0.3, impl="reference")
        assert out[ce_key].shape == (10,)
        torch.testing.assert_close(out[ce_key], ce[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[kl_key], kl[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_ccl_contrastive_detach_peer(impl):
    z0s, z0w, z1s, z1w = _views()
    y = torch.arange(10) % 3
    out = ccl_contrastive(z0s, z0w, z1s, z1w, y, y, impl=impl)
    model0 = out["acl0"] + out["vm0"] + out["cclrl0"] + out["mm0"]
    grads = torch.autograd.grad(model0.sum(), [z0s, z0w, z1s, z1w], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is not None and grads[1].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for g in grads[2:]), "model 0's losses reached model 1"
    # Without detach_peer the cross matrix S_01 = z0s z1w^T sends gradient to z1w.
    out = ccl_contrastive(z0s, z0w, z1s, z1w, y, y, impl=impl, detach_peer=False)
    model0 = out["acl0"] + out["vm0"] + out["cclrl0"] + out["mm0"]
    (g_z1w,) = torch.autograd.grad(model0.sum(), [z1w])
    assert g_z1w.abs().sum() > 0


def test_ccl_contrastive_one_matches_joint():
    z0s, z0w, z1s, z1w = _views()
    y0 = torch.arange(10) % 4
    joint = ccl_contrastive(z0s, z0w, z1s, z1w, y0, y0, impl="torch")
    one = ccl_contrastive_one(z0s, z0w, z1w, y0, impl="torch")
    for key in ("acl", "vm", "cclrl", "mm"):
        torch.testing.assert_close(one[key], joint[key + "0"], rtol=0, atol=1e-12)
    sum(one.values()).sum().backward()
    assert z1w.grad is None  # the peer is fixed in the alternate schedule


@pytest.mark.parametrize("other", ["torch", "triton"])
def test_swapping_impl_in_a_ccl_step_keeps_loss_and_grads(other, request):
    """A tiny two-model CCL step: per-sample (1 - w) / 2 weights on the contrastive terms, as in Eq. 15."""
    dtype = torch.float64 if other == "torch" else torch.float32
    if other == "triton":
        request.getfixturevalue("ct")
    nets = [torch.nn.Linear(6, 8, dtype=dtype) for _ in range(2)]
    for i, net in enumerate(nets):
        torch.nn.init.normal_(net.weight, generator=torch.Generator().manual_seed(i))
    g = torch.Generator().manual_seed(5)
    x_w, x_s = torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 6, generator=g, dtype=dtype)
    w = torch.rand(16, generator=g, dtype=dtype)  # per-sample label confidence
    y0, y1 = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (16,), generator=g)

    def step(impl):
        for net in nets:
            net.zero_grad()
        z = [F.normalize(net(x), dim=-1) for net in nets for x in (x_s, x_w)]  # z0s, z0w, z1s, z1w
        out = ccl_contrastive(*z, y0, y1, impl=impl)
        loss = sum(((1 - w) / 2 * (out[f"acl{m}"] + out[f"vm{m}"] + out[f"cclrl{m}"] + out[f"mm{m}"])).mean()
                   for m in (0, 1))  # fmt: skip
        loss.backward()
        return loss.detach(), [p.grad.clone() for net in nets for p in net.parameters()]

    ref_loss, ref_grads = step("reference")
    loss, grads = step(other)
    atol = 1e-9 if other == "torch" else 1e-4
    assert abs(loss.item() - ref_loss.item()) <= atol
    for got, want in zip(grads, ref_grads):
        assert (got - want).abs().max().item() <= atol


# ---------------------------------------------------------------------------------------------------------------
# precision, dispatch, validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_bf16_autocast_close_to_fp32(impl):
    a, c = _embed(4, 32, 16, dtype=torch.float32)
    classes = _classes(4, 32)
    want = _values_and_grads(_impl(impl, classes), a, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, kl = pair_losses(a, c, classes, impl=impl)
    assert ce.dtype == kl.dtype == torch.float32
    got = _values_and_grads(lambda a, c: (ce, kl), a, c)
    assert got[2].dtype == got[3].dtype == torch.float32  # gradients in the inputs' dtype
    # bf16 rounds the inputs to ~3 significant digits; the fp32 accumulation keeps the rest close.
    for x, y in zip(got, want):
        assert (x - y).abs().max().item() < 3e-2
    # fused and reference agree under autocast, as both take the same bf16-rounded inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce_ref, _ = pair_losses(a, c, classes, impl="reference")
    assert (ce.detach() - ce_ref.detach()).abs().max().item() < 1e-5


def test_bf16_inputs_give_bf16_grads():
    a, c = _embed(2, 16, 8, dtype=torch.bfloat16)
    ce, kl = pair_losses(a, c, _classes(2, 16), impl="torch")
    assert ce.dtype == torch.float32
    (ce.sum() + kl.sum()).backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad.float()).all()


def test_auto_picks_torch_on_cpu(monkeypatch):
    called = []
    monkeypatch.setattr(contrastive._FusedPairLosses, "apply", lambda *args: called.append(1) or (None, None))
    a, c = _embed(1, 4, 8)
    pair_losses(a, c, torch.arange(4)[None], impl="auto")
    assert called


@pytest.mark.parametrize(
    "kwargs",
    [
        {"impl": "cuda"},
        {"tau": 0.0},
        {"tau": float("nan")},
        {"classes": torch.zeros(2, 5, dtype=torch.int64)},
        {"c": torch.zeros(1, 4, 7)},
    ],
)
def test_invalid_inputs_are_refused(kwargs):
    # The config validates every option a user sets, so a bad argument here is a caller's bug: a ValueError.
    args = {"a": torch.zeros(1, 4, 8), "c": torch.zeros(1, 4, 8), "classes": torch.zeros(1, 4, dtype=torch.int64)}
    args.update(kwargs)
    with pytest.raises(ValueError):
        pair_losses(**args)


# ---------------------------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------------------------


def test_bench_kernel_smoke(tmp_path):
    from rich.console import Console

    from ccl.bench.kernel import bench_kernel

    out = tmp_path / "bench.json"
    rows = bench_kernel(ns=(32,), d=16, repeats=1, json_path=out, console=Console(file=None, quiet=True))
    assert [r["impl"] for r in rows] == ["reference", "torch"]
    assert all(r["time_ms"] > 0 and r["peak_extra_mib"] is not None and r["peak_extra_mib"] >= 0 for r in rows)
    assert rows[0]["time_x_ref"] == 1.0
    assert json.loads(out.read_text())["rows"][1]["impl"] == "torch"
