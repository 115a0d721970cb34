"""kfe::contrastive_loss in Triton: tiled CLIP / SigLIP loss that never allocates B x B (Inf-CL, 2024).

Both kernels sweep the logits L = s * A @ K.T (+ b) of a query matrix A (n, D) against keys K (m, D)
tile by tile: a program owns BLOCK_M rows of A and walks its share of the key columns, computing each
(BLOCK_M, BLOCK_N) tile of S = A @ K.T with a K-loop over D. Extra memory is O(B) statistics and the
O(B*D) gradient buffers; the B x B matrix only ever exists one tile at a time.

  _rowstat_kernel  per row of A: clip: lse_i = logsumexp_j L_ij (online max / sum, fp32);
                   siglip: sum_j softplus(L_ij). CLIP runs it twice (image rows, then text rows: the
                   column statistics of L are the row statistics of L.T).
  _grad_kernel     recomputes the tiles, forms G = dloss/dL (softmax by row and/or column minus the
                   target, or sigmoid minus the target) and accumulates dA = s * G @ K over the columns,
                   one BLOCK_D slice of D per program; also sum_j G*S and sum_j G (dscale, dbias).
                   dtext is the same kernel with the roles of image and text swapped.

When too few row blocks exist to fill the GPU, the key columns are split across programs and the
partial statistics / gradients are combined afterwards (deterministic, no atomics). Block sizes come
from a heuristic (_blocks), never from multi-config autotuning. bf16 tl.dot is wrong in the interpreter:
operands are cast to fp32 when interpreting (FP32_DOT). fp32 inputs use IEEE fp32 dots (no tf32).

Matmul work executed, single process (useful: 2 B^2 D forward, 4 B^2 D backward): forward 4 B^2 D for
CLIP (two sweeps), 2 B^2 D for SigLIP; backward 2 launches x (2 B^2 D x ceil(D / BLOCK_D) recomputing
S, + 2 B^2 D for G @ K). With BLOCK_D = 256 at D = 512 that is 16 B^2 D for CLIP forward+backward,
2.7x the useful work: the price of keeping the B x B matrix out of memory with a register-resident
dA tile. BLOCK_D and the tile shape are the first things to tune on a GPU (untuned: no GPU was
available when this was written; `kfe bench contrastive` measures it).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from engine.backend import triton_interpreting
from engine.ops._target import gpu
from engine.ops import _alloc


@triton.jit
def _sim_tile(a_ptr, k_ptr, rows, cols, row_ok, col_ok, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              FP32_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """S = A[rows] @ K[cols].T as a (BLOCK_M, BLOCK_N) fp32 tile; masked rows/cols read as 0."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(a_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(k_ptr + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if FP32_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _softplus(x):
    # log1p(exp(-|x|)) without log1p: log(u) * t / (u - 1) with u = 1 + t is exact to rounding even when
    # t is tiny (Goldberg), which matters for SigLIP's many logits near -10 (softplus ~ 4.5e-5 each).
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    small = tl.where(u == 1.0, t, tl.log(u) * t / (u - 1.0))
    return tl.maximum(x, 0.0) + small


