"""kfe::sparse_dwconv2d (dense layout) and kfe::sparse_dwconv2d_rows (gathered rows): entry points,
input checks, custom-op registration (fake + autograd) and dispatch. Both ops share one backend table:
each backend module has forward/backward (dense) and rows_forward/rows_backward (rows)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from engine import _ext
from engine.backend import FLOAT_DTYPES, Impl, OpBackends, register
from engine.ops import _checks

LOWP = (torch.float32, torch.float16, torch.bfloat16)


def _example(device: torch.device) -> tuple:
    x = torch.randn(2, 8, 8, 24, device=device)
    return x, torch.randn(24, 1, 7, 7, device=device), torch.zeros(24, device=device), \
        torch.ones(2, 8, 8, dtype=torch.bool, device=device)


BACKENDS = register(OpBackends("sparse_dwconv2d", example=_example))
BACKENDS.add(Impl("triton", "engine.ops.sparse_conv.triton", dtypes=LOWP))
BACKENDS.add(Impl("cpp", "engine.ops.sparse_conv.cpp", dtypes=FLOAT_DTYPES,
                  available=lambda: [] if _ext.has_op("_sparse_dwconv_fwd_cpp")
                  else ["engine._C has no sparse_dwconv kernel"]))
BACKENDS.add(Impl("reference", "engine.ops.sparse_conv.reference"))


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grad_fakes(x, weight):
    C = weight.shape[0]
    return x.new_empty(weight.shape, dtype=_acc(x)), x.new_empty(C, dtype=_acc(x))


# ---- dense layout: x (N, H, W, C) in, y (N, H, W, C) out ----

@torch.library.custom_op("kfe::sparse_dwconv2d", mutates_args=())
def _dense(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    return BACKENDS.select(x).forward(x, weight, bias, mask)


@_dense.register_fake
def _dense_fake(x, weight, bias, mask):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kfe::sparse_dwconv2d_backward", mutates_args=())
def _dense_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = BACKENDS.select(x).backward(dy, x, weight, mask)
    return dx, dw, db


@_dense_backward.register_fake
def _dense_backward_fake(dy, x, weight, mask):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *_grad_fakes(x, weight))


def _dense_setup(ctx, inputs, output):
    x, weight, bias, mask = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dense_grad(ctx, dy):
    x, weight, mask = ctx.saved_tensors
    dx, dw, db = _dense_backward(dy, x, weight, mask)
    db = None if ctx.bias_dtype is None else db.to(ctx.bias_dtype)
    return dx, dw.to(weight.dtype), db, None


_dense.register_autograd(_dense_grad, setup_context=_dense_setup)


# ---- rows layout: feats (V, C) and a neighbour table (V, k*k) in, (V, C) out ----

@torch.library.custom_op("kfe::sparse_dwconv2d_rows", mutates_args=())
def _rows(feats: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor,
          bias: Optional[torch.Tensor]) -> torch.Tensor:
    return BACKENDS.select(feats).rows_forward(feats, neighbours, weight, bias)


@_rows.register_fake
def _rows_fake(feats, neighbours, weight, bias):
    return torch.empty_like(feats, memory_format=torch.contiguous_format)


@torch.library.custom_op("kfe::sparse_dwconv2d_rows_backward", mutates_args=())
def _rows_backward(dy: torch.Tensor, feats: torch.Tensor, neighbours: torch.Tensor,
                   weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = BACKENDS.select(feats).rows_backward(dy, feats, neighbours, weight)
    return dx, dw, db


@_rows_backward.register_fake
def _rows_backward_fake(dy, feats, neighbours, weight):
    return (torch.empty_like(feats, memory_format=torch.contiguous_format), *_grad_fakes(feats, weight))


def _rows_setup(ctx, inputs, output):
    feats, neighbours, weight, bias = inputs
    ctx.save_for_backward(feats, neighbours, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _rows_grad(ctx, dy):
    feats, neighbours, weight = ctx.saved_tensors
    dx, dw, db = _rows_backward(dy, feats, neighbours, weight)
    db = None if ctx.bias_dtype is None else db.to(ctx.bias_dtype)
    return dx, None, dw.to(weight.dtype), db


_rows.register_autograd(_rows_grad, setup_context=_rows_setup)


# ---- FLOP formulas (torch.utils.flop_counter: models.count_flops, the benchmarks' TFLOP/s) ----

def flop_count(sites: int, channels: int, k: int, backward: bool = False) -> int:
    """Useful FLOPs: 2*k*k*C per visible output site forward (a multiply-add per tap and channel, the
    convention FlopCounterMode uses for convolutions), twice that backward (input and weight grads)."""
    fwd = 2 * sites * channels * k * k
    return 2 * fwd if backward else fwd


def _visible_sites(mask: torch.Tensor) -> int:
    # The dense layout's useful sites are the True ones. Meta and fake tensors have no values, so
    # there every site counts (an upper bound; the rows op, which the FCMAE encoder runs, is exact).
    from torch._subclasses.fake_tensor import FakeTensor

    if mask.device.type == "meta" or isinstance(mask, FakeTensor):
        return mask.numel()
    return int(mask.sum())


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.kfe.sparse_dwconv2d, get_raw=True)
    def _dense_flops(x, weight, bias, mask, *args, **kwargs) -> int:
        return flop_count(_visible_sites(mask), weight.shape[0], weight.shape[-1])

    @register_flop_formula(torch.ops.kfe.sparse_dwconv2d_backward, get_raw=True)
    def _dense_bwd_flops(dy, x, weight, mask, *args, **kwargs) -> int:
        return flop_count(_visible_sites(mask), weight.shape[0], weight.shape[-1], backward=True)

    @register_flop_formula(torch.ops.kfe.sparse_dwconv2d_rows)
    def _rows_flops(feats, neighbours, weight, bias, *args, out_shape=None, **kwargs) -> int:
        return flop_count(feats[0], weight[0], weight[-1])  # one row per visible site

    @register_flop_formula(torch.ops.kfe.sparse_dwconv2d_rows_backward)
    def _rows_bwd_flops(dy, feats, neighbours, weight, *args, out_shape=None, **kwargs) -> int:
        return flop_count(feats[0], weight[0], weight[-1], backward=True)


_register_flop_formulas()


# ---- input checks and the public functions ----

def _check_params(weight, bias, C: int, ref_name: str, ref: torch.Tensor) -> int:
    """Validates the depthwise weight (C, 1, k, k), odd k, and bias (C,); returns k."""
    _checks.tensor("weight", weight, dtypes=FLOAT_DTYPES)
    shape = tuple(weight.shape)
    if weight.dim() != 4 or shape[0] != C or shape[1] != 1 or shape[2] != shape[3]:
        raise ValueError(f"weight must be the depthwise layout (C, 1, k, k) = ({C}, 1, k, k) for {ref_name} with "
                         f"C = {C} channels, got {shape}")
    k = shape[-1]
    if k % 2 == 0:
        raise ValueError(f"weight kernel size k must be odd (a centred window, padding k // 2), got k = {k}")
    _checks.same_device("weight", weight, ref_name, ref)
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=FLOAT_DTYPES)
        if tuple(bias.shape) != (C,):
            raise ValueError(f"bias must be None or ({C},) for {ref_name} with C = {C}, got {tuple(bias.shape)}")
        _checks.same_device("bias", bias, ref_name, ref)
    return k


def _check_dense(x, weight, bias, mask) -> None:
    _checks.tensor("x", x, ndim=4, layout="channels-last (N, H, W, C)")
    _check_params(weight, bias, x.shape[-1], "x", x)
    _checks.tensor("mask", mask, dtypes=(torch.bool,))
    if mask.shape != x.shape[:3]:
        raise ValueError(f"mask must be (N, H, W) = {tuple(x.shape[:3])} (True = visible), got {tuple(mask.shape)}")
    _checks.same_device("mask", mask, "x", x)


def sparse_dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    mask: torch.Tensor) -> torch.Tensor:
    """Submanifold depthwise convolution: y = dwconv2d(x * m, weight, bias, padding=k // 2) * m.

    Args:
        x: (N, H, W, C) channels-last; float32 / float16 / bfloat16 (float64 on cpp and reference).
        weight: (C, 1, k, k), PyTorch's depthwise layout, k odd (7 in ConvNeXt); any float dtype.
        bias: (C,) or None.
        mask: bool (N, H, W), True = visible.

    Outputs exist only at visible sites (exactly 0 at masked ones) and masked inputs count as zero,
    whatever they hold (NaN included). The fast paths compute only visible sites. Sums run in float32
    (float64 for float64). Differentiable in x, weight and bias.
    """
    _check_dense(x, weight, bias, mask)
    return _dense(x, weight, bias, mask)


def check_rows(feats, neighbours, weight, bias, *, values: bool = True) -> None:
    """Checks the rows-layout arguments; with values=True also that the table is a submanifold table."""
    _checks.tensor("feats", feats, ndim=2, layout="gathered rows (V, C)")
    k = _check_params(weight, bias, feats.shape[1], "feats", feats)
    _checks.tensor("neighbours", neighbours, dtypes=(torch.int32,))
    V = feats.shape[0]
    if tuple(neighbours.shape) != (V, k * k):
        raise ValueError(f"neighbours must be (V, k*k) = ({V}, {k * k}) for feats {tuple(feats.shape)} and a "
                         f"{k}x{k} weight, got {tuple(neighbours.shape)}")
    _checks.same_device("neighbours", neighbours, "feats", feats)
    if values and V and not torch.compiler.is_compiling() and _VALID.get(neighbours) != neighbours._version:
        _check_table_values(neighbours)
        mark_valid(neighbours)


# Tables known to be valid, with the version counter they had then (an in-place edit invalidates).
_VALID = WeakIdKeyDictionary()
# Halo of a table (max |nbr[r, t] - r| over its entries, or a bound of it), with the version counter.
_HALO = WeakIdKeyDictionary()


def mark_valid(neighbours: torch.Tensor, halo: int | None = None) -> None:
    """Records that this neighbour table is a valid submanifold table (engine.sparse builds them) and,
    when given, a bound on how far its entries lie from their row (the stage knows it: p*W + p)."""
    _VALID[neighbours] = neighbours._version
    if halo is not None:
        _HALO[neighbours] = (neighbours._version, int(halo))


def table_halo(neighbours: torch.Tensor) -> int:
    """max |neighbours[r, t] - r| over the valid entries (or the bound its builder recorded): how many
    rows the fast paths' windows reach around a block. A table that engine.sparse did not build costs
    one pass and a host sync the first time it is seen (and after an in-place change)."""
    known = _HALO.get(neighbours)
    if known is not None and known[0] == neighbours._version:
        return known[1]
    V = neighbours.shape[0]
    if V == 0:
        return 0
    rows = torch.arange(V, device=neighbours.device)[:, None]
    dist = torch.where(neighbours >= 0, (neighbours.long() - rows).abs(), 0)
    halo = int(dist.max())
    _HALO[neighbours] = (neighbours._version, halo)
    return halo


def _check_table_values(nbr: torch.Tensor) -> None:
    V, K = nbr.shape
    lo, hi = torch.aminmax(nbr)
    if lo.item() < -1 or hi.item() >= V:
        raise ValueError(f"neighbours must hold row indices in [0, {V}) or -1, got values in [{lo.item()}, {hi.item()}]")
    # Submanifold symmetry (what the backward relies on): u = nbr[v, t] implies nbr[u, K-1-t] = v.
    taps = torch.arange(K - 1, -1, -1, device=nbr.device)                              # (K,) K-1-t
    mirror = nbr.reshape(-1).take(nbr.long().clamp(min=0) * K + taps)                   # (V, K)
    rows = torch.arange(V, device=nbr.device, dtype=nbr.dtype)[:, None]
    ok = nbr >= 0
    if not bool(torch.where(ok, mirror == rows, True).all()):
        raise ValueError("neighbours is not a submanifold neighbour table (u = nbr[v, t] must imply "
                         "nbr[u, k*k-1-t] = v); build it with engine.sparse.SparseStage")


def sparse_dwconv2d_rows(feats: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Submanifold depthwise convolution on gathered visible rows (the sparse-stage layout).

    Args:
        feats: (V, C) features of the visible sites (engine.sparse.SparseTensor.feats).
        neighbours: (V, k*k) int32, row r's k x k window as row indices into feats (-1 = masked or
            outside the image), taps row-major as weight flattens: SparseStage.neighbours.
        weight: (C, 1, k, k), k odd; bias: (C,) or None.

    y[v] = bias + sum_t weight[:, 0].flatten(1)[:, t] * feats[neighbours[v, t]]. Outside torch.compile
    a table's values are validated the first time it is seen (a few passes over it; again after an
    in-place change); the tables engine.sparse builds are valid by construction.
    """
    check_rows(feats, neighbours, weight, bias)
    return _rows(feats, neighbours, weight, bias)
