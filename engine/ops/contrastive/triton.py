"""kfe::contrastive_loss in Triton: tiled CLIP / SigLIP loss that never allocates B x B (Inf-CL, 2024).

Counted budget (tests/engine/ops/test_contrastive_v2.py counts every tl.dot under the interpreter):
single process, B x B logits, D = embedding dim, exact multiples of the tiles:
                   launches   matrix FLOPs executed        useful (materialised)
  forward          1          2 B^2 D  (S once)            2 B^2 D
  backward         1          6 B^2 D  (S once, dI, dT)    4 B^2 D
  total            2          8 B^2 D                      6 B^2 D
(v1 executed 12-17 B^2 D for CLIP and 10-15 for SigLIP, growing with D.) Multi-process (rows R of
n rows, all B columns): CLIP forward 2 sweeps of n x B (4 n B D), backward 2 launches of 6 n B D;
SigLIP forward 2 n B D, backward 6 n B D. Bytes: every score tile reloads its A and K tiles
(B^2 D / BLOCK_N + B^2 D / BLOCK_M elements per pass), and the backward read-modify-writes fp32
dI/dT partials once per tile and D chunk; no B x B buffer exists.

A program owns BLOCK_M rows of A (queries) and walks its share of the key columns K, computing each
(BLOCK_M, BLOCK_N) tile of S = A @ K.T with a K-loop over D, logits L = s S (+ b).

  _fwd_kernel   one sweep. Rows: online log-sum-exp (clip) or sum of softplus (siglip). CLIP also
                writes per row block the column partials (max, sum exp) of each tile; the column LSE
                is their merge (a logsumexp over row blocks, in torch). The multi-process CLIP path
                runs it twice (image rows R vs all texts, text rows R vs all images) without columns.
  _bwd_kernel   one pass. Recomputes each tile once, forms G = dloss/dL (softmax by row and/or by
                column minus the target, or sigmoid minus the target) and, per D chunk, adds G @ K
                into the program's own fp32 dI partial and G.T @ A into its own dT partial
                (read-modify-write of rows no other program touches: deterministic, no atomics).
                Programs form a (row groups x key splits) grid; partials are summed in torch.
                Also sum_j G*S and sum_j G (dscale, dbias).

Precision (what runs when): the dots take the dtype of the embeddings the op receives, with fp32
accumulation. Under autocast, `contrastive_loss` first casts float32 embeddings to the autocast dtype
(as torch.matmul would; F.normalize returns float32 under autocast), so bf16/fp16 dots run on tensor
cores. float32 outside autocast: TF32 dots when torch.get_float32_matmul_precision() is "high" or
"medium", exact IEEE fp32 when it is "highest" (torch's default). The interpreter's own bf16 dot is
wrong (it multiplies the raw bits), so under TRITON_INTERPRET=1 engine.ops._interpret computes bf16
dots exactly through fp32 while the kernel still issues them with bf16 operands.

When too few row blocks exist to fill the GPU, the key columns are split across programs and the
partials combined afterwards (deterministic). Block sizes come from a heuristic (_blocks), never from
multi-config autotuning; untuned: no GPU was available when this was written. The fp32 backward (IEEE
or TF32 dots) walks D in 32-wide chunks instead of 64: on sm_90 (python -m engine.bench.sm90) the IEEE
backward then holds 128-162 registers and no stack (was 2736-2832 B of spills per thread), the TF32
one 168-176 registers and 88 KiB of shared memory (was 209 and 144 KiB); same FLOPs and bytes.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from engine.backend import triton_interpreting
from engine.ops import _alloc, _interpret
from engine.ops._target import gpu


@triton.jit
def _sim_tile(a_ptr, k_ptr, rows, cols, row_ok, col_ok, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """S = A[rows] @ K[cols].T as a (BLOCK_M, BLOCK_N) fp32 tile; masked rows/cols read as 0."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(a_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(k_ptr + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
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
def _fwd_kernel(
    a_ptr,       # (NA, D) query rows (image rows, or text rows for CLIP's second direction)
    k_ptr,       # (NK, D) key rows
    params_ptr,  # (3,) fp32: logit scale s, logit bias b, unused here
    out_ptr,     # (SPLIT, NA) fp32 out: per split of the key columns, lse (clip) or sum softplus (siglip)
    col_ptr,     # (2, cdiv(NA, BLOCK_M), NK) fp32 out when COL_STATS: per row block, column max and sum exp
    NA, NK, D, cols_per_split,
    SIGLIP: tl.constexpr, COL_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    rb = tl.program_id(0)
    rows = rb.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
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
        logits = _sim_tile(a_ptr, k_ptr, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * s
        if SIGLIP:
            acc += tl.sum(tl.where(col_ok[None, :], _softplus(logits + bias), 0.0), axis=1)
        else:
            if COL_STATS:  # this row block's share of each column's LSE, from the same tile
                by_col = tl.where(row_ok[:, None], logits, float("-inf"))
                cmax = tl.max(by_col, axis=0)
                csum = tl.sum(tl.exp(by_col - cmax[None, :]), axis=0)
                n_rb = tl.num_programs(0)
                tl.store(col_ptr + rb * NK + cols, cmax, mask=col_ok)
                tl.store(col_ptr + (n_rb + rb) * NK + cols, csum, mask=col_ok)
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
def _bwd_kernel(
    a_ptr,       # (NA, D) query rows
    k_ptr,       # (NK, D) key rows
    lse_a_ptr,   # (NA,) fp32 row LSE of A's rows; read only when HAS_LSE_A
    lse_k_ptr,   # (NK,) fp32 LSE indexed by key (the other direction's rows); read only when HAS_LSE_K
    params_ptr,  # (3,) fp32: s, b, coef (= upstream grad / rows normaliser)
    da_ptr,      # (SPLIT, NA, D) fp32, zeroed: G_SCALE * (G @ K), partial over key splits
    dk_ptr,      # (GROUPS, NK, D) fp32, zeroed: G_SCALE * (G.T @ A), partial over row groups
    rowsum_ptr,  # (2, SPLIT, NA) fp32 out when PARAM_GRADS: coef * sum_j G*S and coef * sum_j G
    NA, NK, D, diag_offset, cols_per_split, blocks_per_group,
    SIGLIP: tl.constexpr, HAS_LSE_A: tl.constexpr, HAS_LSE_K: tl.constexpr, TERMS: tl.constexpr,
    PARAM_GRADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    G_SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    group = tl.program_id(0)
    split = tl.program_id(1)
    s = tl.load(params_ptr)
    bias = tl.load(params_ptr + 1)
    coef = tl.load(params_ptr + 2)
    c_start = split * cols_per_split
    c_stop = tl.minimum(c_start + cols_per_split, NK)
    rb_stop = tl.minimum((group + 1) * blocks_per_group, tl.cdiv(NA, BLOCK_M))
    for rb in range(group * blocks_per_group, rb_stop):
        rows = (rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < NA
        if HAS_LSE_A:
            lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0)
        gs = tl.zeros([BLOCK_M], tl.float32)
        gsum = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(c_start, c_stop, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < c_stop
            sim = _sim_tile(a_ptr, k_ptr, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
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
            # G in the embeddings' dtype (bf16/fp16 tensor-core dots); G_SCALE keeps fp16 probabilities
            # ~1/B out of the subnormals (|G| <= 2, so no overflow)
            g = (g * G_SCALE).to(a_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_K):  # same tile, every D chunk: S is never recomputed
                dims = d0 + tl.arange(0, BLOCK_K)
                d_ok = dims < D
                kd = tl.load(k_ptr + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & d_ok[None, :],
                             other=0.0)
                ad = tl.load(a_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & d_ok[None, :],
                             other=0.0)
                pa = da_ptr + (split * NA + rows)[:, None] * D + dims[None, :]
                ma = row_ok[:, None] & d_ok[None, :]
                tl.store(pa, tl.dot(g, kd, tl.load(pa, mask=ma, other=0.0), input_precision=PRECISION), mask=ma)
                pk = dk_ptr + (group * NK + cols)[:, None] * D + dims[None, :]
                mk = col_ok[:, None] & d_ok[None, :]
                tl.store(pk, tl.dot(tl.trans(g), ad, tl.load(pk, mask=mk, other=0.0), input_precision=PRECISION),
                         mask=mk)
        if PARAM_GRADS:
            tl.store(rowsum_ptr + split * NA + rows, gs * coef, mask=row_ok)
            tl.store(rowsum_ptr + (tl.num_programs(1) + split) * NA + rows, gsum * coef, mask=row_ok)


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


def _backward_blocks(cfg: dict, A: torch.Tensor) -> dict:
    """The backward's tiles: on a GPU, fp32 operands (IEEE FMA or TF32 dots) hold twice the registers
    of 16-bit ones, and with 64-wide D chunks the backward spilled 2.7-2.8 KB per thread on sm_90
    (python -m engine.bench.sm90); 32-wide chunks do not spill."""
    if A.dtype == torch.float32 and gpu(A.device) is not None:
        return {**cfg, "BLOCK_K": min(cfg["BLOCK_K"], 32)}
    return cfg


def _launch_cfg(cfg: dict, NK: int) -> tuple[int, int]:
    """(number of key splits, columns per split), the latter a multiple of BLOCK_N."""
    per = triton.cdiv(triton.cdiv(NK, cfg["split"]), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return triton.cdiv(NK, per), per


def _dot_flags(x: torch.Tensor) -> dict:
    """The dots' input precision: bf16/fp16 in their own dtype; fp32 as TF32 or IEEE per torch's setting."""
    if x.dtype != torch.float32:
        if triton_interpreting() and x.dtype == torch.bfloat16:
            _interpret.exact_bf16_dot()
        return dict(PRECISION=None)  # None: the dtype's default (tensor cores, fp32 accumulation)
    return dict(PRECISION="ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32")


def _params(logit_scale, logit_bias, coef=None) -> torch.Tensor:
    s = logit_scale.reshape(1).float()
    b = torch.zeros_like(s) if logit_bias is None else logit_bias.reshape(1).float()
    c = torch.zeros_like(s) if coef is None else coef.reshape(1).float()
    return torch.cat([s, b, c])  # stays on the device: no host sync for s or the upstream gradient


PARTIALS_BYTES = 1 << 28  # cap on the backward's fp32 dT partials (GROUPS x NK x D): 256 MiB


def _row_groups(row_blocks: int, NK: int, D: int, device: torch.device) -> int:
    """How many programs share the row blocks in the backward (each keeps its own dT partial)."""
    if triton_interpreting() or device.type != "cuda":
        return 1
    return max(1, min(row_blocks, PARTIALS_BYTES // (4 * NK * D)))


def _row_stats(A, K, params, siglip, col_stats=False):
    """(NA,) fp32 row statistic of A against K (lse, or sum of softplus); with col_stats also the
    (NK,) column LSE of the same tiles."""
    NA, D = A.shape
    NK = K.shape[0]
    cfg = _blocks(NA, NK, D, A.device)
    split, per = _launch_cfg(cfg, NK)
    row_blocks = triton.cdiv(NA, cfg["BLOCK_M"])
    part = torch.empty((split, NA), dtype=torch.float32, device=A.device)
    cols = torch.empty((2, row_blocks, NK) if col_stats else (0,), dtype=torch.float32, device=A.device)
    _fwd_kernel[(row_blocks, split)](
        A, K, params, part, cols, NA, NK, D, per, SIGLIP=siglip, COL_STATS=col_stats, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **_dot_flags(A), num_warps=4)
    rows = part[0] if split == 1 else part.sum(0) if siglip else torch.logsumexp(part, dim=0)
    if not col_stats:
        return rows
    return rows, torch.logsumexp(cols[0] + cols[1].log(), dim=0)  # merge the row blocks' (max, sum exp)


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
    if n == I.shape[0]:  # one sweep: image rows and text rows (the columns) from the same tiles
        stats[0], stats[1] = _row_stats(I, T, params, False, col_stats=True)
    else:
        stats[0] = _row_stats(I[R], T, params, False)
        stats[1] = _row_stats(T[R], I, params, False)
    loss.copy_((stats.sum() - 2 * diag.sum()) / (2 * n))
    return loss, stats


def _grad(A, K, params, out_a, out_k, lse_a, lse_k, siglip, diag_offset, param_grads):
    """out_a (NA, D) += s coef G @ K and out_k (NK, D) += s coef G.T @ A, fp32, from one pass over
    the tiles; returns (sum G*S, sum G) * coef when param_grads."""
    NA, D = A.shape
    NK = K.shape[0]
    cfg = _backward_blocks(_blocks(NA, NK, D, A.device), A)
    split, per = _launch_cfg(cfg, NK)
    row_blocks = triton.cdiv(NA, cfg["BLOCK_M"])
    groups = _row_groups(row_blocks, NK, D, A.device)
    per_group = triton.cdiv(row_blocks, groups)
    groups = triton.cdiv(row_blocks, per_group)
    part_a = torch.zeros((split, NA, D), dtype=torch.float32, device=A.device)
    part_k = torch.zeros((groups, NK, D), dtype=torch.float32, device=A.device)
    rowsum = torch.empty((2, split, NA), dtype=torch.float32, device=A.device)
    dummy = params  # never read when the matching HAS_* flag is off
    g_scale = 1024.0 if A.dtype == torch.float16 else 1.0
    _bwd_kernel[(groups, split)](
        A, K, dummy if lse_a is None else lse_a, dummy if lse_k is None else lse_k, params, part_a, part_k,
        rowsum, NA, NK, D, diag_offset, per, per_group, SIGLIP=siglip, HAS_LSE_A=lse_a is not None,
        HAS_LSE_K=lse_k is not None, TERMS=float((lse_a is not None) + (lse_k is not None)),
        PARAM_GRADS=param_grads, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        G_SCALE=g_scale, **_dot_flags(A), num_warps=8)
    scale = params[0] * params[2] / g_scale
    out_a += (part_a.sum(0) if split > 1 else part_a[0]) * scale
    out_k += (part_k.sum(0) if groups > 1 else part_k[0]) * scale
    return rowsum.sum(dim=(1, 2)) if param_grads else None


def backward(grad, image, text, logit_scale, logit_bias, stats, kind, row_start, row_count):
    I, T = image.contiguous(), text.contiguous()
    B, n, siglip = I.shape[0], row_count, kind == "siglip"
    R = slice(row_start, row_start + n)
    params = _params(logit_scale, logit_bias, grad.float() / (n if siglip else 2 * n))
    gI = torch.zeros(I.shape, dtype=torch.float32, device=I.device)
    gT = torch.zeros(T.shape, dtype=torch.float32, device=T.device)
    if siglip:  # image rows R vs all texts
        sums = _grad(I[R], T, params, gI[R], gT, None, None, True, row_start, True)
    elif n == B:  # G = softmax by row + softmax by column - 2 [i == j]
        sums = _grad(I, T, params, gI, gT, stats[0], stats[1], False, 0, True)
    else:  # image rows R vs all texts; text rows R vs all images
        sums = _grad(I[R], T, params, gI[R], gT, stats[0], None, False, row_start, True)
        sums = sums + _grad(T[R], I, params, gT[R], gI, stats[1], None, False, row_start, True)
    dimage, dtext = _alloc.empty_like(I), _alloc.empty_like(T)
    dimage.copy_(gI)
    dtext.copy_(gT)
    dscale = _alloc.empty((), dtype=torch.float32, device=I.device)
    dbias = _alloc.empty((), dtype=torch.float32, device=I.device)
    dscale.copy_(sums[0])
    dbias.copy_(sums[1] if siglip else torch.zeros_like(sums[1]))
    return dimage, dtext, dscale, dbias
