"""Triton kernels for `ccl.train.losses.contrastive.pair_losses` (impl="triton"), flash-attention style.

One program owns a block of BLOCK_M anchor rows i of one matrix k and walks over blocks of BLOCK_N contrasts j.
For each tile it forms S[i, j] = a_i . c_j / tau and the transposed entries S[j, i] = c_i . a_j / tau (row i of
S^T), and keeps running (max, sum) pairs, an online log-sum-exp, for
    r_i = logsumexp_j S[i, j],  c_i = logsumexp_j S[j, i],  p_i = logsumexp_{j positive} S[i, j],
and u_i = sum_j exp(S[i, j] - max) (S[i, j] - S[j, i]), so that
    ce_i = r_i - p_i  and  kl_i = u_i / l_i - r_i + c_i   (sum_j P_ij (log P_ij - log Q_ij), sum_j P_ij = 1).
Nothing of size N x N is stored. The backward recomputes each tile, forms dS (formula in `contrastive`), and two
kernels accumulate dA = dS C / tau over contrast blocks and dC = dS^T A / tau over anchor blocks, each in
registers, so no atomics are needed and the result is deterministic.

Limits:
- inputs fp32, bf16 or fp16, accumulated in fp32 (fp32 products use IEEE precision, not TF32, so the fp32 results
  match the reference to ~1e-5); losses are returned in fp32 and gradients in the inputs' dtype;
- D <= 256: any D is padded to the next power of two >= 16 with masked loads (zeros do not change a dot product);
- CUDA tensors, or CPU tensors when the kernels were defined with TRITON_INTERPRET=1 (the environment variable must
  be set before this module is first imported); the interpreter is for tests at small N only.
"""

from __future__ import annotations

import torch

from ccl.errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # the fused torch version covers machines without triton
    triton = None
    tl = None


def _jit(fn):
    """triton.jit when triton is importable; otherwise the plain function, never launched."""
    return fn if triton is None else triton.jit(fn)


MAX_D = 256


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@_jit
def _load_rows(ptr, base, idx, idx_ok, dims, D, dim_ok):
    """Rows idx of a [N, D] slab starting at ptr + base, zero where masked: [len(idx), BLOCK_D]."""
    return tl.load(ptr + base + idx[:, None] * D + dims[None, :], mask=idx_ok[:, None] & dim_ok[None, :], other=0.0)


