"""Image-text contrastive loss (CLIP, arXiv 2103.00020, Fig. 3; SigLIP, arXiv 2303.15343, Alg. 1): the spec.

For L2-normalised embeddings I, T of shape (B, D), a scalar scale s and (SigLIP) bias b, the logits are
L = s * I @ T.T (+ b); row i of L scores image i against every text, column j text j against every image.

    clip     loss = ( CE(L, diag) + CE(L.T, diag) ) / 2        CE averaged over the B rows
    siglip   loss = -sum_ij log sigmoid(z_ij * L_ij) / B         z_ij = 1 if i == j else -1

Multi-process training computes, on each rank, the terms of its own rows only: `row_start`/`row_count`
select the rows R (both directions for CLIP: image rows R against all texts, text rows R against all
images; image rows R against all texts for SigLIP), and the sum is divided by |R| instead of B. With
R = all rows this is the loss above. The value and gradients are taken in float32 (float64 input:
float64); the loss is returned in that accumulation dtype, not rounded to bf16.

This file holds two things:
  * `contrastive_loss`: the materialised formulation (open_clip's ClipLoss / SigLipLoss) - the spec the
    tests compare every backend against. It builds B x B logits.
  * `forward` / `backward`: the `reference` backend of kfe::contrastive_loss, the same function chunked
    over rows (at most ~4M logits live at once), so a CPU run at B = 32768 stays far below the 8 GB
    that materialised logits take. Both passes are one sweep over row chunks; the backward recomputes
    each chunk from the per-row log-sum-exp statistics the forward kept (flash-attention style).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("clip", "siglip")
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}  # logits per chunk: 16 MB (CPU) / 256 MB (GPU) in fp32


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None, kind: str = "clip", row_start: int = 0,
                     row_count: int | None = None) -> torch.Tensor:
    """The spec: materialised B x B logits, differentiable by autograd."""
    acc = acc_dtype(image)
    B = image.shape[0]
    n = B - row_start if row_count is None else row_count
    rows = torch.arange(row_start, row_start + n, device=image.device)
    logits = logit_scale.to(acc).reshape(()) * image.to(acc) @ text.to(acc).T  # (B, B)
    if kind == "clip":
        per_image = F.cross_entropy(logits[rows], rows, reduction="sum")       # image rows R vs all texts
        per_text = F.cross_entropy(logits.T[rows], rows, reduction="sum")      # text rows R vs all images
        return (per_image + per_text) / (2 * n)
    if logit_bias is not None:
        logits = logits + logit_bias.to(acc).reshape(())
    z = 2 * torch.eye(B, dtype=acc, device=image.device)[rows] - 1            # (n, B): +1 on the diagonal
    return -F.logsigmoid(z * logits[rows]).sum() / n


# ----------------------------------------------------------------------------------------------------
# The chunked backend. Shared structure of both kinds, per row i of a query matrix A against keys K:
#   row statistic  clip: lse_i = logsumexp_j L_ij          siglip: sum_j softplus(L_ij)
#   loss           (sum of row statistics - sum of diagonal logits) / |R|   (clip: both directions / 2)
#   dL/dL_ij       clip: softmax_ij - [i == j]             siglip: sigmoid(L_ij) - [i == j]
# since -log sigmoid(z L) = softplus(L) - [z = 1] L. dA = s (G K), dK = s (G.T A), ds = sum G * S.
# ----------------------------------------------------------------------------------------------------
def _chunks(n: int, B: int, device: torch.device):
    step = max(1, min(n, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // max(B, 1)))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _setup(image, text, logit_scale, logit_bias):
    acc = acc_dtype(image)
    s = logit_scale.reshape(()).to(acc)
    b = torch.zeros((), dtype=acc, device=image.device) if logit_bias is None else logit_bias.reshape(()).to(acc)
    return acc, image.to(acc).contiguous(), text.to(acc).contiguous(), s, b


def _row_stats(A, K, s, b, kind, col_lse=None):
    """Per-row statistic of A (n, D) against K (B, D); with col_lse (B,), also fold in the columns' LSE."""
    out = A.new_empty(A.shape[0])
    for lo, hi in _chunks(A.shape[0], K.shape[0], A.device):
        L = torch.mm(A[lo:hi] * s, K.T)  # (c, B) logits of this chunk (scaling the (c, D) side is cheaper)
        if kind == "clip":
            out[lo:hi] = torch.logsumexp(L, dim=1)
            if col_lse is not None:
                torch.logaddexp(col_lse, torch.logsumexp(L, dim=0), out=col_lse)
        else:
            out[lo:hi] = F.softplus(L.add_(b)).sum(dim=1)
    return out


