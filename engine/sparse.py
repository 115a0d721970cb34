"""Sparse stages for FCMAE's encoder (ConvNeXt V2, arXiv 2301.00808, Sec. 3.1): visible sites only.

A masked image is, per sample, a set of visible sites. A *stage* (one resolution of the encoder)
fixes that set once; every block of the stage then works on the gathered rows, never re-densifying:

    feats       (V, C)      features of the V visible sites, ordered by (n, h, w)      SparseTensor
    index       (V,)        their flat positions in the (N, H, W) grid                  SparseStage
    sample      (V,)        sample id of each row; one sample's rows are contiguous,
    offsets     (N + 1,)    rows offsets[n]:offsets[n + 1]
    neighbours  (V, k*k)    int32 rows of each row's k x k window (taps row-major, as the depthwise
                            weight (C, 1, k, k) flattens), -1 where masked or outside the image

Pointwise layers (LayerNorm, Linear, GELU) act on feats directly; the depthwise conv gathers through
`neighbours` (kfe::sparse_dwconv2d_rows: outputs only at visible sites, masked inputs count as zero);
GRN reduces over each sample's rows. The table costs one gather over V*k*k and is shared by all blocks
of a stage, forward and backward.

Downsampling (ConvNeXt's LayerNorm + Conv2d(k=2, s=2)): an output site is visible when ANY of the 4
sites of its 2x2 window is visible (as MinkowskiEngine's stride-2 convolution creates outputs);
masked inputs count as zero. With FCMAE's patch-aligned masks (32 px patches: 8x8 blocks at stage 1
of a 224 px input) a window is all-visible or all-masked, so this is the mask at the coarser
resolution. Odd sizes drop the last row / column, as Conv2d(k=2, s=2) does.

Building a stage without host syncs: V (and so the tables' sizes) depends on the mask's values, so
`from_mask` reads the per-sample counts to the host once (one sync per stage) unless the caller
knows them: `rows_per_sample=P` (FCMAE keeps the same number of patches per sample, so every stage's
P is known on the host) sizes everything from P with no sync; the counts are checked by
torch._assert_async (a device-side assert on a GPU, a RuntimeError on the CPU). The table's memory
layout follows the device: tap-major on a GPU ((k*k, V) storage viewed as (V, k*k)), so a kernel
reading one tap for a block of rows reads contiguous indices; row-major on the CPU, as the C++
kernel walks a row's taps. Either way `neighbours[v, t]` is the same value.

torch.compile: building a stage (`SparseStage.from_mask`, `downsample`) has data-dependent shapes
(V = number of visible sites) and runs eagerly, outside the compiled region; build all stages up
front with `build_stages`. Everything that consumes a stage (gather, blocks, downsample layers,
to_dense) traces with fullgraph=True. A stage's Python fields (shape, kernel_size, rows_per_sample)
are guarded on; FCMAE keeps V and rows_per_sample fixed from step to step, so nothing recompiles.
Row indices are int32 in the table: V < 2**31.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.ops import _checks
from engine.ops.sparse_conv import op as sparse_op


@dataclass(frozen=True, eq=False)
class SparseStage:
    """The visible sites of one resolution and their neighbourhoods (see the module docstring)."""

    mask: torch.Tensor            # (N, H, W) bool, True = visible
    index: torch.Tensor           # (V,) int64 flat (n, h, w) position of each row
    sample: torch.Tensor          # (V,) int64 sample of each row
    offsets: torch.Tensor         # (N + 1,) int64 first row of each sample
    neighbours: torch.Tensor      # (V, k*k) int32 rows of each row's window, -1 = none
    kernel_size: int              # k of the neighbour table (7 in ConvNeXt)
    rows_per_sample: int | None   # every sample has this many rows (> 0), else None
    pool: torch.Tensor | None = None  # (V, 4) int64 rows of the finer stage in each 2x2 window
    #                                   (taps row-major; masked -> V_fine, a zero row), for downsampling
    fine_index: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    #     the finer stage's `index` tensor itself: `pool` is only meaningful for that stage's rows, so
    #     SparseDownsample checks the identity (no pass over values, nothing for torch.compile to sync)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)

    @property
    def num_rows(self) -> int:
        return self.index.shape[0]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, kernel_size: int = 7, rows_per_sample: int | None = None,
                  tap_major: bool | None = None) -> "SparseStage":
        """The stage of a bool (N, H, W) mask, with a kernel_size x kernel_size neighbour table.

        rows_per_sample: the number of visible sites of every sample, when known (no host sync);
        tap_major: the table's storage (default: tap-major on a GPU, row-major on the CPU)."""
        _checks.tensor("mask", mask, ndim=3, dtypes=(torch.bool,), layout="(N, H, W)")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        _check_rows_per_sample(rows_per_sample, mask)
        return _build(mask.contiguous(), kernel_size, rows_per_sample, tap_major)

    def gather(self, x: torch.Tensor) -> "SparseTensor":
        """Dense channels-last x (N, H, W, C) -> its visible rows (differentiable)."""
        _checks.tensor("x", x, ndim=4, layout="channels-last (N, H, W, C)")
        if tuple(x.shape[:3]) != self.shape:
            raise ValueError(f"x must be (N, H, W, C) with (N, H, W) = {self.shape} (the mask's), "
                             f"got {tuple(x.shape)}")
        return SparseTensor(x.reshape(-1, x.shape[-1]).index_select(0, self.index), self)

    def downsample(self, rows_per_sample: int | None = None) -> "SparseStage":
        """The stage at half resolution: visible where any site of the 2x2 window is visible.

        rows_per_sample: that stage's visible sites per sample, when known (no host sync)."""
        N, H, W = self.shape
        if H < 2 or W < 2:
            raise ValueError(f"cannot downsample a stage of size {H}x{W} with a 2x2 window")
        coarse = F.max_pool2d(self.mask[:, None].to(torch.uint8), 2)[:, 0].bool()  # (N, H/2, W/2)
        _check_rows_per_sample(rows_per_sample, coarse)
        stage = _build(coarse.contiguous(), self.kernel_size, rows_per_sample, _is_tap_major(self.neighbours))
        rank = _rank(self.mask, self.num_rows).long()                   # (N, H, W), masked -> V_fine
        n, i, j = _coords(stage.index, coarse.shape[1], coarse.shape[2])
        taps = [rank[n, 2 * i + a, 2 * j + b] for a in (0, 1) for b in (0, 1)]
        return dataclasses.replace(stage, pool=torch.stack(taps, dim=1), fine_index=self.index)  # (V_coarse, 4)

    def is_downsample_of(self, fine: "SparseStage") -> bool:
        """Whether this stage is `fine.downsample()` (by identity of fine's rows: cheap, no sync)."""
        return self.pool is not None and self.fine_index is fine.index


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """Features of a stage's visible rows: feats (V, C), and the stage they live on."""

    feats: torch.Tensor
    stage: SparseStage

    def __post_init__(self):
        if not isinstance(self.stage, SparseStage):
            raise TypeError(f"stage must be a SparseStage, got {type(self.stage).__name__}")
        _checks.tensor("feats", self.feats, ndim=2, layout="gathered rows (V, C)")
        V = self.stage.num_rows
        if self.feats.shape[0] != V:
            raise ValueError(f"feats must have one row per visible site of the stage, (V, C) with V = {V}, "
                             f"got {tuple(self.feats.shape)}")
        _checks.same_device("feats", self.feats, "the stage's index", self.stage.index)

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        return SparseTensor(feats, self.stage)

    def to_dense(self) -> torch.Tensor:
        """(N, H, W, C), 0 at masked sites (differentiable)."""
        N, H, W = self.stage.shape
        C = self.feats.shape[-1]
        out = self.feats.new_zeros(N * H * W, C).index_copy(0, self.stage.index, self.feats)
        return out.view(N, H, W, C)