@_jit
def _fwd_kernel(
    A, C, CLS, ROW_LSE, COL_LSE, POS_LSE, KL,
    N, D, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    base = k * N * D
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    a_i = _load_rows(A, base, rows, row_ok, dims, D, dim_ok)  # [BM, BD]
    c_i = _load_rows(C, base, rows, row_ok, dims, D, dim_ok)  # [BM, BD]
    y_i = tl.load(CLS + k * N + rows, mask=row_ok, other=-1)  # [BM]

    neg_inf = float("-inf")
    m_s = tl.full([BLOCK_M], neg_inf, tl.float32)  # running max of S[i, :]
    l_s = tl.zeros([BLOCK_M], tl.float32)  # sum exp(S[i, j] - m_s)
    u = tl.zeros([BLOCK_M], tl.float32)  # sum exp(S[i, j] - m_s) (S[i, j] - S[j, i])
    m_t = tl.full([BLOCK_M], neg_inf, tl.float32)  # the same for row i of S^T
    l_t = tl.zeros([BLOCK_M], tl.float32)
    m_p = tl.full([BLOCK_M], neg_inf, tl.float32)  # and for the positives of row i
    l_p = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        a_j = _load_rows(A, base, cols, col_ok, dims, D, dim_ok)  # [BN, BD]
        c_j = _load_rows(C, base, cols, col_ok, dims, D, dim_ok)  # [BN, BD]
        y_j = tl.load(CLS + k * N + cols, mask=col_ok, other=-1)  # [BN]
        s = tl.dot(a_i, tl.trans(c_j), input_precision=PRECISION) * inv_tau  # [BM, BN] S[i, j]
        t = tl.dot(c_i, tl.trans(a_j), input_precision=PRECISION) * inv_tau  # [BM, BN] S[j, i]
        diff = tl.where(col_ok[None, :], s - t, 0.0)  # before masking, so no inf - inf
        s = tl.where(col_ok[None, :], s, neg_inf)
        t = tl.where(col_ok[None, :], t, neg_inf)

        # Every tile holds at least one valid column, so the new maxima of S and S^T are finite.
        m_new = tl.maximum(m_s, tl.max(s, 1))
        e = tl.exp(s - m_new[:, None])  # [BM, BN]
        rescale = tl.exp(m_s - m_new)
        l_s = l_s * rescale + tl.sum(e, 1)
        u = u * rescale + tl.sum(e * diff, 1)
        m_s = m_new

        m_new = tl.maximum(m_t, tl.max(t, 1))
        l_t = l_t * tl.exp(m_t - m_new) + tl.sum(tl.exp(t - m_new[:, None]), 1)
        m_t = m_new

        # A tile can hold no positive of row i: shift by 0 then, so exp(-inf - shift) = 0, never nan.
        sp = tl.where(y_i[:, None] == y_j[None, :], s, neg_inf)  # [BM, BN]
        m_new = tl.maximum(m_p, tl.max(sp, 1))
        shift = tl.where(m_new == neg_inf, 0.0, m_new)
        l_p = l_p * tl.exp(m_p - shift) + tl.sum(tl.exp(sp - shift[:, None]), 1)
        m_p = m_new

    r = m_s + tl.log(l_s)
    cl = m_t + tl.log(l_t)
    tl.store(ROW_LSE + k * N + rows, r, mask=row_ok)
    tl.store(COL_LSE + k * N + rows, cl, mask=row_ok)
    # Padding rows have no positives (l_p = 0): log(1) keeps the interpreter free of log(0) warnings.
    tl.store(POS_LSE + k * N + rows, m_p + tl.log(tl.where(row_ok, l_p, 1.0)), mask=row_ok)
    tl.store(KL + k * N + rows, u / l_s - r + cl, mask=row_ok)


@_jit
def _ds_tile(
    a_i, c_i, y_i, r_i, cl_i, p_i, kl_i, gce_i, gkl_i, row_ok,
    a_j, c_j, y_j, r_j, cl_j, gkl_j, col_ok,
    inv_tau, DETACH_TARGET: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dLoss/dS on the tile (rows i, columns j), fp32 [BM, BN], zero outside the matrix."""
    s = tl.dot(a_i, tl.trans(c_j), input_precision=PRECISION) * inv_tau  # [BM, BN] S[i, j]
    t = tl.dot(c_i, tl.trans(a_j), input_precision=PRECISION) * inv_tau  # [BM, BN] S[j, i]
    p = tl.exp(s - r_i[:, None])  # P_ij
    p_pos = tl.where(y_i[:, None] == y_j[None, :], tl.exp(s - p_i[:, None]), 0.0)  # positive-set softmax
    q_col = tl.exp(s - cl_j[None, :])  # exp(S_ij - c_j)
    p_tr = tl.exp(t - r_j[None, :])  # P_ji
    ds = gce_i[:, None] * (p - p_pos) + gkl_j[None, :] * (q_col - p_tr)
    if not DETACH_TARGET:
        ds += gkl_i[:, None] * p * (s - t - (r_i - cl_i + kl_i)[:, None])
    return tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)


@_jit
def _load_stats(ROW_LSE, COL_LSE, POS_LSE, KL, G_CE, G_KL, off, ok):
    r = tl.load(ROW_LSE + off, mask=ok, other=0.0)
    cl = tl.load(COL_LSE + off, mask=ok, other=0.0)
    p = tl.load(POS_LSE + off, mask=ok, other=0.0)
    kl = tl.load(KL + off, mask=ok, other=0.0)
    gce = tl.load(G_CE + off, mask=ok, other=0.0)
    gkl = tl.load(G_KL + off, mask=ok, other=0.0)
    return r, cl, p, kl, gce, gkl


@_jit
def _bwd_da_kernel(
    A, C, CLS, ROW_LSE, COL_LSE, POS_LSE, KL, G_CE, G_KL, DA,
    N, D, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DETACH_TARGET: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dA[i] = sum_j dS[i, j] c_j / tau for one block of anchor rows."""
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    base = k * N * D
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    a_i = _load_rows(A, base, rows, row_ok, dims, D, dim_ok)  # [BM, BD]
    c_i = _load_rows(C, base, rows, row_ok, dims, D, dim_ok)  # [BM, BD]
    y_i = tl.load(CLS + k * N + rows, mask=row_ok, other=-1)
    r_i, cl_i, p_i, kl_i, gce_i, gkl_i = _load_stats(ROW_LSE, COL_LSE, POS_LSE, KL, G_CE, G_KL, k * N + rows, row_ok)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        a_j = _load_rows(A, base, cols, col_ok, dims, D, dim_ok)  # [BN, BD]
        c_j = _load_rows(C, base, cols, col_ok, dims, D, dim_ok)  # [BN, BD]
        y_j = tl.load(CLS + k * N + cols, mask=col_ok, other=-1)
        r_j, cl_j, _, _, _, gkl_j = _load_stats(ROW_LSE, COL_LSE, POS_LSE, KL, G_CE, G_KL, k * N + cols, col_ok)
        ds = _ds_tile(
            a_i, c_i, y_i, r_i, cl_i, p_i, kl_i, gce_i, gkl_i, row_ok,
            a_j, c_j, y_j, r_j, cl_j, gkl_j, col_ok, inv_tau, DETACH_TARGET, PRECISION,
        )  # fmt: skip
        acc += tl.dot(ds.to(c_j.dtype), c_j, input_precision=PRECISION)  # [BM, BD]
    out = DA + base + rows[:, None] * D + dims[None, :]
    tl.store(out, (acc * inv_tau).to(DA.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@_jit
def _bwd_dc_kernel(
    A, C, CLS, ROW_LSE, COL_LSE, POS_LSE, KL, G_CE, G_KL, DC,
    N, D, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DETACH_TARGET: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dC[j] = sum_i dS[i, j] a_i / tau for one block of contrast columns."""
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    base = k * N * D
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    a_j = _load_rows(A, base, cols, col_ok, dims, D, dim_ok)  # [BN, BD]
    c_j = _load_rows(C, base, cols, col_ok, dims, D, dim_ok)  # [BN, BD]
    y_j = tl.load(CLS + k * N + cols, mask=col_ok, other=-1)
    r_j, cl_j, _, _, _, gkl_j = _load_stats(ROW_LSE, COL_LSE, POS_LSE, KL, G_CE, G_KL, k * N + cols, col_ok)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i0 in range(0, N, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        a_i = _load_rows(A, base, rows, row_ok, dims, D, dim_ok)  # [BM, BD]
        c_i = _load_rows(C, base, rows, row_ok, dims, D, dim_ok)  # [BM, BD]
        y_i = tl.load(CLS + k * N + rows, mask=row_ok, other=-1)
        r_i, cl_i, p_i, kl_i, gce_i, gkl_i = _load_stats(
            ROW_LSE, COL_LSE, POS_LSE, KL, G_CE, G_KL, k * N + rows, row_ok
        )
        ds = _ds_tile(
            a_i, c_i, y_i, r_i, cl_i, p_i, kl_i, gce_i, gkl_i, row_ok,
            a_j, c_j, y_j, r_j, cl_j, gkl_j, col_ok, inv_tau, DETACH_TARGET, PRECISION,
        )  # fmt: skip
        acc += tl.dot(tl.trans(ds).to(a_i.dtype), a_i, input_precision=PRECISION)  # [BN, BD]
    out = DC + base + cols[:, None] * D + dims[None, :]
    tl.store(out, (acc * inv_tau).to(DC.dtype.element_ty), mask=col_ok[:, None] & dim_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# autograd wrapper
# ---------------------------------------------------------------------------------------------------------------


def interpreted() -> bool:
    """Whether the kernels were defined for the CPU interpreter (TRITON_INTERPRET=1 at first import)."""
    return triton is not None and type(_fwd_kernel).__name__ == "InterpretedFunction"


def pair_losses_triton(
    a: torch.Tensor,
    c: torch.Tensor,
    classes: torch.Tensor,
    tau: float,
    detach_target: bool = True,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, kl) [K, N] fp32 of `contrastive.pair_losses` with Triton kernels; a, c: [K, N, D] in the working dtype.

    block: tile size (power of two >= 16) for both anchors and contrasts; default 64, or 32 for wide rows."""
    _check(a, classes, block)
    return _TritonPairLosses.apply(a, c, classes, tau, detach_target, block)


def _check(a: torch.Tensor, classes: torch.Tensor, block: int | None) -> None:
    if triton is None:
        raise UserError("impl='triton' needs the triton package; use impl='torch'")
    if not (a.is_cuda or interpreted()):
        raise UserError("impl='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); use impl='torch'")
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"impl='triton' takes fp32, bf16 or fp16 embeddings, got {a.dtype}; use impl='torch'")
    if a.shape[-1] > MAX_D:
        raise UserError(f"impl='triton' supports embedding dims up to {MAX_D}, got {a.shape[-1]}; use impl='torch'")
    if classes.is_floating_point():
        raise UserError("impl='triton' takes integer classes; a soft positive graph needs impl='reference'")
    if block is not None and (block < 16 or block & (block - 1)):
        raise UserError(f"triton block must be a power of two >= 16, got {block}")


def _launch_config(a: torch.Tensor, block: int | None) -> dict:
    d = a.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    if block is None:
        # Four [block, BLOCK_D] operand tiles live in registers: keep each row under 256 bytes for 64-row tiles.
        # A starting point, not tuned on a GPU.
        block = 64 if block_d * a.element_size() <= 256 else 32
    # fp32 products in IEEE precision so the kernel matches the reference (TF32 would cost ~1e-3 relative);
    # the option is ignored for bf16/fp16 inputs.
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, PRECISION="ieee")


class _TritonPairLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, c, classes, tau, detach_target, block):
        a, c = a.contiguous(), c.contiguous()  # [K, N, D]
        classes = classes.to(torch.int64).contiguous()  # [K, N]
        k, n, d = a.shape
        cfg = _launch_config(a, block)
        stats = [torch.empty((k, n), device=a.device, dtype=torch.float32) for _ in range(4)]
        row_lse, col_lse, pos_lse, kl = stats  # [K, N] each
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), k)
        _fwd_kernel[grid](a, c, classes, row_lse, col_lse, pos_lse, kl, n, d, 1.0 / tau, **cfg)
        ctx.save_for_backward(a, c, classes, row_lse, col_lse, pos_lse, kl)
        ctx.tau, ctx.detach_target, ctx.cfg = tau, detach_target, cfg
        return row_lse - pos_lse, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ce, g_kl):
        a, c, classes, row_lse, col_lse, pos_lse, kl = ctx.saved_tensors
        k, n, d = a.shape
        cfg = ctx.cfg
        g_ce = torch.zeros_like(row_lse) if g_ce is None else g_ce.float().contiguous()  # [K, N]
        g_kl = torch.zeros_like(row_lse) if g_kl is None else g_kl.float().contiguous()  # [K, N]
        args = (a, c, classes, row_lse, col_lse, pos_lse, kl, g_ce, g_kl)
        grad_a = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.empty_like(a)  # [K, N, D]
            grid = (triton.cdiv(n, cfg["BLOCK_M"]), k)
            _bwd_da_kernel[grid](*args, grad_a, n, d, 1.0 / ctx.tau, DETACH_TARGET=ctx.detach_target, **cfg)
        if ctx.needs_input_grad[1]:
            grad_c = torch.empty_like(c)  # [K, N, D]
            grid = (triton.cdiv(n, cfg["BLOCK_N"]), k)
            _bwd_dc_kernel[grid](*args, grad_c, n, d, 1.0 / ctx.tau, DETACH_TARGET=ctx.detach_target, **cfg)
        return grad_a, grad_c, None, None, None, None
