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

Vision shapes: N and M need not be multiples of the blocks (the last block is masked in registers),
and the head dim D is padded to BLOCK_D = next_pow2(D) in registers only (masked loads, never a
padded copy in memory). Each walk is split into blocks that need no mask (the bulk) and the few that
do (the sequence tail and, when causal, the diagonal), as FlashAttention-2 does.

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


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, rows, offs_d, d_ok, skn, skd, svn, svd, M, qk_scale2,
               lo, hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASKED: mask keys >= M and (CAUSAL) keys j > i."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ok = cols < M
        kT = _load(k_base + offs_d[:, None] * skd + cols[None, :] * skn, d_ok, kv_ok, PAD_D, MASKED)
        s = _dot(q, kT, UPCAST, PRECISION) * qk_scale2                          # (BLOCK_M, BLOCK_N)
        if MASKED:
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base + cols[:, None] * svn + offs_d[None, :] * svd, kv_ok, d_ok, MASKED, PAD_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)   # (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr,    # (B, H, N, D) queries, any strides
    k_ptr,    # (B, H, M, D) keys, any strides
    v_ptr,    # (B, H, M, D) values, any strides
    o_ptr,    # (B, H, N, D) contiguous out, q's dtype
    lse_ptr,  # (B, H, N) contiguous fp32 out: natural-log LSE of each row's (masked) scaled scores
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    H, N, M, qk_scale2,  # qk_scale2 = scale * log2(e)
    D: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < N, offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)              # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key blocks [0, full) need no mask: inside M and (causal) entirely left of the block's first row.
    full = (M // BLOCK_N) * BLOCK_N
    hi = M
    if CAUSAL:
        full = tl.minimum(full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(M, start_m + BLOCK_M)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, rows, offs_d, d_ok, skn, skd, svn, svd, M,
                               qk_scale2, 0, full, False, CAUSAL, PAD_D, UPCAST, PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, rows, offs_d, d_ok, skn, skd, svn, svd, M,
                               qk_scale2, full, hi, True, CAUSAL, PAD_D, UPCAST, PRECISION, BLOCK_N)
    out = acc / l_i[:, None]
    o_off = (bh.to(tl.int64) * N + rows[:, None]) * D + offs_d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr,      # (B, H, N, D) contiguous forward output
    do_ptr,     # (B, H, N, D) upstream gradient, any strides
    delta_ptr,  # (B, H, N) fp32 out: rowsum(dO * out)
    sdb, sdh, sdn, sdd, H, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + (bh.to(tl.int64) * N + rows[:, None]) * D + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :] * sdd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * N + rows, delta, mask=rows < N)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_d, d_ok,
                sqn, sqd, sdn, sdd, N, qk_scale2, lo, hi,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV of one key block from query blocks [lo, hi). MASKED: rows >= N and (CAUSAL) j > i."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q_ok = rows < N
        qT = _load(q_base + offs_d[:, None] * sqd + rows[None, :] * sqn, d_ok, q_ok, PAD_D, MASKED)
        if MASKED:
            lse2 = tl.load(lse_base + rows, mask=q_ok, other=0.0) * 1.4426950408889634
        else:
            lse2 = tl.load(lse_base + rows) * 1.4426950408889634
        pT = tl.exp2(_dot(k, qT, UPCAST, PRECISION) * qk_scale2 - lse2[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            ok = q_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[:, None] <= rows[None, :])
            pT = tl.where(ok, pT, 0.0)
        do = _load(do_base + rows[:, None] * sdn + offs_d[None, :] * sdd, q_ok, d_ok, MASKED, PAD_D)
        dv += _dot(pT.to(do.dtype), do, UPCAST, PRECISION)                     # (BLOCK_N, BLOCK_D)
        dpT = _dot(v, tl.trans(do), UPCAST, PRECISION)                        # (BLOCK_N, BLOCK_M)
        if MASKED:
            delta = tl.load(delta_base + rows, mask=q_ok, other=0.0)
        else:
            delta = tl.load(delta_base + rows)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), UPCAST, PRECISION)          # (BLOCK_N, BLOCK_D)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # forward inputs, any strides
    do_ptr,               # (B, H, N, D) upstream gradient, any strides
    lse_ptr, delta_ptr,   # (B, H, N) fp32: forward LSE (natural log) and rowsum(dO * out)
    dk_ptr, dv_ptr,       # (B, H, M, D) contiguous out, k's / v's dtype
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    H, N, M, qk_scale2, scale,
    D: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (cols < M)[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
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
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_d, d_ok, sqn, sqd,
                         sdn, sdd, N, qk_scale2, lo, first, True, CAUSAL, PAD_D, UPCAST, PRECISION, BLOCK_M)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_d, d_ok, sqn, sqd,
                         sdn, sdd, N, qk_scale2, first, full, False, CAUSAL, PAD_D, UPCAST, PRECISION, BLOCK_M)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, offs_d, d_ok, sqn, sqd,
                         sdn, sdd, N, qk_scale2, full, n_end, True, CAUSAL, PAD_D, UPCAST, PRECISION, BLOCK_M)
    out = (bh.to(tl.int64) * M + cols[:, None]) * D + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, rows, offs_d, d_ok, skn, skd, svn, svd, M, qk_scale2,
              lo, hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block from key blocks [lo, hi). MASKED: keys >= M and (CAUSAL) j > i."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ok = cols < M
        kT = _load(k_base + offs_d[:, None] * skd + cols[None, :] * skn, d_ok, kv_ok, PAD_D, MASKED)
        vT = _load(v_base + offs_d[:, None] * svd + cols[None, :] * svn, d_ok, kv_ok, PAD_D, MASKED)
        p = tl.exp2(_dot(q, kT, UPCAST, PRECISION) * qk_scale2 - lse2[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            p = tl.where(ok, p, 0.0)  # padded keys are zeros: P would be exp(-LSE) there, not 0
        dp = _dot(do, vT, UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), UPCAST, PRECISION)            # (BLOCK_M, BLOCK_D)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # forward inputs, any strides
    do_ptr,               # (B, H, N, D) upstream gradient, any strides
    lse_ptr, delta_ptr,   # (B, H, N) fp32: forward LSE (natural log) and rowsum(dO * out)
    dq_ptr,               # (B, H, N, D) contiguous out, q's dtype
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    H, N, M, qk_scale2, scale,
    D: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < N, offs_d < D
    ld_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=ld_ok, other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :] * sdd, mask=ld_ok, other=0.0)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    full = (M // BLOCK_N) * BLOCK_N  # the same split as the forward
    hi = M
    if CAUSAL:
        full = tl.minimum(full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(M, start_m + BLOCK_M)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, rows, offs_d, d_ok, skn, skd, svn, svd, M, qk_scale2,
                   0, full, False, CAUSAL, PAD_D, UPCAST, PRECISION, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, rows, offs_d, d_ok, skn, skd, svn, svd, M, qk_scale2,
                   full, hi, True, CAUSAL, PAD_D, UPCAST, PRECISION, BLOCK_N)
    tl.store(dq_ptr + (bh.to(tl.int64) * N + rows[:, None]) * D + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=ld_ok)


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


# GPU tiles by padded head dim (<= 64, 128, 256). 16-bit inputs follow FlashAttention-2 / the Triton
# tutorial: the forward and dQ hold 128 query rows and walk 64 (32) keys, dK/dV hold 128 (64) keys and
# walk 32 queries. fp32 inputs take exact fp32 products (FMA, no tensor cores: the contract is 1e-5 of
# float64, TF32 would give 1e-3), whose operands sit in registers, hence small tiles: fp32 is the
# exact path, not the fast one. benchmarks/attention_sm90_compile.py compiles every entry for sm_90
# (results/attention-sm90-compile.md): all fit in shared memory, 16-bit ones spill <= 48 bytes of
# registers, fp32 ones up to ~2 KB. None is autotuned (multi-config autotune cannot run on the
# interpreter) or yet timed on a GPU: `kfe bench attention` on the device is how to revisit them.
_GPU = {  # block_d -> {kernel: Config}
    64: {"fwd": Config(128, 64, 4, 3), "dkdv": Config(32, 128, 4, 3), "dq": Config(128, 32, 4, 3)},
    128: {"fwd": Config(128, 64, 8, 3), "dkdv": Config(32, 128, 8, 2), "dq": Config(128, 32, 8, 2)},
    256: {"fwd": Config(64, 32, 4, 2), "dkdv": Config(16, 64, 8, 2), "dq": Config(64, 32, 8, 2)},
}
_GPU_FP32 = {
    64: {"fwd": Config(64, 32, 4, 2), "dkdv": Config(32, 64, 4, 2), "dq": Config(64, 32, 4, 2)},
    128: {"fwd": Config(32, 32, 4, 2), "dkdv": Config(16, 32, 4, 2), "dq": Config(32, 32, 4, 2)},
    256: {"fwd": Config(16, 32, 4, 2), "dkdv": Config(16, 16, 4, 2), "dq": Config(16, 32, 4, 2)},
}
_INTERPRETER_BLOCK = 256  # few, large programs: interpreter time grows with the number of programs


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def block_d(D: int) -> int:
    return _pow2(D, 16, MAX_HEAD_DIM)  # tl.dot needs every dim >= 16


def configs(N: int, M: int, D: int, dtype: torch.dtype, device: torch.device) -> dict[str, Config]:
    """Tiles of the three main kernels ("fwd", "dkdv", "dq") for these sizes."""
    if triton_interpreting() or device.type != "cuda":
        cfg = Config(_pow2(N, 16, _INTERPRETER_BLOCK), _pow2(M, 16, _INTERPRETER_BLOCK), 1, 1)
        return {"fwd": cfg, "dkdv": cfg, "dq": cfg}
    table = (_GPU_FP32 if dtype == torch.float32 else _GPU)[max(64, block_d(D))]
    # Short sequences get smaller tiles instead of mostly-masked ones.
    return {kernel: replace(cfg, block_m=min(cfg.block_m, _pow2(N, 16, 128)),
                            block_n=min(cfg.block_n, _pow2(M, 16, 128)))
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
    consts = dict(D=D, PAD_D=block_d(D) != D, CAUSAL=causal, BLOCK_D=block_d(D), **_numerics(q.dtype))
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
    consts = dict(D=D, PAD_D=block_d(D) != D, CAUSAL=causal, BLOCK_D=block_d(D), **_numerics(q.dtype))
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    for bs in _batch_chunks(B, H):
        qb, kb, vb, dob = q[bs], k[bs], v[bs], dout[bs]
        n = qb.shape[0] * H
        strides = (*qb.stride(), *kb.stride(), *vb.stride(), *dob.stride())
        block = cfgs["dq"].block_m
        _attn_bwd_delta_kernel[(triton.cdiv(N, block), n)](
            out[bs], dob, delta[bs], *dob.stride(), H, N, D=D, BLOCK_M=block, BLOCK_D=consts["BLOCK_D"])
        _launch(_attn_bwd_dkdv_kernel, cfgs["dkdv"], lambda c: (triton.cdiv(M, c.block_n), n),
                qb, kb, vb, dob, lse[bs], delta[bs], dk[bs], dv[bs], *strides, H, N, M, scale * LOG2E, scale,
                **consts)
        _launch(_attn_bwd_dq_kernel, cfgs["dq"], lambda c: (triton.cdiv(N, c.block_m), n),
                qb, kb, vb, dob, lse[bs], delta[bs], dq[bs], *strides, H, N, M, scale * LOG2E, scale, **consts)
    return dq, dk, dv