@triton.jit
def _rowstat_kernel(
    a_ptr,       # (NA, D) query rows (image rows, or text rows for CLIP's second direction)
    k_ptr,       # (NK, D) key rows
    params_ptr,  # (3,) fp32: logit scale s, logit bias b, unused here
    out_ptr,     # (SPLIT, NA) fp32 out: per split of the key columns, lse (clip) or sum softplus (siglip)
    NA, NK, D, cols_per_split,
    SIGLIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = rows < NA
    s = tl.load(params_ptr)
    bias = tl.load(params_ptr + 1)
    c_start = split * cols_per_split
    c_stop = tl.minimum(c_start + cols_per_split, NK)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)  # clip: sum exp(L - m); siglip: sum softplus(L)
    for c0 in range(c_start, c_stop, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_stop
        logits = _sim_tile(a_ptr, k_ptr, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K,
                           FP32_DOT, PRECISION) * s
        if SIGLIP:
            acc += tl.sum(tl.where(col_ok[None, :], _softplus(logits + bias), 0.0), axis=1)
        else:
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m = m_new
    if SIGLIP:
        out = acc
    else:
        out = m + tl.log(acc)
    tl.store(out_ptr + split * NA + rows, out, mask=row_ok)


@triton.jit
def _grad_kernel(
    a_ptr,       # (NA, D) query rows whose gradient this launch computes
    k_ptr,       # (NK, D) key rows
    lse_a_ptr,   # (NA,) fp32 row LSE of A's rows; read only when HAS_LSE_A
    lse_k_ptr,   # (NK,) fp32 LSE indexed by key (the other direction's rows); read only when HAS_LSE_K
    params_ptr,  # (3,) fp32: s, b, coef (= upstream grad / rows normaliser)
    da_ptr,      # (SPLIT, NA, D) fp32 out: coef * s * (G @ K), partial over key splits
    rowsum_ptr,  # (2, SPLIT, NA) fp32 out when PARAM_GRADS: coef * sum_j G*S and coef * sum_j G
    NA, NK, D, diag_offset, cols_per_split,
    SIGLIP: tl.constexpr, HAS_LSE_A: tl.constexpr, HAS_LSE_K: tl.constexpr, TERMS: tl.constexpr,
    PARAM_GRADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, G_SCALE: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    row_ok = rows < NA
    d_ok = dims < D
    s = tl.load(params_ptr)
    bias = tl.load(params_ptr + 1)
    coef = tl.load(params_ptr + 2)
    if HAS_LSE_A:
        lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0)
    c_start = split * cols_per_split
    c_stop = tl.minimum(c_start + cols_per_split, NK)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    gs = tl.zeros([BLOCK_M], tl.float32)
    gsum = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(c_start, c_stop, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_stop
        sim = _sim_tile(a_ptr, k_ptr, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K,
                        FP32_DOT, PRECISION)
        logits = sim * s
        target = (cols[None, :] - rows[:, None]) == diag_offset  # the positive pair of each row
        if SIGLIP:
            g = tl.sigmoid(logits + bias) - tl.where(target, 1.0, 0.0)
        else:
            g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_LSE_A:
                g += tl.exp(logits - lse_a[:, None])
            if HAS_LSE_K:
                lse_k = tl.load(lse_k_ptr + cols, mask=col_ok, other=0.0)
                g += tl.exp(logits - lse_k[None, :])
            g -= tl.where(target, TERMS, 0.0)  # TERMS = number of softmax terms in g (1 or 2)
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        if PARAM_GRADS:
            gs += tl.sum(g * sim, axis=1)
            gsum += tl.sum(g, axis=1)
        kd = tl.load(k_ptr + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(g, kd.to(tl.float32), acc, input_precision=PRECISION)
        else:  # G_SCALE keeps probabilities ~1/B out of fp16's subnormals; |G| <= 2, so no overflow
            acc = tl.dot((g * G_SCALE).to(kd.dtype), kd, acc, input_precision=PRECISION)
    acc = acc * (s * coef / G_SCALE)
    tl.store(da_ptr + (split * NA + rows)[:, None] * D + dims[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    if PARAM_GRADS:
        if tl.program_id(1) == 0:
            tl.store(rowsum_ptr + split * NA + rows, gs * coef, mask=row_ok)
            tl.store(rowsum_ptr + (tl.num_programs(2) + split) * NA + rows, gsum * coef, mask=row_ok)


def _blocks(NA: int, NK: int, D: int, device: torch.device) -> dict:
    """Tile sizes and the split of the key columns. The interpreter wants few, large programs."""
    p2 = triton.next_power_of_2
    target = gpu(device)
    if target is None:
        return dict(BLOCK_M=max(16, min(p2(NA), 128)), BLOCK_N=max(16, min(p2(NK), 128)),
                    BLOCK_K=max(16, min(p2(D), 256)), BLOCK_D=max(16, min(p2(D), 512)), split=1)
    # GPU: 64 x 64 tiles; the dA accumulator holds 64 x BLOCK_D fp32 in registers, so D beyond 256
    # is covered by several programs per row block (each recomputes its tiles: the price of no B x B).
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64 if D >= 64 else max(16, p2(D)), BLOCK_D=min(256, max(16, p2(D))))
    programs = triton.cdiv(NA, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_D"])
    cfg["split"] = max(1, min(triton.cdiv(2 * target.sm_count, programs), NK // 1024))
    return cfg


def _launch_cfg(cfg: dict, NK: int) -> tuple[int, int]:
    """(number of key splits, columns per split), the latter a multiple of BLOCK_N."""
    per = triton.cdiv(triton.cdiv(NK, cfg["split"]), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return triton.cdiv(NK, per), per


def _dot_flags(x: torch.Tensor) -> dict:
    # The interpreter's fp16 dot is right (numpy float16), so fp16 keeps its own path there and tests it.
    fp32 = x.dtype == torch.float32 or (triton_interpreting() and x.dtype == torch.bfloat16)
    return dict(FP32_DOT=fp32, PRECISION="ieee" if fp32 else None)  # None: the dtype's default


def _params(logit_scale, logit_bias, coef=None) -> torch.Tensor:
    s = logit_scale.reshape(1).float()
    b = torch.zeros_like(s) if logit_bias is None else logit_bias.reshape(1).float()
    c = torch.zeros_like(s) if coef is None else coef.reshape(1).float()
    return torch.cat([s, b, c])  # stays on the device: no host sync for s or the upstream gradient


def _row_stats(A, K, params, siglip):
    """(NA,) fp32 row statistic of A against K (lse, or sum of softplus)."""
    NA, D = A.shape
    cfg = _blocks(NA, K.shape[0], D, A.device)
    split, per = _launch_cfg(cfg, K.shape[0])
    part = torch.empty((split, NA), dtype=torch.float32, device=A.device)
    _rowstat_kernel[(triton.cdiv(NA, cfg["BLOCK_M"]), split)](
        A, K, params, part, NA, K.shape[0], D, per, SIGLIP=siglip, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **_dot_flags(A), num_warps=4)
    if split == 1:
        return part[0]
    return part.sum(0) if siglip else torch.logsumexp(part, dim=0)


def forward(image, text, logit_scale, logit_bias, kind, row_start, row_count):
    I, T = image.contiguous(), text.contiguous()
    n, siglip = row_count, kind == "siglip"
    R = slice(row_start, row_start + n)
    params = _params(logit_scale, logit_bias)
    s = params[0]
    diag = s * (I[R].float() * T[R].float()).sum(dim=1)  # (n,) positive-pair logits, before the bias
    loss = _alloc.empty((), dtype=torch.float32, device=I.device)
    if siglip:
        stat = _row_stats(I[R], T, params, True)
        loss.copy_((stat.sum() - (diag + params[1]).sum()) / n)
        return loss, _alloc.empty((0, n), dtype=torch.float32, device=I.device)
    stats = _alloc.empty((2, n), dtype=torch.float32, device=I.device)
    stats[0] = _row_stats(I[R], T, params, False)
    stats[1] = _row_stats(T[R], I, params, False)
    loss.copy_((stats.sum() - 2 * diag.sum()) / (2 * n))
    return loss, stats


def _grad(A, K, params, out, lse_a, lse_k, siglip, diag_offset, param_grads):
    """out (NA, D) fp32 += s * coef * G @ K; returns (sum G*S, sum G) * coef when param_grads."""
    NA, D = A.shape
    cfg = _blocks(NA, K.shape[0], D, A.device)
    split, per = _launch_cfg(cfg, K.shape[0])
    part = torch.empty((split, NA, D), dtype=torch.float32, device=A.device)
    rowsum = torch.empty((2, split, NA), dtype=torch.float32, device=A.device)
    dummy = params  # never read when the matching HAS_* flag is off
    grid = (triton.cdiv(NA, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_D"]), split)
    _grad_kernel[grid](
        A, K, dummy if lse_a is None else lse_a, dummy if lse_k is None else lse_k, params, part, rowsum,
        NA, K.shape[0], D, diag_offset, per, SIGLIP=siglip, HAS_LSE_A=lse_a is not None,
        HAS_LSE_K=lse_k is not None, TERMS=float((lse_a is not None) + (lse_k is not None)),
        PARAM_GRADS=param_grads, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=cfg["BLOCK_D"], G_SCALE=1024.0 if A.dtype == torch.float16 else 1.0, **_dot_flags(A),
        num_warps=8)
    out += part.sum(0) if split > 1 else part[0]
    return rowsum.sum(dim=(1, 2)) if param_grads else None


def backward(grad, image, text, logit_scale, logit_bias, stats, kind, row_start, row_count):
    I, T = image.contiguous(), text.contiguous()
    B, n, siglip = I.shape[0], row_count, kind == "siglip"
    R = slice(row_start, row_start + n)
    params = _params(logit_scale, logit_bias, grad.float() / (n if siglip else 2 * n))
    gI = torch.zeros(I.shape, dtype=torch.float32, device=I.device)
    gT = torch.zeros(T.shape, dtype=torch.float32, device=T.device)
    if siglip:
        sums = _grad(I[R], T, params, gI[R], None, None, True, row_start, True)
        _grad(T, I[R], params, gT, None, None, True, -row_start, False)
    elif n == B:  # G = softmax by row + softmax by column - 2 [i == j]; its transpose for dtext
        sums = _grad(I, T, params, gI, stats[0], stats[1], False, 0, True)
        _grad(T, I, params, gT, stats[1], stats[0], False, 0, False)
    else:  # image rows R vs all texts (as queries, then as keys); then text rows R vs all images
        sums = _grad(I[R], T, params, gI[R], stats[0], None, False, row_start, True)
        _grad(T, I[R], params, gT, None, stats[0], False, -row_start, False)
        sums = sums + _grad(T[R], I, params, gT[R], stats[1], None, False, row_start, True)
        _grad(I, T[R], params, gI, None, stats[1], False, -row_start, False)
    dimage, dtext = _alloc.empty_like(I), _alloc.empty_like(T)
    dimage.copy_(gI)
    dtext.copy_(gT)
    dscale = _alloc.empty((), dtype=torch.float32, device=I.device)
    dbias = _alloc.empty((), dtype=torch.float32, device=I.device)
    dscale.copy_(sums[0])
    dbias.copy_(sums[1] if siglip else torch.zeros_like(sums[1]))
    return dimage, dtext, dscale, dbias
