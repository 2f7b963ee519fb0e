"""The contrastive losses of CCL behind one primitive: ACL (Eq. 5), VM (Eq. 6), CCLRL (Eq. 9) and MM (Eq. 12).

All four are functions of a similarity matrix S = A C^T / tau between anchors A (strong views) and contrasts C
(weak views). For each anchor row i of each matrix k of a stack of K matrices, `pair_losses` returns

    ce[k, i] = -log( sum_{j: classes[k, j] == classes[k, i]} exp S[i, j] / sum_j exp S[i, j] )     (Eqs. 5 and 9)
    kl[k, i] = KL( softmax_row(S)[i] || softmax_row(S^T)[i] )                                     (Eqs. 6 and 12)

With classes = arange(N) the ce is InfoNCE with the diagonal as the positive (ACL); with refurbished labels it is
CCLRL. softmax_row(S)[i] is q^{s->w} of anchor i; softmax_row(S^T)[i], i.e. exp S[j, i] / sum_l exp S[l, i] over j,
is q^{w->s}: the KL mimics one contrastive distribution with the other.

Three implementations compute the same numbers (`impl`):
- "reference": plain PyTorch straight from the equations; it materialises the [K, N, N] matrices (ground truth).
- "torch": a custom autograd Function over blocks of anchor rows. Peak memory is O(K * block * N) instead of
  O(K * N^2): the forward keeps only per-anchor statistics (row, column and positive log-sum-exps and the KL) and
  the backward recomputes each block of S to build dS.
- "triton": flash-attention style kernels (GPU; on CPU only with TRITON_INTERPRET=1), see `contrastive_triton`.
"auto" picks "triton" for CUDA tensors (fp32/bf16/fp16, D <= 256) when triton is importable, and "torch"
otherwise. The fused versions give first derivatives only (no double backward).

Precision: the inputs are cast once to the working dtype (the autocast dtype when autocast is on, else their own),
the products are accumulated and every log-sum-exp is taken in fp32 (fp64 for fp64 inputs), and the losses are
returned in fp32 (fp64). Gradients come back in the inputs' dtype. "reference" and "torch" multiply the
bf16/fp16-rounded values in fp32, as a tensor core with fp32 accumulation does, so on CPU bf16 saves no time.

The gradient of the fused versions, per matrix, with P = softmax_row(S) (P_ij = exp(S_ij - r_i)), column
log-sum-exp c_j = logsumexp_i S_ij, Qc_ij = exp(S_ij - c_j), positive log-sum-exp p_i and upstream gradients
g_ce, g_kl:

    dS_ij = g_ce_i (P_ij - [j positive for i] exp(S_ij - p_i))         ce_i = r_i - p_i
          + g_kl_j (Qc_ij - P_ji)                                      KL through log q^{w->s}: couples S_ij, S_ji
          + g_kl_i P_ij (S_ij - r_i - S_ji + c_i - kl_i)               only without detach_target (through P)

and dA = dS C / tau, dC = dS^T A / tau.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch


IMPLS = ("auto", "reference", "torch", "triton")

# Rows per block of the fused torch version: at most _BLOCK_ELEMENTS / (K * N) (2^24 fp32 values = 64 MiB per
# [K, B, N] buffer; 4 buffers live in the backward), and at most max(256, N / 4) so large batches keep their
# memory a small fraction of one [K, N, N] matrix. Smaller blocks mean more operations, and on a busy CPU every
# multi-threaded operation can wait milliseconds at its barrier: 2^21 measured several times slower than 2^23.
_BLOCK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def pair_losses(
    a: torch.Tensor,
    c: torch.Tensor,
    classes: torch.Tensor,
    tau: float = 0.5,
    impl: str = "auto",
    detach_target: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor contrastive CE and mimicry KL of a stack of similarity matrices S_k = a_k c_k^T / tau.

    Args:
        a: anchors [K, N, D], rows L2-normalised (strong views).
        c: contrasts [K, N, D], rows L2-normalised (weak views).
        classes: int64 [K, N]: j is a positive of anchor i in matrix k when classes[k, j] == classes[k, i]
            (arange(N) gives InfoNCE with the diagonal positive, Eq. 5; refurbished labels give CCLRL, Eq. 9).
            Alternatively a float [K, N, N] soft positive graph W (CoMatch-style, "reference" only, which "auto"
            then picks): ce[k, i] = -log(sum_j W[k, i, j] exp S[i, j] / sum_j exp S[i, j]); a 0/1 graph gives
            exactly the class form. Every row needs positive weight somewhere, usually on the diagonal.
        tau: temperature (> 0). With L2-normalised rows |S| <= 1 / tau.
        impl: "auto" | "reference" | "torch" | "triton".
        detach_target: treat softmax_row(S) as a constant target in the KL (Eqs. 6 and 12); the ce keeps its full
            gradient either way.

    Returns:
        (ce, kl), each [K, N], fp32 (fp64 for fp64 inputs).
    """
    graph = _check_inputs(a, c, classes, tau, impl)
    wdtype = _working_dtype(a)
    impl = _resolve_impl(impl, a, wdtype, graph)
    classes = classes.to(a.device)
    # One cast to the working dtype, differentiable, so gradients return in the inputs' dtype.
    a_w, c_w = a.to(wdtype), c.to(wdtype)
    if impl == "reference":
        return reference_pair_losses(a_w, c_w, classes, tau, detach_target)
    if impl == "torch":
        return _FusedPairLosses.apply(a_w, c_w, classes, float(tau), bool(detach_target), None)
    from ccl.train.losses import contrastive_triton  # lazily: triton is optional

    return contrastive_triton.pair_losses_triton(a_w, c_w, classes, float(tau), bool(detach_target))


