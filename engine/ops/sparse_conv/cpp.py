"""kfe::sparse_dwconv2d{,_rows} on the C++ CPU kernels of csrc/cpu/sparse_dwconv.cpp (engine._C)."""
from __future__ import annotations

import torch

from engine import _ext
from engine.ops import _alloc
from engine.ops.sparse_conv.taps import acc_dtype, taps_transposed

_ext.require()  # registers torch.ops.kfe._sparse_dwconv_*_cpp


def _bias(bias, x):
    return None if bias is None else bias.reshape(-1).to(acc_dtype(x)).contiguous()


def _wgrad(dy, x, nbr, mask, weight):
    C, k = weight.shape[0], weight.shape[-1]
    acc = acc_dtype(x)
    dwT = _alloc.empty((k * k, C), dtype=acc, device=x.device)
    dbias = _alloc.empty(C, dtype=acc, device=x.device)
    torch.ops.kfe._sparse_dwconv_wgrad_cpp(dy, x, nbr, mask, k, dwT, dbias)
    return dwT.t().contiguous().view(weight.shape), dbias  # (K, C) -> (C, 1, k, k)


def forward(x, weight, bias, mask):
    x = x.contiguous()
    y = _alloc.empty_like(x)
    torch.ops.kfe._sparse_dwconv_fwd_cpp(x, None, mask.contiguous(), taps_transposed(weight, x), _bias(bias, x),
                                         weight.shape[-1], y)
    return y


def backward(dy, x, weight, mask):
    x, dy, mask = x.contiguous(), dy.contiguous(), mask.contiguous()
    dx = _alloc.empty_like(x)
    k = weight.shape[-1]
    torch.ops.kfe._sparse_dwconv_fwd_cpp(dy, None, mask, taps_transposed(weight, x, flip=True), None, k, dx)
    return (dx, *_wgrad(dy, x, None, mask, weight))


def rows_forward(feats, neighbours, weight, bias):
    feats = feats.contiguous()
    y = _alloc.empty_like(feats)
    torch.ops.kfe._sparse_dwconv_fwd_cpp(feats, neighbours.contiguous(), None, taps_transposed(weight, feats),
                                         _bias(bias, feats), weight.shape[-1], y)
    return y


def rows_backward(dy, feats, neighbours, weight):
    feats, dy, neighbours = feats.contiguous(), dy.contiguous(), neighbours.contiguous()
    dfeats = _alloc.empty_like(feats)
    torch.ops.kfe._sparse_dwconv_fwd_cpp(dy, neighbours, None, taps_transposed(weight, feats, flip=True), None,
                                         weight.shape[-1], dfeats)
    return (dfeats, *_wgrad(dy, feats, neighbours, None, weight))