def forward(image, text, logit_scale, logit_bias, kind, row_start, row_count):
    """(loss, stats): stats (2, n) = [lse of image rows R, lse of text rows R] for clip, (0, n) for siglip."""
    acc, I, T, s, b = _setup(image, text, logit_scale, logit_bias)
    B, n = I.shape[0], row_count
    R = slice(row_start, row_start + n)
    diag = s * (I[R] * T[R]).sum(dim=1)  # (n,) diagonal logits L_ii, i in R (before the bias)
    if kind == "siglip":
        stat = _row_stats(I[R], T, s, b, kind)
        return (stat.sum() - (diag + b).sum()) / n, I.new_empty((0, n))
    if n == B:  # every row is ours: one sweep gives the row and the column statistics
        col = torch.full((B,), float("-inf"), dtype=acc, device=I.device)
        row = _row_stats(I, T, s, b, kind, col_lse=col)
    else:
        row, col = _row_stats(I[R], T, s, b, kind), _row_stats(T[R], I, s, b, kind)
    return (row.sum() + col.sum() - 2 * diag.sum()) / (2 * n), torch.stack([row, col])


def _grad_sweep(A, K, gA, gK, s, b, coef, kind, diag_offset, lse_a=None, lse_k=None):
    """Accumulate G K into gA and G.T A into gK over row chunks of A; return (sum G*S, sum G).

    G_ij = coef * (p_ij - t [j == i + diag_offset]) with p = softmax by row (lse_a), + softmax by
    column (lse_k), or sigmoid (siglip); t counts the terms (1 or 2). gA and gK are unscaled by s.
    coef is applied to the (c, D) products, not to the (c, B) chunk: one pass fewer over the logits.
    """
    gs = torch.zeros((), dtype=A.dtype, device=A.device)
    gsum = torch.zeros((), dtype=A.dtype, device=A.device)
    for lo, hi in _chunks(A.shape[0], K.shape[0], A.device):
        G = torch.mm(A[lo:hi] * s, K.T)  # (c, B) logits, turned into G / coef in place
        if kind == "siglip":
            G.add_(b).sigmoid_()
            target = 1
        else:
            target = (lse_a is not None) + (lse_k is not None)
            Q = torch.sub(G, lse_k).exp_() if lse_k is not None else None
            G = G.sub_(lse_a[lo:hi, None]).exp_() if lse_a is not None else Q
            if Q is not None and G is not Q:
                G.add_(Q)
            del Q
        G.diagonal(offset=diag_offset + lo).sub_(target)
        gA_rows = torch.mm(G, K).mul_(coef)  # (c, D)
        gA[lo:hi] += gA_rows
        gK.addmm_(G.T, A[lo:hi] * coef)
        gs += (gA_rows * A[lo:hi]).sum()  # sum_ij G_ij S_ij without keeping S
        if kind == "siglip":
            gsum += G.sum() * coef
    return gs, gsum


def backward(grad, image, text, logit_scale, logit_bias, stats, kind, row_start, row_count):
    """(dimage, dtext, dlogit_scale (), dlogit_bias ()) in the inputs' dtype / the accumulation dtype."""
    acc, I, T, s, b = _setup(image, text, logit_scale, logit_bias)
    B, n = I.shape[0], row_count
    R = slice(row_start, row_start + n)
    gI, gT = torch.zeros_like(I), torch.zeros_like(T)
    coef = grad.to(acc).reshape(()) / (n if kind == "siglip" else 2 * n)
    if kind == "siglip":
        gs, gb = _grad_sweep(I[R], T, gI[R], gT, s, b, coef, kind, row_start)
    elif n == B:  # G = softmax by row + softmax by column - 2 [i == j]: one sweep
        gs, gb = _grad_sweep(I, T, gI, gT, s, b, coef, kind, 0, lse_a=stats[0], lse_k=stats[1])
    else:  # image rows R against all texts, then text rows R against all images
        gs, gb = _grad_sweep(I[R], T, gI[R], gT, s, b, coef, kind, row_start, lse_a=stats[0])
        gs2, _ = _grad_sweep(T[R], I, gT[R], gI, s, b, coef, kind, row_start, lse_a=stats[1])
        gs = gs + gs2
    dbias = gb if kind == "siglip" else torch.zeros_like(gb)
    return (gI.mul_(s).to(image.dtype), gT.mul_(s).to(text.dtype), gs, dbias)