def to_sparse(x: torch.Tensor, mask: torch.Tensor, kernel_size: int = 7) -> SparseTensor:
    """Dense channels-last x (N, H, W, C) and its bool mask (N, H, W) -> a SparseTensor."""
    return SparseStage.from_mask(mask, kernel_size).gather(x)


def to_dense(x: SparseTensor) -> torch.Tensor:
    return x.to_dense()


def build_stages(mask: torch.Tensor, num_stages: int = 4, kernel_size: int = 7,
                 rows_per_sample: list[int] | None = None) -> list[SparseStage]:
    """The stages of a ConvNeXt encoder from the stage-1 mask, each the downsampling of the previous.

    rows_per_sample: every stage's visible sites per sample (num_stages ints), when the caller knows
    them (FCMAE's patch masks: kept patches x sites per patch); then no stage syncs the host."""
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    per = [None] * num_stages if rows_per_sample is None else list(rows_per_sample)
    if len(per) != num_stages:
        raise ValueError(f"rows_per_sample must give one count per stage ({num_stages}), got {rows_per_sample!r}")
    stages = [SparseStage.from_mask(mask, kernel_size, per[0])]
    for p in per[1:]:
        stages.append(stages[-1].downsample(p))
    return stages


def _coords(index: torch.Tensor, H: int, W: int):
    return index // (H * W), (index // W) % H, index % W