def ccl_contrastive(
    z0s: torch.Tensor,
    z0w: torch.Tensor,
    z1s: torch.Tensor,
    z1w: torch.Tensor,
    y0: torch.Tensor,
    y1: torch.Tensor,
    tau: float = 0.5,
    impl: str = "auto",
    detach_peer: bool = True,
    detach_target: bool = True,
) -> dict[str, torch.Tensor]:
    """All contrastive terms of CCL for both models from one batched call (K = 4).

    Args:
        z0s, z0w, z1s, z1w: [N, D] L2-normalised embeddings of model m in {0, 1}, strong (s) and weak (w) views.
        y0, y1: int64 [N] refurbished-label classes (argmax of y', Eq. 10) defining the CCLRL positives of model 0
            and model 1; or float [N, N] soft positive graphs (then the "reference" implementation is used).
        tau, impl, detach_target: as in `pair_losses`.
        detach_peer: detach the contrast side of the cross-model matrices (z1w in S_01, z0w in S_10), so model m's
            losses only update model m.

    Returns:
        dict of per-anchor [N] vectors:
        acl0, acl1 (Eq. 5, S_mm = z_m^s z_m^w^T), vm0, vm1 (Eq. 6),
        cclrl0, cclrl1 (Eq. 9, S_01 = z0s z1w^T with y0, S_10 = z1s z0w^T with y1), mm0, mm1 (Eq. 12).
    """
    _check_pair(z0s, z0w, z1s, z1w)
    peer_of_0 = z1w.detach() if detach_peer else z1w
    peer_of_1 = z0w.detach() if detach_peer else z0w
    a = torch.stack([z0s, z1s, z0s, z1s])  # [4, N, D] anchors: strong views
    c = torch.stack([z0w, z1w, peer_of_0, peer_of_1])  # [4, N, D] contrasts: weak views
    classes = _stack_positives([None, None, y0, y1], z0s)
    ce, kl = pair_losses(a, c, classes, tau=tau, impl=impl, detach_target=detach_target)  # [4, N] each
    return {
        "acl0": ce[0], "acl1": ce[1], "vm0": kl[0], "vm1": kl[1],
        "cclrl0": ce[2], "cclrl1": ce[3], "mm0": kl[2], "mm1": kl[3],
    }  # fmt: skip


