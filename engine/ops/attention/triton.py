"""kfe::attention in Triton: FlashAttention-2 forward and backward (Dao 2023, arXiv 2307.08691).

Forward (Alg. 1): one program per (query block, batch*head). It walks the key blocks with an online
softmax (running max m and sum l, rescaling the fp32 accumulator), so the N x M score matrix never
reaches memory, and saves LSE = m + log(l) per row. Scores are kept in base 2 (exp2 is the native
instruction): s2 = scale * log2(e) * q.k.

Backward (Alg. 2), three launches, P recomputed from LSE (the forward is never replayed):
  delta  (query blocks, B*H)   Delta = rowsum(dO * out)
  dkdv   (key blocks, B*H)     holds K, V of its block; walks the query blocks: dV += P^T dO,
                               dK += dS^T Q with dS = P * (dP - Delta)
  dq     (query blocks, B*H)   holds Q, dO of its block; walks the key blocks: dQ += dS K

Vision shapes: N and M need not be multiples of the blocks (the last block is masked in registers).
The head dim is held as one power-of-two piece or two (head_split: 72 and 80 as 64 + 16, 96 as
64 + 32), so D = 72 / 80 / 96 compute on 80 / 80 / 96 columns instead of next_pow2(D) = 128; a piece
that runs past D is masked at load (never a padded copy in memory). Each walk is split into blocks
that need no mask (the bulk) and the few that do (the sequence tail and, when causal, the diagonal),
as FlashAttention-2 does.

Causal is top-left aligned (query i sees keys j <= i, torch SDPA's convention); every query sees
key 0, so no softmax row is empty.

The CPU interpreter computes bf16 tl.dot wrongly, so under TRITON_INTERPRET=1 the operands are
upcast to fp32 inside the kernels (UPCAST): products of 16-bit values are exact in fp32 and the sum is
fp32, which is what the tensor cores do, so the interpreter still checks the GPU numerics.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from engine.backend import triton_interpreting
from engine.ops._target import gpu
from engine.ops import _alloc

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _dot_add(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in the MMA (the second head-dim piece of a product over D)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=PRECISION)


@triton.jit
def _load(ptrs, ok0, ok1, MASK0: tl.constexpr, MASK1: tl.constexpr):
    """A 2-D tile, masked only along the dims where the caller says a tail may lie (unmasked loads
    vectorize best)."""
    if MASK0:
        if MASK1:
            x = tl.load(ptrs, mask=ok0[:, None] & ok1[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=ok0[:, None], other=0.0)
    else:
        if MASK1:
            x = tl.load(ptrs, mask=ok1[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


# Head-dim pieces (see head_split): columns [0, BLOCK_D0) and [BLOCK_D0, BLOCK_D0 + BLOCK_D1); BLOCK_D1 = 0
# means one piece. MASK_D0 / MASK_D1: the piece runs past D (only the last piece can). Where there is no
# second piece its variables are stand-ins for piece 0 that are never read (they keep the loops' and
# helpers' signatures fixed; the compiler drops them).
@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, rows, offs_d0, offs_d1, d_ok0, d_ok1,
               skn, skd, svn, svd, M, qk_scale2, lo, hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, BLOCK_D1: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASKED: mask keys >= M and (CAUSAL) keys j > i."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ok = cols < M
        kT0 = _load(k_base + offs_d0[:, None] * skd + cols[None, :] * skn, d_ok0, kv_ok, MASK_D0, MASKED)
        if BLOCK_D1 > 0:
            kT1 = _load(k_base + offs_d1[:, None] * skd + cols[None, :] * skn, d_ok1, kv_ok, MASK_D1, MASKED)
            s = _dot_add(q1, kT1, _dot(q0, kT0, UPCAST, PRECISION), UPCAST, PRECISION) * qk_scale2
        else:
            s = _dot(q0, kT0, UPCAST, PRECISION) * qk_scale2                      # (BLOCK_M, BLOCK_N)
        if MASKED:
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load(v_base + cols[:, None] * svn + offs_d0[None, :] * svd, kv_ok, d_ok0, MASKED, MASK_D0)
        acc0 = acc0 * alpha[:, None] + _dot(p.to(v0.dtype), v0, UPCAST, PRECISION)  # (BLOCK_M, BLOCK_D0)
        if BLOCK_D1 > 0:
            v1 = _load(v_base + cols[:, None] * svn + offs_d1[None, :] * svd, kv_ok, d_ok1, MASKED, MASK_D1)
            acc1 = acc1 * alpha[:, None] + _dot(p.to(v1.dtype), v1, UPCAST, PRECISION)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr,    # (B, H, N, D) queries, any strides
    k_ptr,    # (B, H, M, D) keys, any strides
    v_ptr,    # (B, H, M, D) values, any strides
    o_ptr,    # (B, H, N, D) contiguous out, q's dtype
    lse_ptr,  # (B, H, N) contiguous fp32 out: natural-log LSE of each row's (masked) scaled scores
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    H, N, M, qk_scale2,  # qk_scale2 = scale * log2(e)
    D: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, MASK_D0: tl.constexpr,
    MASK_D1: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    row_ok, d_ok0 = rows < N, offs_d0 < D
    q_rows = q_ptr + b * sqb + h * sqh + rows[:, None] * sqn
    q0 = tl.load(q_rows + offs_d0[None, :] * sqd, mask=row_ok[:, None] & d_ok0[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        d_ok1 = offs_d1 < D
        q1 = tl.load(q_rows + offs_d1[None, :] * sqd, mask=row_ok[:, None] & d_ok1[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)
    else:
        offs_d1, d_ok1, q1, acc1 = offs_d0, d_ok0, q0, acc0  # stand-ins, never read
    # Key blocks [0, full) need no mask: inside M and (causal) entirely left of the block's first row.
    full = (M // BLOCK_N) * BLOCK_N
    hi = M
    if CAUSAL:
        full = tl.minimum(full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(M, start_m + BLOCK_M)
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, rows, offs_d0, offs_d1,
                                      d_ok0, d_ok1, skn, skd, svn, svd, M, qk_scale2, 0, full, False, CAUSAL,
                                      MASK_D0, MASK_D1, BLOCK_D1, UPCAST, PRECISION, BLOCK_N)
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, rows, offs_d0, offs_d1,
                                      d_ok0, d_ok1, skn, skd, svn, svd, M, qk_scale2, full, hi, True, CAUSAL,
                                      MASK_D0, MASK_D1, BLOCK_D1, UPCAST, PRECISION, BLOCK_N)
    o_row = (bh.to(tl.int64) * N + rows[:, None]) * D
    tl.store(o_ptr + o_row + offs_d0[None, :], (acc0 / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok0[None, :])
    if BLOCK_D1 > 0:
        tl.store(o_ptr + o_row + offs_d1[None, :], (acc1 / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok1[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr,      # (B, H, N, D) contiguous forward output
    do_ptr,     # (B, H, N, D) upstream gradient, any strides
    delta_ptr,  # (B, H, N) fp32 out: rowsum(dO * out)
    sdb, sdh, sdn, sdd, H, N,
    D: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_base = o_ptr + (bh.to(tl.int64) * N + rows[:, None]) * D
    do_base = do_ptr + b * sdb + h * sdh + rows[:, None] * sdn
    offs_d = tl.arange(0, BLOCK_D0)
    ok = (rows < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_base + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(do_base + offs_d[None, :] * sdd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if BLOCK_D1 > 0:
        offs_d = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        ok = (rows < N)[:, None] & (offs_d < D)[None, :]
        o = tl.load(o_base + offs_d[None, :], mask=ok, other=0.0)
        do = tl.load(do_base + offs_d[None, :] * sdd, mask=ok, other=0.0)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * N + rows, delta, mask=rows < N)


@triton.jit
def _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, cols,
                offs_d0, offs_d1, d_ok0, d_ok1, sqn, sqd, sdn, sdd, N, qk_scale2, lo, hi,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
                BLOCK_D1: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV of one key block from query blocks [lo, hi). MASKED: rows >= N and (CAUSAL) j > i."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q_ok = rows < N
        qT0 = _load(q_base + offs_d0[:, None] * sqd + rows[None, :] * sqn, d_ok0, q_ok, MASK_D0, MASKED)
        if BLOCK_D1 > 0:
            qT1 = _load(q_base + offs_d1[:, None] * sqd + rows[None, :] * sqn, d_ok1, q_ok, MASK_D1, MASKED)
        if MASKED:
            lse2 = tl.load(lse_base + rows, mask=q_ok, other=0.0) * 1.4426950408889634
        else:
            lse2 = tl.load(lse_base + rows) * 1.4426950408889634
        if BLOCK_D1 > 0:
            kqT = _dot_add(k1, qT1, _dot(k0, qT0, UPCAST, PRECISION), UPCAST, PRECISION)
        else:
            kqT = _dot(k0, qT0, UPCAST, PRECISION)                                # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(kqT * qk_scale2 - lse2[None, :])
        if MASKED:
            ok = q_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[:, None] <= rows[None, :])
            pT = tl.where(ok, pT, 0.0)
        do0 = _load(do_base + rows[:, None] * sdn + offs_d0[None, :] * sdd, q_ok, d_ok0, MASKED, MASK_D0)
        dv0 += _dot(pT.to(do0.dtype), do0, UPCAST, PRECISION)                    # (BLOCK_N, BLOCK_D0)
        dpT = _dot(v0, tl.trans(do0), UPCAST, PRECISION)                         # (BLOCK_N, BLOCK_M)
        if BLOCK_D1 > 0:
            do1 = _load(do_base + rows[:, None] * sdn + offs_d1[None, :] * sdd, q_ok, d_ok1, MASKED, MASK_D1)
            dv1 += _dot(pT.to(do1.dtype), do1, UPCAST, PRECISION)
            dpT = _dot_add(v1, tl.trans(do1), dpT, UPCAST, PRECISION)
        if MASKED:
            delta = tl.load(delta_base + rows, mask=q_ok, other=0.0)
        else:
            delta = tl.load(delta_base + rows)
        dsT = pT * (dpT - delta[None, :])
        dk0 += _dot(dsT.to(qT0.dtype), tl.trans(qT0), UPCAST, PRECISION)        # (BLOCK_N, BLOCK_D0)
        if BLOCK_D1 > 0:
            dk1 += _dot(dsT.to(qT1.dtype), tl.trans(qT1), UPCAST, PRECISION)
    return dk0, dk1, dv0, dv1


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # forward inputs, any strides
    do_ptr,               # (B, H, N, D) upstream gradient, any strides
    lse_ptr, delta_ptr,   # (B, H, N) fp32: forward LSE (natural log) and rowsum(dO * out)
    dk_ptr, dv_ptr,       # (B, H, M, D) contiguous out, k's / v's dtype
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    H, N, M, qk_scale2, scale,
    D: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, MASK_D0: tl.constexpr,
    MASK_D1: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    d_ok0 = offs_d0 < D
    kv_ok0 = (cols < M)[:, None] & d_ok0[None, :]
    k_rows = k_ptr + b * skb + h * skh + cols[:, None] * skn
    k0 = tl.load(k_rows + offs_d0[None, :] * skd, mask=kv_ok0, other=0.0)
    v_rows = v_ptr + b * svb + h * svh + cols[:, None] * svn
    v0 = tl.load(v_rows + offs_d0[None, :] * svd, mask=kv_ok0, other=0.0)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        d_ok1 = offs_d1 < D
        kv_ok1 = (cols < M)[:, None] & d_ok1[None, :]
        k1 = tl.load(k_rows + offs_d1[None, :] * skd, mask=kv_ok1, other=0.0)
        v1 = tl.load(v_rows + offs_d1[None, :] * svd, mask=kv_ok1, other=0.0)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], tl.float32)
    else:
        offs_d1, d_ok1, kv_ok1, k1, v1, dk1, dv1 = offs_d0, d_ok0, kv_ok0, k0, v0, dk0, dv0  # stand-ins, never read
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdb + h * sdh
    lse_base = lse_ptr + bh.to(tl.int64) * N
    delta_base = delta_ptr + bh.to(tl.int64) * N
    # Key rows >= M are zeros whose dK/dV rows are never stored (each key's gradient is its own row),
    # so they need no mask. Query blocks [lo, first) hold the causal diagonal (masked); [first, full)
    # are inside N and entirely below the diagonal (unmasked); [full, n_end) is the N tail (masked).
    n_end = tl.cdiv(N, BLOCK_M) * BLOCK_M
    lo = 0
    first = 0
    if CAUSAL:
        lo = tl.minimum((start_n // BLOCK_M) * BLOCK_M, n_end)
        first = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, n_end)
    full = tl.maximum((N // BLOCK_M) * BLOCK_M, first)
    dk0, dk1, dv0, dv1 = _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base,
                                     cols, offs_d0, offs_d1, d_ok0, d_ok1, sqn, sqd, sdn, sdd, N, qk_scale2,
                                     lo, first, True, CAUSAL, MASK_D0, MASK_D1, BLOCK_D1, UPCAST, PRECISION,
                                     BLOCK_M)
    dk0, dk1, dv0, dv1 = _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base,
                                     cols, offs_d0, offs_d1, d_ok0, d_ok1, sqn, sqd, sdn, sdd, N, qk_scale2,
                                     first, full, False, CAUSAL, MASK_D0, MASK_D1, BLOCK_D1, UPCAST, PRECISION,
                                     BLOCK_M)
    dk0, dk1, dv0, dv1 = _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base,
                                     cols, offs_d0, offs_d1, d_ok0, d_ok1, sqn, sqd, sdn, sdd, N, qk_scale2,
                                     full, n_end, True, CAUSAL, MASK_D0, MASK_D1, BLOCK_D1, UPCAST, PRECISION,
                                     BLOCK_M)
    out = (bh.to(tl.int64) * M + cols[:, None]) * D
    tl.store(dk_ptr + out + offs_d0[None, :], (dk0 * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok0)
    tl.store(dv_ptr + out + offs_d0[None, :], dv0.to(dv_ptr.dtype.element_ty), mask=kv_ok0)
    if BLOCK_D1 > 0:
        tl.store(dk_ptr + out + offs_d1[None, :], (dk1 * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok1)
        tl.store(dv_ptr + out + offs_d1[None, :], dv1.to(dv_ptr.dtype.element_ty), mask=kv_ok1)


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, rows, offs_d0, offs_d1, d_ok0, d_ok1,
              skn, skd, svn, svd, M, qk_scale2, lo, hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, BLOCK_D1: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block from key blocks [lo, hi). MASKED: keys >= M and (CAUSAL) j > i."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ok = cols < M
        kT0 = _load(k_base + offs_d0[:, None] * skd + cols[None, :] * skn, d_ok0, kv_ok, MASK_D0, MASKED)
        vT0 = _load(v_base + offs_d0[:, None] * svd + cols[None, :] * svn, d_ok0, kv_ok, MASK_D0, MASKED)
        if BLOCK_D1 > 0:
            kT1 = _load(k_base + offs_d1[:, None] * skd + cols[None, :] * skn, d_ok1, kv_ok, MASK_D1, MASKED)
            vT1 = _load(v_base + offs_d1[:, None] * svd + cols[None, :] * svn, d_ok1, kv_ok, MASK_D1, MASKED)
            qk = _dot_add(q1, kT1, _dot(q0, kT0, UPCAST, PRECISION), UPCAST, PRECISION)
        else:
            qk = _dot(q0, kT0, UPCAST, PRECISION)                                 # (BLOCK_M, BLOCK_N)
        p = tl.exp2(qk * qk_scale2 - lse2[:, None])
        if MASKED:
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            p = tl.where(ok, p, 0.0)  # padded keys are zeros: P would be exp(-LSE) there, not 0
        dp = _dot(do0, vT0, UPCAST, PRECISION)
        if BLOCK_D1 > 0:
            dp = _dot_add(do1, vT1, dp, UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq0 += _dot(ds.to(kT0.dtype), tl.trans(kT0), UPCAST, PRECISION)           # (BLOCK_M, BLOCK_D0)
        if BLOCK_D1 > 0:
            dq1 += _dot(ds.to(kT1.dtype), tl.trans(kT1), UPCAST, PRECISION)
    return dq0, dq1


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # forward inputs, any strides
    do_ptr,               # (B, H, N, D) upstream gradient, any strides
    lse_ptr, delta_ptr,   # (B, H, N) fp32: forward LSE (natural log) and rowsum(dO * out)
    dq_ptr,               # (B, H, N, D) contiguous out, q's dtype
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    H, N, M, qk_scale2, scale,
    D: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, MASK_D0: tl.constexpr,
    MASK_D1: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    row_ok, d_ok0 = rows < N, offs_d0 < D
    ld_ok = row_ok[:, None] & d_ok0[None, :]
    q_rows = q_ptr + b * sqb + h * sqh + rows[:, None] * sqn
    do_rows = do_ptr + b * sdb + h * sdh + rows[:, None] * sdn
    q0 = tl.load(q_rows + offs_d0[None, :] * sqd, mask=ld_ok, other=0.0)
    do0 = tl.load(do_rows + offs_d0[None, :] * sdd, mask=ld_ok, other=0.0)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        d_ok1 = offs_d1 < D
        q1 = _load(q_rows + offs_d1[None, :] * sqd, row_ok, d_ok1, True, True)
        do1 = _load(do_rows + offs_d1[None, :] * sdd, row_ok, d_ok1, True, True)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)
    else:
        offs_d1, d_ok1, q1, do1, dq1 = offs_d0, d_ok0, q0, do0, dq0  # stand-ins, never read
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    full = (M // BLOCK_N) * BLOCK_N  # the same split as the forward
    hi = M
    if CAUSAL:
        full = tl.minimum(full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(M, start_m + BLOCK_M)
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, rows, offs_d0, offs_d1,
                         d_ok0, d_ok1, skn, skd, svn, svd, M, qk_scale2, 0, full, False, CAUSAL, MASK_D0, MASK_D1,
                         BLOCK_D1, UPCAST, PRECISION, BLOCK_N)
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, rows, offs_d0, offs_d1,
                         d_ok0, d_ok1, skn, skd, svn, svd, M, qk_scale2, full, hi, True, CAUSAL, MASK_D0, MASK_D1,
                         BLOCK_D1, UPCAST, PRECISION, BLOCK_N)
    dq_rows = dq_ptr + (bh.to(tl.int64) * N + rows[:, None]) * D
    tl.store(dq_rows + offs_d0[None, :], (dq0 * scale).to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok0[None, :])
    if BLOCK_D1 > 0:
        tl.store(dq_rows + offs_d1[None, :], (dq1 * scale).to(dq_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok1[None, :])


# ---------------------------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class Config:
    block_m: int  # query rows per block
    block_n: int  # key rows per block
    num_warps: int = 4
    num_stages: int = 2

    def smaller(self) -> "Config | None":
        """The next config to try when this one does not fit the GPU (shared memory, registers)."""
        if self.num_stages > 1:
            return replace(self, num_stages=self.num_stages - 1)
        if max(self.block_m, self.block_n) > 16:
            if self.block_m >= self.block_n:
                return replace(self, block_m=self.block_m // 2, num_stages=2)
            return replace(self, block_n=self.block_n // 2, num_stages=2)
        return None


# GPU tiles by padded head width BLOCK_D0 + BLOCK_D1 (<= 64, <= 128, <= 256): the accumulators and
# the held Q (K, V) tiles are (rows, width), so the width sets the register budget. 16-bit inputs
# follow FlashAttention-2 / the Triton tutorial: the forward and dQ hold 128 query rows and walk 64
# (32) keys, dK/dV hold 128 (64) keys and walk 32 queries. fp32 inputs take exact fp32 products (FMA,
# no tensor cores: the contract is 1e-5 of float64, TF32 would give 1e-3), whose operands sit in
# registers, hence small tiles: fp32 is the exact path, not the fast one.
# `python -m engine.bench.sm90` compiles every entry for sm_90 under triton 3.6 and 3.8
# (results/sm90-static.md; tests/engine/test_sm90_static.py guards it): all fit in shared memory,
# 16-bit ones do not spill, fp32 ones spill up to ~1.5 KB. The width-64 dK/dV kernel takes 8 warps:
# its two 128 x 64 fp32 accumulators are 128 registers a thread on 4 warps, which reached 255
# registers and spilled 40 B (3.8) / 16 B (3.6); on 8 warps ~140 registers, no spill. Widths 80
# and 96 (D = 72, 80, 96 in two pieces) take the 8-warp row for the same reason (448-668 B). Width
# 256 dK/dV walks 32 keys, not 64: on 64 triton 3.6 spilled 48 B (255 registers); on 32, 172
# registers, no spill, but mma.sync (HMMA) instead of wgmma (a warpgroup's wgmma needs 64 rows). None is
# autotuned (multi-config autotune cannot run on the interpreter) or yet timed on a GPU:
# `kfe bench attention` on the device is how to revisit them.
_GPU = {  # padded width -> {kernel: Config}
    64: {"fwd": Config(128, 64, 4, 3), "dkdv": Config(32, 128, 8, 3), "dq": Config(128, 32, 4, 3)},
    128: {"fwd": Config(128, 64, 8, 3), "dkdv": Config(32, 128, 8, 2), "dq": Config(128, 32, 8, 2)},
    256: {"fwd": Config(64, 32, 4, 2), "dkdv": Config(16, 32, 8, 2), "dq": Config(64, 32, 8, 2)},
}
_GPU_FP32 = {
    64: {"fwd": Config(64, 32, 4, 2), "dkdv": Config(32, 64, 4, 2), "dq": Config(64, 32, 4, 2)},
    128: {"fwd": Config(32, 32, 4, 2), "dkdv": Config(16, 32, 4, 2), "dq": Config(32, 32, 4, 2)},
    256: {"fwd": Config(16, 32, 4, 2), "dkdv": Config(16, 16, 4, 2), "dq": Config(16, 32, 4, 2)},
}
_INTERPRETER_BLOCK = 256  # few, large programs: interpreter time grows with the number of programs


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def head_split(D: int) -> tuple[int, int]:
    """The head dim as one or two power-of-two pieces (BLOCK_D0, BLOCK_D1), BLOCK_D1 = 0 for one.

    tl.arange and tl.dot need power-of-two widths (>= 16). One piece of next_pow2(D) computes D = 72
    or 80 on 128 columns (+78% / +60% of the useful MMA work) and D = 96 on 128 (+33%); two pieces
    (64 + 16, 64 + 32) compute on 80 and 96 columns (+11%, 0, 0), fewer than FlashAttention-2's
    padding to a multiple of 32 (96 for 72 and 80). Products over D take two MMAs into one
    accumulator; products into D keep one accumulator per piece. Two pieces are used only where
    they are narrower than one: powers of two (32, 64, 128, 256) keep the single-piece path.
    """
    one = _pow2(D, 16, MAX_HEAD_DIM)
    d0 = max(16, 1 << (max(D, 1).bit_length() - 1))  # the largest power of two <= D
    if d0 >= D:
        return one, 0
    d1 = _pow2(D - d0, 16, MAX_HEAD_DIM)
    return (d0, d1) if d0 + d1 < one else (one, 0)


def head_consts(D: int) -> dict:
    """The head-dim constexprs of the kernels. Only the last piece can run past D (masked loads)."""
    d0, d1 = head_split(D)
    return dict(D=D, BLOCK_D0=d0, BLOCK_D1=d1, MASK_D0=d1 == 0 and d0 != D, MASK_D1=d1 > 0 and d0 + d1 != D)


def _fit_rows(block: int, length: int) -> int:
    """block, halved while that cuts the rows computed for `length` (a multiple of the block) by more
    than 1/8. A sequence just past a multiple of the tile pays a nearly empty last tile: N = 257 on
    128-row tiles computes 384 rows, on 64-row tiles 320 (-17%, so 64), on 32 288 (-10%: kept at
    64). Smaller tiles reuse each loaded K/V (Q) tile for fewer rows and run more loop trips, hence
    the threshold; shapes that fill their tiles (197, 256, 784, 4096 on 128) keep them."""
    padded = lambda b: triton.cdiv(length, b) * b  # noqa: E731
    while block > 16 and 8 * padded(block // 2) < 7 * padded(block):
        block //= 2
    return block


def configs(N: int, M: int, D: int, dtype: torch.dtype, device: torch.device) -> dict[str, Config]:
    """Tiles of the three main kernels ("fwd", "dkdv", "dq") for these sizes."""
    if gpu(device) is None:  # the interpreter: few, large programs
        cfg = Config(_pow2(N, 16, _INTERPRETER_BLOCK), _pow2(M, 16, _INTERPRETER_BLOCK), 1, 1)
        return {"fwd": cfg, "dkdv": cfg, "dq": cfg}
    width = max(64, _pow2(sum(head_split(D)), 16, MAX_HEAD_DIM))
    table = (_GPU_FP32 if dtype == torch.float32 else _GPU)[width]
    # Short sequences get smaller tiles instead of mostly-masked ones (N = 50: 64 rows, not 128), and
    # lengths just past a multiple of the tile get half-height tiles (_fit_rows).
    return {kernel: replace(cfg, block_m=_fit_rows(min(cfg.block_m, _pow2(N, 16, 128)), N),
                            block_n=_fit_rows(min(cfg.block_n, _pow2(M, 16, 128)), M))
            for kernel, cfg in table.items()}


_fitted: dict[tuple, Config] = {}


def _launch(kernel, cfg: Config, grid, *args, **consts) -> None:
    """kernel[grid(cfg)](...), falling back to smaller tiles if cfg does not fit this GPU."""
    key = (id(kernel), cfg, consts["D"], consts["PRECISION"])
    cfg = _fitted.get(key, cfg)
    while True:
        try:
            kernel[grid(cfg)](*args, **consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            _fitted[key] = cfg
            return
        except OutOfResources:
            cfg = cfg.smaller()
            if cfg is None:
                raise


def _numerics(dtype: torch.dtype) -> dict:
    interp = triton_interpreting()
    # fp32 inputs use exact fp32 products (the contract is 1e-5 of float64; TF32 would be ~1e-3).
    return {"UPCAST": interp and dtype != torch.float32,
            "PRECISION": "ieee" if interp or dtype == torch.float32 else "tf32"}


def _batch_chunks(B: int, H: int):
    """Batch ranges whose B*H programs fit the 65535 limit of grid axis 1."""
    step = max(1, 65535 // max(H, 1))
    for b0 in range(0, B, step):
        yield slice(b0, min(B, b0 + step))


def forward(q, k, v, causal: bool, scale: float):
    """(out (B, H, N, D) contiguous in q's dtype, lse (B, H, N) fp32)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    out = _alloc.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = _alloc.empty((B, H, N), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    cfg = configs(N, M, D, q.dtype, q.device)["fwd"]
    consts = dict(**head_consts(D), CAUSAL=causal, **_numerics(q.dtype))
    for bs in _batch_chunks(B, H):
        qb, kb, vb = q[bs], k[bs], v[bs]
        grid = lambda c, n=qb.shape[0]: (triton.cdiv(N, c.block_m), n * H)  # noqa: E731
        _launch(_attn_fwd_kernel, cfg, grid, qb, kb, vb, out[bs], lse[bs], *qb.stride(), *kb.stride(),
                *vb.stride(), H, N, M, scale * LOG2E, **consts)
    return out, lse


def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    B, H, N, D = q.shape
    M = k.shape[2]
    out, lse = out.contiguous(), lse.float().contiguous()
    dq = _alloc.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * H == 0 or N == 0:  # no query: every key gets a zero gradient
        return dq, dk.zero_(), dv.zero_()
    cfgs = configs(N, M, D, q.dtype, q.device)
    consts = dict(**head_consts(D), CAUSAL=causal, **_numerics(q.dtype))
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    for bs in _batch_chunks(B, H):
        qb, kb, vb, dob = q[bs], k[bs], v[bs], dout[bs]
        n = qb.shape[0] * H
        strides = (*qb.stride(), *kb.stride(), *vb.stride(), *dob.stride())
        block = cfgs["dq"].block_m
        _attn_bwd_delta_kernel[(triton.cdiv(N, block), n)](
            out[bs], dob, delta[bs], *dob.stride(), H, N, D=D, BLOCK_D0=consts["BLOCK_D0"],
            BLOCK_D1=consts["BLOCK_D1"], BLOCK_M=block)
        _launch(_attn_bwd_dkdv_kernel, cfgs["dkdv"], lambda c: (triton.cdiv(M, c.block_n), n),
                qb, kb, vb, dob, lse[bs], delta[bs], dk[bs], dv[bs], *strides, H, N, M, scale * LOG2E, scale,
                **consts)
        _launch(_attn_bwd_dq_kernel, cfgs["dq"], lambda c: (triton.cdiv(N, c.block_m), n),
                qb, kb, vb, dob, lse[bs], delta[bs], dq[bs], *strides, H, N, M, scale * LOG2E, scale, **consts)
    return dq, dk, dv