def _rank(mask: torch.Tensor, fill: int) -> torch.Tensor:
    """(N, H, W) int32: the row of each visible site (rows ordered by (n, h, w)); masked sites hold fill."""
    flat = mask.reshape(-1)
    return torch.where(flat, flat.cumsum(0, dtype=torch.int32) - 1, fill).view(mask.shape)


def _check_rows_per_sample(rows_per_sample, mask: torch.Tensor) -> None:
    if rows_per_sample is None:
        return
    N, H, W = mask.shape
    if not isinstance(rows_per_sample, int) or isinstance(rows_per_sample, bool) or not 0 < rows_per_sample <= H * W:
        raise ValueError(f"rows_per_sample must be None or an int in [1, H*W = {H * W}], got {rows_per_sample!r}")


def _is_tap_major(table: torch.Tensor) -> bool:
    return table.dim() == 2 and table.shape[0] > 1 and table.stride(0) == 1


def _build(mask: torch.Tensor, k: int, rows_per_sample: int | None = None,
           tap_major: bool | None = None) -> SparseStage:
    N, H, W = mask.shape
    counts = mask.sum(dim=(1, 2))                                      # (N,)
    if rows_per_sample is None:
        per = counts.tolist()  # the one host sync: V sizes the index and the table
        V = sum(per)
        uniform = per[0] if per and per[0] > 0 and all(c == per[0] for c in per) else None
    else:
        V, uniform = N * rows_per_sample, rows_per_sample
        # Checked where the counts are, without reading them on the host (a device-side assert on a
        # GPU; on the CPU a RuntimeError right away).
        torch._assert_async((counts == rows_per_sample).all(),
                            f"rows_per_sample = {rows_per_sample} does not match the mask's visible sites per sample")
    index = mask.reshape(-1).nonzero_static(size=V).squeeze(1)         # (V,) sorted: rows ordered by (n, h, w)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    # Tap (i, j) of site (n, h, w) is rank[n, h + i, w + j] in the -1-padded rank map: one gather of
    # the window offsets around each visible site's top-left corner.
    p = k // 2
    Hp, Wp = H + 2 * p, W + 2 * p
    rank = F.pad(_rank(mask, -1), (p, p, p, p), value=-1).reshape(-1)  # (N * Hp * Wp,)
    n, h, w = _coords(index, H, W)
    corner = n * (Hp * Wp) + h * Wp + w                                  # (V,)
    taps = torch.arange(k, device=mask.device)
    window = (taps[:, None] * Wp + taps[None, :]).reshape(-1)           # (K,) row-major as the weight
    if tap_major is None:
        tap_major = mask.device.type != "cpu"
    if tap_major:
        neighbours = rank[window[:, None] + corner[None, :]].t()        # (K, V) storage, (V, K) view
    else:
        neighbours = rank[corner[:, None] + window[None, :]]            # (V, K)
    sparse_op.mark_valid(neighbours, halo=p * W + p)  # sources lie within p*W + p rows (sorted by (n, h, w))
    return SparseStage(mask, index, index // (H * W), offsets, neighbours, k, uniform)
