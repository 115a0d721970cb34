"""Sparse conv v2 and GRN on rows (issue 16): launches and bytes counted under the Triton interpreter
(tests/counting.py), the stage built without host syncs, kfe::grn_rows against the masked GRN spec.

Budgets (engine/ops/sparse_conv/triton.py, engine/ops/grn_rows/triton.py), bytes over unmasked lanes:
  sparse conv  1 launch forward, 1 backward. Ideal: forward reads x and writes y, backward reads dy
               and x and writes dx, each once (s*C bytes a row; the dense layout reads visible rows
               and writes every row), plus the table (4*k*k bytes a row, rows layout) or the mask
               (1 byte a row, dense). Asserted <= 1.25x.
  grn_rows     2 launches each way; forward reads x twice and writes y, backward reads x and dy twice
               and writes dx. Asserted <= 1.25x.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import engine
from engine import _ext
from engine.backend import triton_interpreting
from engine.ops import grn_rows
from engine.ops.grn import reference as grn_reference
from engine.ops.sparse_conv import op as sparse_op
from engine.ops.sparse_conv import reference
from engine.sparse import SparseStage, build_stages
from tests.counting import count_triton
from tests.engine.ops.test_sparse_conv import block_mask, pixel_mask
from tests.engine.test_host_sync import HostSync, no_host_sync

interpreted = pytest.mark.skipif(not triton_interpreting(), reason="counts the Triton interpreter")


def _moved(c):
    return c.load_bytes - c.load_masked_bytes + c.store_bytes - c.store_masked_bytes


def _err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


CONV_CASES = [  # (N, H, W, C, k, dtype, mask kind, layout): each has >= 2 row blocks, so windows overlap
    (2, 24, 24, 16, 7, torch.float32, "block", "dense"),
    (2, 40, 40, 32, 7, torch.bfloat16, "block", "rows-tap-major"),
    (3, 30, 20, 24, 3, torch.float32, "pixel", "rows-row-major"),
]


@interpreted
@pytest.mark.parametrize("N, H, W, C, k, dtype, kind, layout", CONV_CASES, ids=str)
def test_sparse_conv_launches_and_bytes_within_budget(N, H, W, C, k, dtype, kind, layout):
    gen = torch.Generator().manual_seed(0)
    mask = block_mask(N, H, W, 4, 0.6) if kind == "block" else pixel_mask(N, H, W, 0.5)
    x = torch.randn(N, H, W, C, generator=gen)
    w, b = torch.randn(C, 1, k, k, generator=gen), torch.randn(C, generator=gen)
    s, K, seen = torch.empty((), dtype=dtype).element_size(), k * k, int(mask.sum())
    if layout == "dense":
        args, rows = (x.to(dtype), w, b, mask), N * H * W
        fn, ref_fwd, ref_bwd = engine.ops.sparse_dwconv2d, reference.forward, reference.backward
        fwd_ideal, bwd_ideal = s * C * (seen + rows) + rows, s * C * (2 * seen + rows) + rows
    else:
        stage = SparseStage.from_mask(mask, k, tap_major=layout == "rows-tap-major")
        assert (stage.neighbours.stride(0) == 1) == (layout == "rows-tap-major")
        feats = stage.gather(x).feats
        args, rows = (feats.to(dtype), stage.neighbours, w, b), seen
        fn, ref_fwd, ref_bwd = engine.ops.sparse_dwconv2d_rows, reference.rows_forward, reference.rows_backward
        fwd_ideal, bwd_ideal = 2 * s * C * seen + 4 * K * seen, 3 * s * C * seen + 4 * K * seen
    leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    dy = torch.randn((*args[0].shape[:-1], C), generator=gen).to(dtype)
    with engine.use_backend("triton"):
        with count_triton() as fwd:
            y = fn(*leaves)
        with count_triton() as bwd:
            y.backward(dy)
    assert fwd.launches == 1 and bwd.launches == 1, (fwd.launches, bwd.launches)
    assert _moved(fwd) <= 1.25 * fwd_ideal, _moved(fwd) / fwd_ideal
    assert _moved(bwd) <= 1.25 * bwd_ideal, _moved(bwd) / bwd_ideal
    # still the function (float64 reference on the same rounded inputs)
    d = [a.detach().double() if a.is_floating_point() else a for a in args]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _err(y, ref_fwd(*d)) <= tol
    want = ref_bwd(dy.double(), d[0], d[1], mask) if layout == "dense" else ref_bwd(dy.double(), d[0], d[1], d[2])
    iw = 1 if layout == "dense" else 2  # where the weight sits in the op's arguments; the bias follows
    for got, ref in zip((leaves[0].grad, leaves[iw].grad, leaves[iw + 1].grad), want):
        assert _err(got, ref) <= tol


def test_stages_build_without_host_sync_when_rows_per_sample_known():
    mask = block_mask(3, 32, 32, 8, 0.6)                       # FCMAE-like: 6 of 16 patches kept per sample
    per = [6 * 64, 6 * 16, 6 * 4, 6]
    with no_host_sync():                                        # no Python-level read of a tensor ...
        stages = build_stages(mask, 4, 7, rows_per_sample=per)
    with FakeTensorMode() as fake:                              # ... and no data-dependent size either
        # (nonzero, boolean indexing: C++ syncs that no_host_sync cannot see fail on fake tensors)
        shapes = [st.neighbours.shape for st in build_stages(fake.from_tensor(mask), 4, 7, rows_per_sample=per)]
        with pytest.raises(DataDependentOutputException):
            build_stages(fake.from_tensor(mask), 4, 7)
    assert shapes == [(p, 49) for p in (3 * q for q in per)]
    plain = build_stages(mask, 4, 7)                            # reads the counts: one sync per stage
    for fast, slow, p in zip(stages, plain, per):
        assert fast.rows_per_sample == slow.rows_per_sample == p
        assert torch.equal(fast.index, slow.index) and torch.equal(fast.offsets, slow.offsets)
        assert torch.equal(fast.neighbours, slow.neighbours) and torch.equal(fast.pool, slow.pool) \
            if fast.pool is not None else torch.equal(fast.neighbours, slow.neighbours)
    with no_host_sync(), pytest.raises(HostSync):               # the check sees the sync that remains
        build_stages(mask, 4, 7)
    with pytest.raises(RuntimeError, match="rows_per_sample"):  # a wrong count is caught (on the device)
        SparseStage.from_mask(mask, 7, rows_per_sample=per[0] + 1)
    with pytest.raises(ValueError, match="rows_per_sample"):
        build_stages(mask, 4, 7, rows_per_sample=per[:3])


def test_table_layouts_and_halo():
    mask = pixel_mask(2, 9, 11, 0.6)
    rows = SparseStage.from_mask(mask, 5, tap_major=False)
    taps = SparseStage.from_mask(mask, 5, tap_major=True)
    assert rows.neighbours.is_contiguous() and taps.neighbours.t().is_contiguous()
    assert torch.equal(rows.neighbours, taps.neighbours)
    # the recorded halo bounds the table, and a table of unknown origin gets its exact halo
    V = rows.num_rows
    dist = torch.where(rows.neighbours >= 0, (rows.neighbours.long() - torch.arange(V)[:, None]).abs(), 0)
    assert int(dist.max()) <= sparse_op.table_halo(rows.neighbours) == 2 * 11 + 2
    assert sparse_op.table_halo(rows.neighbours.clone()) == int(dist.max())


# ---- GRN on rows: per-sample statistics for any row counts ----

def _grn_case(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N, H, W, C = 4, 6, 7, 40
    density = torch.tensor([0.2, 0.5, 0.9, 0.0])[:, None, None]     # uneven counts; sample 3 has no rows
    mask = torch.rand(N, H, W, generator=gen) < density
    x = torch.randn(N, H, W, C, generator=gen, dtype=torch.float64)
    x[~mask] = float("nan")                                     # masked sites must not reach the rows
    gamma, beta = torch.randn(C, generator=gen, dtype=torch.float64), torch.randn(C, generator=gen, dtype=torch.float64)
    stage = SparseStage.from_mask(mask, 3)
    assert stage.rows_per_sample is None
    return x, mask, gamma, beta, stage


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("cpp", torch.float64),
                                            ("cpp", torch.bfloat16), ("triton", torch.float32),
                                            ("triton", torch.bfloat16)], ids=str)
def test_grn_rows_matches_masked_grn_spec(backend, dtype):
    if backend == "triton" and not triton_interpreting():
        pytest.skip("triton on CPU tensors needs the interpreter")
    if backend == "cpp" and not _ext.has_op("_grn_rows_fwd_cpp"):
        pytest.fail("engine._C has no grn_rows kernel: rebuild it (setup.py build_ext --inplace)")
    x, mask, gamma, beta, stage = _grn_case(dtype)
    feats = stage.gather(x).feats
    xs = feats.to(dtype).detach().requires_grad_()
    gs, bs = gamma.detach().clone().requires_grad_(), beta.detach().clone().requires_grad_()
    with engine.use_backend(backend):
        y = grn_rows(xs, stage.offsets, gs, bs)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        y.backward(dy)
    # the spec: kfe::grn's reference with the mask, read at the visible sites, on the same rounded input
    xd = torch.where(mask[..., None], x, 0).reshape(-1, x.shape[-1])
    xd[stage.index] = xs.detach().double()
    xd = xd.view(x.shape).requires_grad_()
    gd, bd = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    want = grn_reference.grn(xd, gd, bd, mask).reshape(-1, x.shape[-1])[stage.index]
    want.backward(dy.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert _err(y, want.detach()) <= tol
    assert _err(xs.grad, xd.grad.reshape(-1, x.shape[-1])[stage.index]) <= tol
    assert _err(gs.grad, gd.grad) <= tol and _err(bs.grad, bd.grad) <= tol


def test_sparse_block_uses_grn_rows_for_uneven_masks(monkeypatch):
    from engine.nn import sparse_convnextv2 as scnn
    from engine.nn.grn import GRN

    x, mask, gamma, beta, stage = _grn_case(torch.float64)
    calls = []
    monkeypatch.setattr(scnn, "grn_rows_op", lambda *a: calls.append(a) or grn_rows(*a))
    grn = GRN(x.shape[-1]).double()
    scnn.grn_rows(stage.gather(x).feats, stage, grn)
    assert len(calls) == 1 and calls[0][1] is stage.offsets


@interpreted
def test_grn_rows_launches_and_bytes_within_budget():
    x, mask, gamma, beta, stage = _grn_case(torch.float32)
    xs = stage.gather(x).feats.float().detach().requires_grad_()
    g, b = gamma.float().requires_grad_(), beta.float().requires_grad_()
    with engine.use_backend("triton"):
        with count_triton() as fwd:
            y = grn_rows(xs, stage.offsets, g, b)
        with count_triton() as bwd:
            y.backward(torch.ones_like(y))
    assert fwd.launches == 2 and bwd.launches == 2, (fwd.launches, bwd.launches)
    row = 4 * xs.shape[1]
    V = xs.shape[0]
    assert _moved(fwd) <= 1.25 * 3 * V * row, _moved(fwd) / (3 * V * row)
    assert _moved(bwd) <= 1.25 * 5 * V * row, _moved(bwd) / (5 * V * row)


def test_grn_rows_bad_inputs_name_the_argument():
    x = torch.randn(10, 8)
    off = torch.tensor([0, 4, 10])
    p = torch.zeros(8)
    with pytest.raises(TypeError, match="offsets"):
        grn_rows(x, off.int(), p, p)
    with pytest.raises(ValueError, match="offsets"):
        grn_rows(x, off[:1], p, p)
    with pytest.raises(ValueError, match="gamma"):
        grn_rows(x, off, torch.zeros(7), p)
    with pytest.raises(ValueError, match="x"):
        grn_rows(x[None], off, p, p)


def test_fcmae_stage_rows_known_from_the_patch_mask():
    from models.fcmae import stage_rows

    assert stage_rows([6, 6, 6], 8, 4) == [6 * 64, 6 * 16, 6 * 4, 6]      # 32 px patches: 8x8 sites at stage 1
    assert stage_rows([6, 6], 2, 4) == [24, 6, None, None]                 # past one site per patch: unknown
    assert stage_rows([5, 6], 8, 4) == [None] * 4                          # uneven samples: the stage reads them
    assert stage_rows([0, 0], 8, 2) == [None, None]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_grn_rows_opcheck_and_compile(backend):
    x, mask, gamma, beta, stage = _grn_case(torch.float64)
    feats = stage.gather(x).feats.detach()
    with engine.use_backend(backend):
        torch.library.opcheck(torch.ops.kfe.grn_rows.default,
                              (feats.clone().requires_grad_(), stage.offsets, gamma.clone().requires_grad_(),
                               beta.clone().requires_grad_(), 1e-6))
        torch.library.opcheck(torch.ops.kfe.grn_rows_backward.default,
                              (torch.randn_like(feats), feats, stage.offsets, gamma, 1e-6))
        compiled = torch.compile(grn_rows, fullgraph=True, backend="eager")
        args = (feats, stage.offsets, gamma, beta)
        torch.testing.assert_close(compiled(*args), grn_rows(*args))
