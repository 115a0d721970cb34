"""`kfe bench sparse`: the submanifold depthwise conv and the sparse ConvNeXt V2 block against the
dense-masked computation (eager and torch.compile), on ConvNeXt-V2-Base stage shapes, at FCMAE mask
ratios 0, 0.4, 0.6, 0.75 (patch-aligned: a 7x7 grid of 32 px patches of a 224 px image, so blocks of
8x8 sites at stage 1 down to 1x1 at stage 4).

Providers (same function, visible sites compared; each output 0 or absent at masked sites):
  dwconv  reference            reference.sparse_dwconv2d: dense F.conv2d on masked x, mask re-applied
          compiled-reference   torch.compile of it
          kfe                  kfe::sparse_dwconv2d, dense in / dense out (no table; visible sites only)
          kfe-rows             gather the visible rows, kfe::sparse_dwconv2d_rows on the stage's table
  block   reference            reference.masked_block (dense, GRN over visible sites), eager
          compiled-reference   torch.compile of it
          kfe-dense            the same dense-masked block on kfe::sparse_dwconv2d and kfe::grn
          kfe-sparse           gather, then SparseConvNeXtV2Block on the rows (engine.sparse)
The stage (index + neighbour table) is built once per mask, outside the timing: one stage serves all
blocks of an encoder stage (3 to 27 in ConvNeXt-V2-Base) forward and backward.

Useful FLOPs count visible sites only (dwconv 2*k*k*C per site and pass; block adds 16*C^2 for the
two Linear layers); minimum bytes (dwconv): read x's and write y's visible rows, backward reads dy
and x and writes dx.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine.bench.core import Case
from engine.nn import SparseConvNeXtV2Block
from engine.ops import grn as kfe_grn
from engine.ops.sparse_conv import reference
from engine.ops.sparse_conv.op import sparse_dwconv2d, sparse_dwconv2d_rows
from engine.sparse import SparseStage

# ConvNeXt-V2-Base (dims 128..1024) at a 224 px input: stage resolutions 56, 28, 14, 7.
GPU_SIZES = [(64, 56, 56, 128), (64, 28, 28, 256), (64, 14, 14, 512), (64, 7, 7, 1024)]
CPU_SIZES = [(4, 56, 56, 128), (4, 28, 28, 256), (4, 14, 14, 512), (4, 7, 7, 1024)]
RATIOS = (0.0, 0.4, 0.6, 0.75)
PATCH_GRID = 7  # 224 px / 32 px patches


def fcmae_mask(N: int, H: int, W: int, ratio: float, seed: int = 0, device="cpu") -> torch.Tensor:
    """FCMAE's random patch mask (official gen_random_mask: keep int(L * (1 - ratio)) of L patches per
    sample) upsampled to (N, H, W), True = visible. H and W must be multiples of the patch grid."""
    if H % PATCH_GRID or W % PATCH_GRID:
        raise ValueError(f"fcmae masks need H, W multiples of {PATCH_GRID}, got {H}x{W}")
    L = PATCH_GRID * PATCH_GRID
    keep = int(L * (1 - ratio))
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(N, L, generator=gen).argsort(dim=1)
    visible = torch.zeros(N, L, dtype=torch.bool).scatter_(1, order[:, :keep], True)
    grid = visible.reshape(N, PATCH_GRID, PATCH_GRID)
    return grid.repeat_interleave(H // PATCH_GRID, 1).repeat_interleave(W // PATCH_GRID, 2).to(device)


@functools.lru_cache(maxsize=None)
def _compiled(fn, shape):  # one compiled function per shape: dynamo's recompile limit is 8
    return torch.compile(fn, dynamic=False)


def _kfe_dense_block(x, mask, stage, dw_w, dw_b, n_w, n_b, w1, b1, gamma, beta, w2, b2):
    h = sparse_dwconv2d(x, dw_w, dw_b, mask)
    h = F.gelu(F.linear(F.layer_norm(h, (x.shape[-1],), n_w, n_b, 1e-6), w1, b1))
    h = F.linear(kfe_grn(h, gamma, beta, mask), w2, b2)
    return torch.where(mask[..., None], x + h, 0)


def _sparse_block(C: int, device):
    block = SparseConvNeXtV2Block(C).to(device)
    names = [n for n, _ in block.named_parameters()]

    def run(x, mask, stage, *params):
        out = torch.func.functional_call(block, dict(zip(names, params)), (stage.gather(x),))
        return out.feats
    return run


def _rows(x, weight, bias, mask, stage):
    return sparse_dwconv2d_rows(stage.gather(x).feats, stage.neighbours, weight, bias)


def _block_params(C: int, dtype, device, gen):
    def r(*shape, scale=0.1):
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)
    return (r(C, 1, 7, 7), r(C), 1 + r(C), r(C), r(4 * C, C), r(4 * C), r(1, 1, 1, 4 * C), r(1, 1, 1, 4 * C),
            r(C, 4 * C), r(C))


def cases(device: torch.device, sizes=None, dtypes=None, ratios=RATIOS) -> list[Case]:
    sizes = sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32])
    out = []
    for shape in sizes:
        if len(shape) != 4:
            raise ValueError(f"sparse sizes are NxHxWxC, got {'x'.join(map(str, shape))}")
        N, H, W, C = shape
        for dtype in dtypes:
            es = torch.empty((), dtype=dtype).element_size()
            for ratio in ratios:
                mask = fcmae_mask(N, H, W, ratio, device=device)
                V = int(mask.sum())
                name = f"{'x'.join(map(str, shape))} mask {ratio:.2f}"

                def conv_inputs(shape=shape, dtype=dtype, mask=mask):
                    gen = torch.Generator().manual_seed(0)
                    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                    w = (torch.randn(shape[-1], 1, 7, 7, generator=gen) * 0.1).to(device=device, dtype=dtype)
                    b = torch.randn(shape[-1], generator=gen).to(device=device, dtype=dtype)
                    return x, w, b, mask, SparseStage.from_mask(mask)

                def block_inputs(shape=shape, dtype=dtype, mask=mask):
                    gen = torch.Generator().manual_seed(0)
                    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                    return (x, mask, SparseStage.from_mask(mask), *_block_params(shape[-1], dtype, device, gen))

                conv_flops = 2 * 49 * C * V
                out.append(Case(
                    "sparse_dwconv2d", name, dtype, device, conv_inputs,
                    {"reference": lambda x, w, b, m, s: reference.sparse_dwconv2d(x, w, b, m),
                     "compiled-reference": lambda x, w, b, m, s, sh=shape: _compiled(
                         reference.sparse_dwconv2d, sh)(x, w, b, m),
                     "kfe": lambda x, w, b, m, s: sparse_dwconv2d(x, w, b, m),
                     "kfe-rows": _rows},
                    bytes={"fwd": 2 * V * C * es, "bwd": 3 * V * C * es, "fwd+bwd": 5 * V * C * es},
                    flops={"fwd": conv_flops, "bwd": 2 * conv_flops, "fwd+bwd": 3 * conv_flops},
                    grad_inputs=(0, 1, 2)))
                block_flops = V * (2 * 49 * C + 16 * C * C)
                out.append(Case(
                    "sparse_block", name, dtype, device, block_inputs,
                    {"reference": lambda x, m, s, *p: reference.masked_block(x, m, *p),
                     "compiled-reference": lambda x, m, s, *p, sh=shape: _compiled(
                         reference.masked_block, sh)(x, m, *p),
                     "kfe-dense": _kfe_dense_block,
                     "kfe-sparse": _sparse_block(C, device)},
                    bytes={}, flops={"fwd": block_flops, "bwd": 2 * block_flops, "fwd+bwd": 3 * block_flops},
                    grad_inputs=(0, *range(3, 13))))
    return out