def ccl_contrastive_one(
    zs: torch.Tensor,
    zw: torch.Tensor,
    peer_w: torch.Tensor,
    y: torch.Tensor,
    tau: float = 0.5,
    impl: str = "auto",
    detach_target: bool = True,
) -> dict[str, torch.Tensor]:
    """The contrastive terms of one model m with its peer fixed (the alternate schedule), K = 2.

    Args:
        zs, zw: [N, D] L2-normalised strong and weak embeddings of model m.
        peer_w: [N, D] weak embeddings of the peer 1-m (always detached).
        y: int64 [N] refurbished-label classes for CCLRL, or a float [N, N] soft positive graph.

    Returns:
        dict of [N] vectors acl (Eq. 5), vm (Eq. 6), cclrl (Eq. 9), mm (Eq. 12).
    """
    _check_pair(zs, zw, peer_w)
    a = torch.stack([zs, zs])  # [2, N, D]
    c = torch.stack([zw, peer_w.detach()])  # [2, N, D]
    classes = _stack_positives([None, y], zs)
    ce, kl = pair_losses(a, c, classes, tau=tau, impl=impl, detach_target=detach_target)  # [2, N] each
    return {"acl": ce[0], "vm": kl[0], "cclrl": ce[1], "mm": kl[1]}


# ---------------------------------------------------------------------------------------------------------------
# reference: straight from the equations
# ---------------------------------------------------------------------------------------------------------------


