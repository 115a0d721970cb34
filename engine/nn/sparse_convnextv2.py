"""Sparse ConvNeXt V2 layers for FCMAE pre-training (arXiv 2301.00808, Sec. 3.1 and Fig. 5).

The official sparse encoder runs the ConvNeXt V2 block on MinkowskiEngine; these layers run it on
the gathered visible rows of engine.sparse instead. Parameter names match the official dense Block
(dwconv, norm, pwconv1, act, grn, pwconv2, drop_path) and downsample layers (0 = LayerNorm,
1 = Conv2d(k=2, s=2)), so one state dict serves the dense and the sparse model.

Block on a stage's rows, equal at visible sites to engine.ops.sparse_conv.reference.masked_block:

    h = sparse_dwconv2d_rows(x)                   submanifold 7x7 depthwise conv
    h = GRN(GELU(Linear_4x(LayerNorm(h))))        GRN statistics over each sample's visible rows
    y = x + drop_path(Linear(h))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.nn.grn import GRN
from engine.ops.grn_rows import grn_rows as grn_rows_op
from engine.ops.sparse_conv import op as sparse_op
from engine.sparse import SparseStage, SparseTensor


def grn_rows(h: torch.Tensor, stage: SparseStage, grn: GRN) -> torch.Tensor:
    """GRN of rows h (V, C) with statistics over each sample's rows (kfe::grn at visible sites).

    FCMAE keeps the same number of patches in every sample, so the rows are an (N, V/N) grid and
    kfe::grn's kernels run on them as they are. Otherwise (arbitrary masks) kfe::grn_rows walks each
    sample's rows by the stage's offsets.
    """
    N = stage.shape[0]
    V, C = h.shape
    P = stage.rows_per_sample
    if P is not None:
        return grn(h.view(N, P, 1, C)).view(V, C)
    return grn_rows_op(h, stage.offsets, grn.gamma, grn.beta, grn.eps)


def check_feats_dtype(x: SparseTensor, param: torch.Tensor, layer: str) -> None:
    """Outside autocast, feats must have the layer's parameter dtype: the dense layers would stop at
    the first LayerNorm / Linear with torch's "mixed dtype" or "same dtype" errors. Under autocast any
    float dtype goes (bf16 rows from a downsample meet fp32 parameters there; the linears cast)."""
    if x.feats.dtype != param.dtype and not torch.is_autocast_enabled(x.feats.device.type):
        raise TypeError(f"feats has dtype {x.feats.dtype} but the {layer}'s parameters are {param.dtype}: cast "
                        f"the module or the features to one dtype, or run under torch.autocast")


class SparseDropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath, scaled by 1/keep) on a stage's rows."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, h: torch.Tensor, stage: SparseStage) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return h
        keep = 1.0 - self.p
        alive = h.new_empty(stage.shape[0]).bernoulli_(keep) / keep   # (N,)
        return h * alive[stage.sample][:, None]

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SparseConvNeXtV2Block(nn.Module):
    """ConvNeXt V2 block on the visible rows of a stage: SparseTensor (V, dim) -> SparseTensor."""

    def __init__(self, dim: int, drop_path: float = 0.0, grn: bool = True):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)  # weight (dim, 1, 7, 7)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim) if grn else None  # None: the ConvNeXt V2 paper's no-GRN ablation
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = SparseDropPath(drop_path)

    def forward(self, x: SparseTensor) -> SparseTensor:
        stage = x.stage
        check_feats_dtype(x, self.norm.weight, "block")
        k = self.dwconv.kernel_size[0]
        if stage.kernel_size != k:
            raise ValueError(f"the stage's neighbour table is {stage.kernel_size}x{stage.kernel_size}, the block's "
                             f"dwconv is {k}x{k}; build the stage with kernel_size={k}")
        # The stage built the table, so only shapes are checked (no pass over its values).
        sparse_op.check_rows(x.feats, stage.neighbours, self.dwconv.weight, self.dwconv.bias, values=False)
        h = sparse_op._rows(x.feats, stage.neighbours, self.dwconv.weight, self.dwconv.bias)  # (V, dim)
        h = self.act(self.pwconv1(self.norm(h)))                                              # (V, 4 dim)
        h = self.pwconv2(h if self.grn is None else grn_rows(h, stage, self.grn))             # (V, dim)
        return x.replace(x.feats + self.drop_path(h, stage))


class SparseDownsample(nn.Sequential):
    """ConvNeXt's downsample layer on rows: LayerNorm(in_dim) then Conv2d(in_dim, out_dim, 2, stride 2).

    An output site is visible when any of its 4 inputs is; masked inputs count as zero (after the
    norm). Keys 0.weight, 0.bias, 1.weight, 1.bias as the official `downsample_layers[i]`.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.LayerNorm(in_dim, eps=1e-6), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2))

    def forward(self, x: SparseTensor, coarse: SparseStage | None = None) -> SparseTensor:
        """x on a stage -> the next stage (x.stage.downsample(), built eagerly when not given)."""
        coarse = x.stage.downsample() if coarse is None else coarse
        # coarse.pool indexes x.stage's rows: the coarse stage of another mask would gather the wrong
        # rows (or out of range), silently. Provenance is recorded by downsample() and checked by identity.
        if not isinstance(coarse, SparseStage) or not coarse.is_downsample_of(x.stage):
            raise ValueError("coarse must be the stage that x.stage.downsample() returns (build_stages gives them "
                             "in order), not a stage of another mask or resolution")
        check_feats_dtype(x, self[0].weight, "downsample layer")
        norm, conv = self[0], self[1]
        C = x.feats.shape[1]
        h = norm(x.feats)                                                    # (V, C)
        h = torch.cat([h, h.new_zeros(1, C)])                                # row V: masked inputs are 0
        taps = h[coarse.pool].reshape(-1, 4 * C)                             # (V', 4 C), taps (a, b) row-major
        w = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * C)  # (C', C, 2, 2) -> (C', 2, 2, C)
        return SparseTensor(F.linear(taps, w, conv.bias), coarse)
