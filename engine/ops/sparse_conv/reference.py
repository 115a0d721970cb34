"""Submanifold depthwise convolution and the dense-masked ConvNeXt V2 block: the spec.

FCMAE (ConvNeXt V2, arXiv 2301.00808, Sec. 3.1) encodes only the visible part of a masked image,
as a sparse tensor, so that the convolutions cannot "leak" information across the mask. The
depthwise convolution is submanifold (Graham & van der Maaten, arXiv 1706.01307): outputs exist only
at visible sites and masked inputs count as zero. With m the (N, H, W) visibility mask:

    y = dwconv2d(x * m, weight, bias, padding=k // 2) * m                  (Eq. S1)

The dense-masked ConvNeXt V2 block is the official block (dwconv 7x7 -> LayerNorm -> Linear 4x ->
GELU -> GRN -> Linear -> residual) with Eq. S1 as its dwconv and GRN statistics over the visible
sites of each sample; its output is exactly 0 at masked sites (they do not exist in the sparse
encoder). The downsampling layer (LayerNorm + Conv2d(k=2, s=2)) sees masked inputs as zero and
outputs where any of its 4 inputs is visible.

Also here: the reference *backend* (forward / backward written out) of kfe::sparse_dwconv2d on the
dense layout and of kfe::sparse_dwconv2d_rows on the gathered-rows layout of engine.sparse.
Sums run in float32 (float64 for float64 input).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.ops.grn import reference as grn_reference


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _visible(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not a product: NaN/inf at masked sites must not leak (NaN * 0 = NaN).
    return torch.where(mask[..., None], x, 0)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dense depthwise conv of channels-last x with 'same' padding, in x's dtype."""
    C, k = x.shape[-1], weight.shape[-1]
    bias = None if bias is None else bias.to(x.dtype)
    y = F.conv2d(x.permute(0, 3, 1, 2), weight.to(x.dtype), bias, padding=k // 2, groups=C)  # (N, C, H, W)
    return y.permute(0, 2, 3, 1)  # (N, H, W, C)


def sparse_dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    mask: torch.Tensor) -> torch.Tensor:
    """Eq. S1 for x (N, H, W, C), weight (C, 1, k, k), bias (C,) or None, mask bool (N, H, W)."""
    acc = _acc_dtype(x)
    y = _conv(_visible(x.to(acc), mask), weight, bias)
    return _visible(y, mask).to(x.dtype)


def masked_block(x, mask, dw_weight, dw_bias, norm_weight, norm_bias, pw1_weight, pw1_bias, grn_gamma,
                 grn_beta, pw2_weight, pw2_bias, eps: float = 1e-6):
    """The dense-masked ConvNeXt V2 block (official Block, arXiv 2301.00808 Fig. 5) on x (N, H, W, C).

    Parameters are the official ones (dwconv.weight (C, 1, 7, 7), norm.*, pwconv1.*, grn.gamma/beta
    (1, 1, 1, 4C), pwconv2.*); no drop path. Returns 0 at masked sites.
    """
    C = x.shape[-1]
    h = sparse_dwconv2d(x, dw_weight, dw_bias, mask)                 # mask re-applied after the dwconv
    h = F.layer_norm(h, (C,), norm_weight, norm_bias, eps)
    h = F.gelu(F.linear(h, pw1_weight, pw1_bias))                    # (N, H, W, 4C)
    h = grn_reference.grn(h, grn_gamma, grn_beta, mask, eps)         # statistics over visible sites, per sample
    h = F.linear(h, pw2_weight, pw2_bias)
    return _visible(x + h, mask)


def downsample_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, H // 2, W // 2): visible where any site of the 2x2 window is visible."""
    return F.max_pool2d(mask[:, None].to(torch.uint8), 2)[:, 0].bool()


def masked_downsample(x, mask, norm_weight, norm_bias, conv_weight, conv_bias, eps: float = 1e-6):
    """ConvNeXt's downsample layer (LayerNorm over C, Conv2d(k=2, s=2)) on visible sites only.

    Masked inputs count as zero after the norm; returns (y (N, H/2, W/2, C'), the coarse mask).
    """
    coarse = downsample_mask(mask)
    h = _visible(F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps), mask)
    y = F.conv2d(h.permute(0, 3, 1, 2), conv_weight, conv_bias, stride=2).permute(0, 2, 3, 1)
    return _visible(y, coarse), coarse


# ---- the reference backend of the ops: what the fast paths implement, backward written out ----

def forward(x, weight, bias, mask):
    return sparse_dwconv2d(x, weight, bias, mask).contiguous()


def backward(dy, x, weight, mask):
    """(dx, dweight (C, 1, k, k), dbias (C,)); dweight / dbias in the accumulation dtype."""
    acc = _acc_dtype(x)
    C, k = x.shape[-1], weight.shape[-1]
    g = _visible(dy.to(acc), mask).permute(0, 3, 1, 2)                # (N, C, H, W)
    xm = _visible(x.to(acc), mask).permute(0, 3, 1, 2)
    w = weight.to(acc)
    dx = torch.nn.grad.conv2d_input(xm.shape, w, g, padding=k // 2, groups=C).permute(0, 2, 3, 1)
    dw = torch.nn.grad.conv2d_weight(xm, w.shape, g, padding=k // 2, groups=C)
    return _visible(dx, mask).to(x.dtype).contiguous(), dw, g.sum(dim=(0, 2, 3))


def _padded(feats: torch.Tensor, neighbours: torch.Tensor):
    """feats with a zero row appended, and the table with -1 pointing at it (V, K) int64."""
    V = feats.shape[0]
    ext = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])      # (V + 1, C)
    return ext, torch.where(neighbours >= 0, neighbours.long(), V)


def rows_forward(feats, neighbours, weight, bias):
    """y[v] = bias + sum_t weight[:, t] * feats[neighbours[v, t]] over valid taps; feats (V, C)."""
    acc = _acc_dtype(feats)
    C, K = feats.shape[1], neighbours.shape[1]
    ext, idx = _padded(feats.to(acc), neighbours)
    w = weight.reshape(C, K).to(acc)
    y = feats.new_zeros(feats.shape, dtype=acc) if bias is None else bias.to(acc).expand(feats.shape)
    for t in range(K):  # one tap at a time: a (V, K, C) gather would not fit at real sizes
        y = y + ext[idx[:, t]] * w[:, t]
    return y.to(feats.dtype).contiguous()


def rows_backward(dy, feats, neighbours, weight):
    """(dfeats, dweight (C, 1, k, k), dbias (C,)): the transpose of rows_forward, by scatter-add."""
    acc = _acc_dtype(feats)
    V, C = feats.shape
    K = neighbours.shape[1]
    ext, idx = _padded(feats.to(acc), neighbours)
    g = dy.to(acc)
    w = weight.reshape(C, K).to(acc)
    dext = torch.zeros(V + 1, C, dtype=acc, device=feats.device)
    dw = torch.empty(C, K, dtype=acc, device=feats.device)
    for t in range(K):
        dext.index_add_(0, idx[:, t], g * w[:, t])
        dw[:, t] = (g * ext[idx[:, t]]).sum(dim=0)
    return dext[:V].to(feats.dtype).contiguous(), dw.reshape(weight.shape), g.sum(dim=0)