def reference_pair_losses(
    a: torch.Tensor,
    c: torch.Tensor,
    classes: torch.Tensor,
    tau: float = 0.5,
    detach_target: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground truth of `pair_losses`: materialises the [K, N, N] matrices and lets autograd differentiate."""
    acc = _acc_dtype(a.dtype)
    with _no_autocast(a):  # products and log-sum-exps in fp32 (fp64), as in the fused versions
        return _reference(a.to(acc), c.to(acc), classes, tau, detach_target)


def _reference(a, c, classes, tau, detach_target):
    s = torch.bmm(a, c.transpose(1, 2)) / tau  # [K, N, N] S[i, j] = a_i . c_j / tau
    log_q_sw = s.log_softmax(dim=-1)  # [K, N, N] log q^{s->w}: row softmax of S
    log_q_ws = s.transpose(1, 2).log_softmax(dim=-1)  # [K, N, N] log q^{w->s}: row softmax of S^T
    if classes.is_floating_point():  # soft graph: log sum_j W_ij exp S_ij
        positive = (s + classes.to(s.dtype).log()).logsumexp(dim=-1)  # [K, N]
    else:  # Eqs. 5, 9: log of the summed exp over positives
        same = classes[:, :, None] == classes[:, None, :]  # [K, N, N]
        positive = s.masked_fill(~same, float("-inf")).logsumexp(dim=-1)  # [K, N]
    ce = s.logsumexp(dim=-1) - positive  # [K, N]
    target = log_q_sw.detach() if detach_target else log_q_sw
    kl = (target.exp() * (target - log_q_ws)).sum(dim=-1)  # [K, N] Eqs. 6, 12
    return ce, kl


# ---------------------------------------------------------------------------------------------------------------
# torch: fused, blocked over anchor rows, exact gradient by recomputation
# ---------------------------------------------------------------------------------------------------------------


class _FusedPairLosses(torch.autograd.Function):
    """`pair_losses` in blocks of anchor rows, saving only the inputs and O(K * N) statistics.

    A block of rows I needs the rows S[I, :] = A_I C^T and, for the KL, the transposed entries S[:, I]^T = C_I A^T
    (row i of S^T: its log-sum-exp is the column log-sum-exp c_i of S). Both come from two batched matmuls, so one
    pass over the blocks gives every statistic exactly, without an online log-sum-exp. All [K, B, N] work happens
    in a few buffers allocated once per call: fresh multi-MiB temporaries per operation cost page faults that
    measured slower than the arithmetic itself.
    """

    @staticmethod
    def forward(ctx, a, c, classes, tau, detach_target, block_rows):
        k, n, _ = a.shape
        acc = _acc_dtype(a.dtype)
        block = block_rows or _block_rows(k, n)
        with _no_autocast(a):
            a_t, c_f = _operands(a, c, tau)  # [K, N, D] each, a_t = a / tau: S = a_t c^T
            a_tT, c_fT = a_t.transpose(1, 2), c_f.transpose(1, 2)  # [K, D, N]
            ws = _Workspace(3, k, min(block, n), n, acc, a.device)
            row_lse = a.new_empty((k, n), dtype=acc)  # r_i = logsumexp_j S_ij
            col_lse = a.new_empty((k, n), dtype=acc)  # c_i = logsumexp_j S_ji
            pos_lse = a.new_empty((k, n), dtype=acc)  # p_i = logsumexp_{j positive} S_ij
            kl = a.new_empty((k, n), dtype=acc)
            for i0 in range(0, n, block):
                rows = slice(i0, min(i0 + block, n))
                s, t, w = ws.views(rows.stop - rows.start)  # [K, B, N] each
                other = ws.mask(rows.stop - rows.start)  # [K, B, N] bool
                torch.bmm(a_t[:, rows], c_fT, out=s)  # S[i, j]
                torch.bmm(c_f[:, rows], a_tT, out=t)  # S[j, i]
                col_lse[:, rows] = _lse(t, w)
                r = _lse(s, w, softmax=True)  # [K, B]; w = P = softmax_row(S)
                row_lse[:, rows] = r
                # KL(P_i || Q_i) = sum_j P_ij ((S_ij - r_i) - (S_ji - c_i)) and sum_j P_ij = 1.
                kl[:, rows] = col_lse[:, rows] - r - t.sub_(s).mul_(w).sum(dim=-1)
                torch.ne(classes[:, rows, None], classes[:, None, :], out=other)
                pos_lse[:, rows] = _positive_lse(s, w, r, other)  # consumes w
        ctx.save_for_backward(a, c, classes, row_lse, col_lse, pos_lse, kl)
        ctx.tau, ctx.detach_target, ctx.block = tau, detach_target, block
        out = torch.float64 if acc == torch.float64 else torch.float32
        return (row_lse - pos_lse).to(out), kl.to(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ce, g_kl):
        a, c, classes, row_lse, col_lse, pos_lse, kl = ctx.saved_tensors
        k, n, _ = a.shape
        acc = row_lse.dtype
        block = ctx.block
        with _no_autocast(a):
            a_t, c_f = _operands(a, c, ctx.tau)  # [K, N, D]
            a_tT, c_fT = a_t.transpose(1, 2), c_f.transpose(1, 2)  # [K, D, N]
            g_ce = None if g_ce is None else g_ce.to(acc)  # [K, N]
            g_kl = None if g_kl is None else g_kl.to(acc)  # [K, N]
            grad_a = torch.zeros_like(a_t) if ctx.needs_input_grad[0] else None  # [K, N, D]
            grad_c = torch.zeros_like(c_f) if ctx.needs_input_grad[1] else None  # [K, N, D]
            ws = _Workspace(4, k, min(block, n), n, acc, a.device)
            for i0 in range(0, n, block):
                rows = slice(i0, min(i0 + block, n))
                s, t, w, ds = ws.views(rows.stop - rows.start)  # [K, B, N] each; ds = dLoss/dS[i, j]
                other = ws.mask(rows.stop - rows.start)  # [K, B, N] bool
                torch.bmm(a_t[:, rows], c_fT, out=s)  # S[i, j]
                _exp_shifted(s, row_lse[:, rows, None], out=w)  # P_ij
                if g_ce is None:
                    ds.zero_()
                else:  # g_ce_i (P_ij - [j positive] exp(S_ij - p_i))
                    g = g_ce[:, rows, None]  # [K, B, 1]
                    torch.ne(classes[:, rows, None], classes[:, None, :], out=other)
                    torch.mul(w, g, out=ds)
                    ds.addcmul_(_exp_shifted(s, pos_lse[:, rows, None], out=t).masked_fill_(other, 0.0), g, value=-1.0)
                if g_kl is not None:
                    if not ctx.detach_target:  # through P: g_kl_i P_ij (log P_ij - log Q_ij - kl_i)
                        torch.bmm(c_f[:, rows], a_tT, out=t)  # S[j, i]
                        shift = row_lse[:, rows, None] - col_lse[:, rows, None] + kl[:, rows, None]  # [K, B, 1]
                        # log P_ij - log Q_ij = (S_ij - r_i) - (S_ji - c_i), with Q_ij = exp(S_ji - c_i)
                        ds.addcmul_(t.neg_().add_(s).sub_(shift).mul_(w), g_kl[:, rows, None])
                    # g_kl_j (exp(S_ij - c_j) - P_ji): the KL of anchor j reaches S_ij through log Q_j.
                    g = g_kl[:, None, :]  # [K, 1, N]
                    torch.bmm(c_f[:, rows], a_tT, out=t)  # S[j, i]
                    ds.addcmul_(_exp_shifted(s, col_lse[:, None, :], out=w), g)
                    ds.addcmul_(_exp_shifted(t, row_lse[:, None, :], out=w), g, value=-1.0)
                # S = a_t c^T with a_t = a / tau: dA = dS C / tau, dC = dS^T A_t.
                if grad_a is not None:
                    grad_a[:, rows] = torch.bmm(ds, c_f).mul_(1.0 / ctx.tau)
                if grad_c is not None:
                    grad_c.baddbmm_(ds.transpose(1, 2), a_t[:, rows])
        grad_a = None if grad_a is None else grad_a.to(a.dtype)
        grad_c = None if grad_c is None else grad_c.to(c.dtype)
        return grad_a, grad_c, None, None, None, None


class _Workspace:
    """`count` float buffers and one bool buffer of [K, block, N], reused by every block (the last, shorter block
    takes a contiguous prefix of each)."""

    def __init__(self, count, k, block, n, dtype, device):
        self.k, self.n = k, n
        self.bufs = torch.empty((count, k * block * n), dtype=dtype, device=device)
        self.bool = torch.empty(k * block * n, dtype=torch.bool, device=device)

    def views(self, b):
        return [buf[: self.k * b * self.n].view(self.k, b, self.n) for buf in self.bufs]

    def mask(self, b):
        return self.bool[: self.k * b * self.n].view(self.k, b, self.n)


def _operands(a, c, tau):
    """The matmul operands in the accumulation dtype, 1/tau folded into the anchors once: S = a_t c^T."""
    acc = _acc_dtype(a.dtype)
    return a.to(acc) * (1.0 / tau), c.to(acc)


def _exp_shifted(x, shift, out):
    """out = exp(x - shift) without a temporary."""
    return torch.sub(x, shift, out=out).exp_()


def _lse(x, work, softmax=False):
    """Row log-sum-exp of x [K, B, N] -> [K, B]. Leaves exp(x - rowmax) in `work` (same shape), normalised to the
    row softmax when `softmax`."""
    m = x.amax(dim=-1, keepdim=True)  # [K, B, 1]
    total = _exp_shifted(x, m, out=work).sum(dim=-1, keepdim=True)  # [K, B, 1]
    if softmax:
        work.div_(total)
    return (m + total.log()).squeeze(-1)


def _positive_lse(s, p_row, r, other):
    """log sum_{j positive} exp S_ij from the row softmax P (overwritten): one masked sum instead of a second
    log-sum-exp. Rows whose positive mass underflows (an exp below ~1e-38, not reachable for L2-normalised rows
    with tau >= 0.025) are redone with a max-shifted masked log-sum-exp, so the value stays exact."""
    pos = r + p_row.masked_fill_(other, 0.0).sum(dim=-1).log()  # [K, B]
    bad = torch.isinf(pos)
    if bad.any():
        exact = s.masked_fill(other, float("-inf")).logsumexp(dim=-1)  # [K, B]
        pos = torch.where(bad, exact, pos)
    return pos


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device (fp64 is never downcast), else x's own dtype."""
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _no_autocast(x: torch.Tensor):
    """Inside the fused Function every dtype is chosen explicitly; autocast must not recast the matmuls."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else nullcontext()


def _block_rows(k: int, n: int) -> int:
    return max(1, min(n, _BLOCK_ELEMENTS // max(1, k * n), max(256, -(-n // 4))))


def _resolve_impl(impl: str, a: torch.Tensor, wdtype: torch.dtype, graph: bool) -> str:
    if graph:
        if impl not in ("auto", "reference"):
            raise ValueError(f"a soft positive graph is supported by impl='reference' only, not impl={impl!r}")
        return "reference"
    if impl != "auto":
        return impl
    triton_dtype = wdtype in (torch.float32, torch.bfloat16, torch.float16)
    if a.is_cuda and triton_dtype and a.shape[-1] <= 256 and _triton_importable():
        return "triton"
    return "torch"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_inputs(a, c, classes, tau, impl) -> bool:
    """Validate shapes, dtypes and options; returns whether `classes` is a soft positive graph."""
    if impl not in IMPLS:
        raise ValueError(f"unknown contrastive impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"contrastive temperature tau must be a positive number, got {tau!r}")
    if a.dim() != 3 or a.shape != c.shape:
        raise ValueError(f"anchors and contrasts must both be [K, N, D], got {tuple(a.shape)} and {tuple(c.shape)}")
    if not (a.is_floating_point() and c.is_floating_point()):
        raise ValueError(f"embeddings must be floating point, got {a.dtype} and {c.dtype}")
    k, n, _ = a.shape
    if classes.is_floating_point():
        if tuple(classes.shape) != (k, n, n):
            raise ValueError(f"a soft positive graph must be [K, N, N] = {(k, n, n)}, got {tuple(classes.shape)}")
        return True
    if tuple(classes.shape) != (k, n):
        raise ValueError(f"classes must be [K, N] = {(k, n)}, got {tuple(classes.shape)}")
    return False


def _check_pair(*zs: torch.Tensor) -> None:
    shape = tuple(zs[0].shape)
    if len(shape) != 2 or any(tuple(z.shape) != shape for z in zs):
        raise ValueError(f"embeddings must all be [N, D] of one shape, got {[tuple(z.shape) for z in zs]}")


def _stack_positives(ys: list, like: torch.Tensor) -> torch.Tensor:
    """Stack per-matrix positive structures; None means "each anchor its own class" (ACL).

    Class vectors stack to [K, N]; if any entry is a soft [N, N] graph, all become graphs (identity for ACL)."""
    n = like.shape[0]
    if any(y is not None and y.is_floating_point() for y in ys):
        eye = torch.eye(n, device=like.device, dtype=torch.float32)
        graphs = []
        for y in ys:
            if y is None:
                graphs.append(eye)
            elif y.is_floating_point():
                if tuple(y.shape) != (n, n):
                    raise ValueError(f"a soft positive graph must be [N, N] = {(n, n)}, got {tuple(y.shape)}")
                graphs.append(y.to(torch.float32))
            else:
                graphs.append((y[:, None] == y[None, :]).to(torch.float32))
        return torch.stack(graphs)  # [K, N, N]
    arange = torch.arange(n, device=like.device)
    for y in ys:
        if y is not None and tuple(y.shape) != (n,):
            raise ValueError(f"refurbished classes must be [N] = ({n},), got {tuple(y.shape)}")
    return torch.stack([arange if y is None else y.to(device=like.device, dtype=torch.int64) for y in ys])  # [K, N]
