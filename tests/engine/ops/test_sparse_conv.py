"""kfe::sparse_dwconv2d{,_rows}: every backend against the float64 reference, gradients, poison,
block-aligned and pixel masks, bad inputs, opcheck, compile."""
import importlib
from contextlib import ExitStack
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, strategies as st

import engine
from engine import testing
from engine.backend import BackendUnavailable
from engine.ops import sparse_dwconv2d, sparse_dwconv2d_rows
from engine.ops.sparse_conv import op as sparse_op, reference
from engine.sparse import SparseStage
from tests.engine.ops import common

BACKENDS = testing.backends("sparse_dwconv2d")
FAST = testing.fast_backends("sparse_dwconv2d")  # compared with the reference (never with itself)
F64 = [b for b in BACKENDS if torch.float64 in testing.supported_dtypes("sparse_dwconv2d", b)]


def block_mask(N, H, W, block, ratio, seed=0):
    """FCMAE-style mask: a grid of block x block patches, int(L * (1 - ratio)) kept per sample."""
    gen = torch.Generator().manual_seed(seed)
    gh, gw = -(-H // block), -(-W // block)
    keep = int(gh * gw * (1 - ratio))
    order = torch.rand(N, gh * gw, generator=gen).argsort(dim=1)
    grid = torch.zeros(N, gh * gw, dtype=torch.bool).scatter_(1, order[:, :keep], True).view(N, gh, gw)
    return grid.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :H, :W].contiguous()


def pixel_mask(N, H, W, density=0.5, seed=0):
    return torch.rand(N, H, W, generator=torch.Generator().manual_seed(seed)) < density


def _inputs(shape, k, dtype=torch.float32, mask=None, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    N, H, W, C = shape
    x = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(C, 1, k, k, generator=gen).to(dtype)
    b = torch.randn(C, generator=gen).to(dtype) if bias else None
    return x, w, b, pixel_mask(N, H, W, seed=seed) if mask is None else mask


def _check(backend, x, w, b, m, dtype=None, expect=None):
    grad = (0, 1) if b is None else (0, 1, 2)
    testing.check_against_reference(sparse_dwconv2d, reference.sparse_dwconv2d, (x, w, b, m), grad=grad,
                                    backend=backend, dtype=dtype, expect=expect, allow_zero=not m.any())


def _rows_ref(feats, nbr, w, b):
    return reference.rows_forward(feats, nbr, w, b)


def _check_rows(backend, x, w, b, m, dtype=None, expect=None):
    stage = SparseStage.from_mask(m, w.shape[-1])
    feats = stage.gather(x).feats
    grad = (0, 2) if b is None else (0, 2, 3)
    testing.check_against_reference(sparse_dwconv2d_rows, _rows_ref, (feats, stage.neighbours, w, b), grad=grad,
                                    backend=backend, dtype=dtype, expect=expect, allow_zero=not m.any())


def _small_blocks(block_r, block_c, direct=False):
    """_blocks fixed to block_r rows and block_c channels, with the window around them (the
    interpreter's kernel) or, direct, with none (the GPU's: each tap's rows read directly)."""
    return lambda halo, C, device: (block_r, block_c, 0 if direct else 1 << (block_r + 2 * halo - 1).bit_length(), 4)


def _gpu_tiles(direct=True):
    """Small tiles under the interpreter: 32-row blocks of 8 channels, so neighbouring blocks read each
    other's rows and channel blocks are several (the interpreter otherwise takes all rows at once);
    direct reads as on a GPU, or the window kernel at small blocks."""
    from engine.ops.sparse_conv import triton as sc_triton

    stack = ExitStack()
    stack.enter_context(mock.patch.object(sc_triton, "_blocks", _small_blocks(32, 8, direct)))
    return stack


def test_backends_present():
    assert {"reference", "cpp", "triton"} <= set(BACKENDS), BACKENDS


# (shape, k, mask): FCMAE block masks at every ratio, pixel masks, k in {3, 7}, C not a power of two,
# non-square images, an image smaller than the window; ("pixel", density) or (ratio, block size).
CASES = [
    ((2, 12, 12, 20), 7, (0.0, 4)), ((2, 12, 12, 20), 7, (0.4, 4)), ((2, 12, 12, 20), 7, (0.6, 4)),
    ((2, 12, 12, 20), 7, (0.75, 4)), ((2, 12, 12, 20), 7, (1.0, 4)), ((2, 8, 12, 13), 3, (0.6, 2)),
    ((2, 8, 12, 13), 3, (0.4, 2)), ((2, 10, 9, 13), 7, ("pixel", 0.5)), ((1, 9, 7, 5), 3, ("pixel", 0.1)),
    ((2, 5, 4, 24), 7, ("pixel", 0.7)),
]


def _mask(kind, shape, seed=0):
    N, H, W, _ = shape
    ratio, block = kind
    return pixel_mask(N, H, W, block, seed) if ratio == "pixel" else block_mask(N, H, W, block, ratio, seed)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape, k, kind", CASES, ids=str)
def test_dense_layout_matches_reference(backend, shape, k, kind):
    dtype = torch.float64 if backend in F64 else torch.float32
    _check(backend, *_inputs(shape, k, dtype, _mask(kind, shape)))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape, k, kind", [CASES[i] for i in (0, 2, 4, 5, 7)], ids=str)
def test_rows_layout_matches_reference(backend, shape, k, kind):
    dtype = torch.float64 if backend in F64 else torch.float32
    _check_rows(backend, *_inputs(shape, k, dtype, _mask(kind, shape)))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype, bias", [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False)],
                         ids=str)
def test_low_precision_and_no_bias(backend, dtype, bias):
    if dtype not in testing.supported_dtypes("sparse_dwconv2d", backend):
        pytest.fail(f"{backend} must support {dtype}")
    x, w, b, m = _inputs((2, 8, 8, 12), 7, dtype, block_mask(2, 8, 8, 2, 0.6), bias=bias)
    _check(backend, x, w, b, m)
    _check_rows(backend, x, w, b, m)


# ConvNeXt's 7x7 first, then 3 and 5; visible densities of real masks (FCMAE keeps 0.4); maps from
# smaller than the window to several GPU tiles.
SHAPE = dict(N=st.integers(1, 2), H=st.integers(2, 14), W=st.integers(2, 14), C=st.integers(2, 24),
             k=st.sampled_from([7, 3, 5]), density=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))


def _hypothesis_case(backend, N, H, W, C, k, density, seed):
    x, w, b, _ = _inputs((N, H, W, C), k, seed=seed)
    m = pixel_mask(N, H, W, density, seed)
    assume(m.any())  # nothing visible: all zero, the degenerate case (tested on its own above)
    _check(backend, x, w, b, m)
    _check_rows(backend, x, w, b, m)


@common.cheap()
@given(**{**SHAPE, "C": st.integers(2, 80)})  # past the C++ kernels' 64-channel register blocks
def test_hypothesis_shapes_cpp(**case):
    _hypothesis_case("cpp", **case)


@common.interpreted(0.6)
@given(**{**SHAPE, "H": st.integers(2, 10), "W": st.integers(2, 10), "C": st.integers(2, 12)},  # interpreter time
       tiles=st.sampled_from(["interpreter", "window", "direct"]))
def test_hypothesis_shapes_triton(tiles, **case):
    with _gpu_tiles(tiles == "direct") if tiles != "interpreter" else ExitStack():
        _hypothesis_case("triton", **case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_inputs_ignored_and_fully_masked_sample_is_zero(backend):
    x, w, b, m = _inputs((3, 8, 8, 10), 7, mask=block_mask(3, 8, 8, 2, 0.6))
    m[1] = False  # a fully masked sample
    x[~m] = float("nan")
    x[0, 0, 0, 0], m[0, 0, 0] = float("inf"), False
    x.requires_grad_(True)
    with engine.use_backend(backend):
        y = sparse_dwconv2d(x, w, b, m)
        (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert (y[~m] == 0).all() and (dx[~m] == 0).all() and (y[1] == 0).all()
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    clean = torch.where(m[..., None], x.detach(), 0)
    testing.assert_close(y, reference.sparse_dwconv2d(clean.double(), w.double(), b.double(), m), torch.float32)


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_input_and_mixed_param_dtypes(backend):
    x = torch.randn(2, 11, 6, 6).permute(0, 2, 3, 1)  # NCHW storage viewed as NHWC
    assert not x.is_contiguous()
    w, b = torch.randn(11, 1, 3, 3, dtype=torch.bfloat16), torch.randn(11, dtype=torch.float64)
    _check(backend, x, w, b, pixel_mask(2, 6, 6), dtype=torch.float32)


@pytest.mark.parametrize("backend", F64)
@pytest.mark.parametrize("layout", ["dense", "rows"])
def test_gradcheck_float64(backend, layout):
    x, w, b, m = _inputs((2, 4, 5, 3), 3, torch.float64, pixel_mask(2, 4, 5, 0.6))
    args = tuple(t.requires_grad_(True) for t in (x, w, b))
    stage = SparseStage.from_mask(m, 3)
    with engine.use_backend(backend):
        if layout == "dense":
            assert torch.autograd.gradcheck(lambda a, c, d: sparse_dwconv2d(a, c, d, m), args, fast_mode=True)
        else:
            fn = lambda a, c, d: sparse_dwconv2d_rows(stage.gather(a).feats, stage.neighbours, c, d)  # noqa: E731
            assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_reference_is_submanifold_by_definition():
    # Written out independently: each visible output sums weight * input over its visible window.
    x, w, b, m = _inputs((1, 5, 6, 2), 3, torch.float64, pixel_mask(1, 5, 6, 0.6))
    y = reference.sparse_dwconv2d(x, w, b, m)
    expected = torch.zeros_like(x)
    for h in range(5):
        for v in range(6):
            if not m[0, h, v]:
                continue
            expected[0, h, v] = b
            for i in range(3):
                for j in range(3):
                    hh, vv = h + i - 1, v + j - 1
                    if 0 <= hh < 5 and 0 <= vv < 6 and m[0, hh, vv]:
                        expected[0, h, v] += w[:, 0, i, j] * x[0, hh, vv]
    testing.assert_close(y, expected, torch.float64)
    # The rows reference (and its scatter-add backward) is the same function on the gathered rows.
    stage = SparseStage.from_mask(m, 3)
    testing.check_against_reference(lambda a, c, d: reference.rows_forward(stage.gather(a).feats, stage.neighbours,
                                                                           c, d),
                                     lambda a, c, d: reference.sparse_dwconv2d(a, c, d, m)[m], (x, w, b),
                                     grad=(0, 1, 2), backend="reference")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fast_backward_matches_reference_backward(backend):
    # The fast paths' input gradient reverses the taps; the reference backward uses conv2d_input (dense)
    # and a scatter-add (rows): the two must agree on the same upstream gradient.
    x, w, _, m = _inputs((2, 16, 16, 9), 7, mask=block_mask(2, 16, 16, 4, 0.6))
    dy = torch.randn_like(x)
    stage = SparseStage.from_mask(m)
    feats, dfe = stage.gather(x).feats, stage.gather(dy).feats
    fast = importlib.import_module(f"engine.ops.sparse_conv.{backend}")
    for got, want in ((fast.backward(dy, x, w, m), reference.backward(dy.double(), x.double(), w.double(), m)),
                      (fast.rows_backward(dfe, feats, stage.neighbours, w),
                       reference.rows_backward(dfe.double(), feats.double(), stage.neighbours, w.double()))):
        for g, e, name in zip(got, want, ("dx", "dweight", "dbias")):
            testing.assert_close(g, e, torch.float32, name=f"{name} [{backend}]")


def test_cpp_weight_grad_row_groups():
    # More rows than one C++ row group (2048), channels across two 64-wide chunks plus a tail.
    if "cpp" not in BACKENDS:
        pytest.fail("cpp backend unavailable")
    x, w, b, m = _inputs((2, 40, 40, 70), 3, torch.float64, block_mask(2, 40, 40, 8, 0.2))
    assert m.sum() > 2048
    _check("cpp", x, w, b, m)


@pytest.mark.parametrize("backend", ["cpp", "triton", "triton-direct"])
def test_weight_grad_skips_fully_masked_row_blocks(backend, monkeypatch):
    # The dense layout's weight gradient skips blocks of rows with no visible site (C++: 32 rows;
    # Triton: BLOCK_R, forced to 32 here as on a GPU). Blocks masked only in part (just the last row
    # or just the first row visible) must still count, and a skipped block must contribute nothing.
    direct = backend == "triton-direct"
    backend = backend.removesuffix("-direct")
    if backend not in BACKENDS:
        pytest.fail(f"{backend} backend unavailable")
    if backend == "triton":
        from engine.ops.sparse_conv import triton as sc_triton
        monkeypatch.setattr(sc_triton, "_blocks", _small_blocks(32, 32, direct))
    m = torch.zeros(3, 16, 16, dtype=torch.bool)         # W = 16: a 32-row block is 2 image rows
    m[0] = block_mask(1, 16, 16, 4, 0.5)[0]              # patch-aligned
    m[0, 4:8] = False                                    # a row of masked patches: blocks 2, 3 all masked
    m[2, 1:8:2, 15] = True                               # blocks 16..19: only their last row visible
    m[2, 8:16:2, 0] = True                               # blocks 20..23: only their first row visible
    blocks = m.reshape(-1, 32)
    assert (~blocks.any(1)).sum() >= 10 and (blocks[:, -1] & ~blocks[:, :-1].any(1)).any()
    assert (blocks[:, 0] & ~blocks[:, 1:].any(1)).any()
    dtype = torch.float64 if backend in F64 else torch.float32
    x, w, b, _ = _inputs((3, 16, 16, 70), 3, dtype, m)
    _check(backend, x, w, b, m)


@pytest.mark.parametrize("dtype, C", [(torch.float32, 136), (torch.float64, 70), (torch.bfloat16, 72)], ids=str)
def test_cpp_register_blocks_and_channel_tails(dtype, C):
    # float / double run register blocks of 64 / 32 channels, then scalar tails; bfloat16 is scalar.
    if "cpp" not in BACKENDS:
        pytest.fail("cpp backend unavailable")
    x, w, b, m = _inputs((2, 6, 7, C), 3, dtype, pixel_mask(2, 6, 7, 0.6))
    _check("cpp", x, w, b, m)
    _check_rows("cpp", x, w, b, m)


@pytest.mark.parametrize("direct", [False, True], ids=["window", "direct"])
def test_triton_small_blocks_and_block_partials(monkeypatch, direct):
    # On a GPU blocks are small: many weight-gradient partials to add, windows overlapping; force it.
    if "triton" not in BACKENDS:
        pytest.fail("triton backend unavailable")
    from engine.ops.sparse_conv import triton as sc_triton

    monkeypatch.setattr(sc_triton, "_blocks", _small_blocks(16, 8, direct))
    m = block_mask(2, 6, 9, 2, 0.6)
    m[1] = False  # rows 54..107: whole 16-row blocks with no visible site skip the taps
    x, w, b, _ = _inputs((2, 6, 9, 11), 3)
    _check("triton", x, w, b, m)
    _check_rows("triton", x, w, b, m)


def test_triton_gpu_config_reads_taps_directly_and_matches_reference():
    # The tiles an H200 gets, run by the interpreter: no window (a register window gathered across
    # threads compiles to per-element selects on sm_90; see sparse_conv/triton.py _blocks).
    if "triton" not in BACKENDS:
        pytest.fail("triton backend unavailable")
    from engine.ops._target import H200, assume_gpu
    from engine.ops.sparse_conv import triton as sc_triton

    with assume_gpu(H200):
        assert sc_triton._blocks(171, 96, torch.device("cpu")) == (128, 32, 0, 8)
        x, w, b, m = _inputs((2, 9, 7, 40), 7, mask=block_mask(2, 9, 7, 2, 0.6))
        _check("triton", x, w, b, m)
        _check_rows("triton", x, w, b, m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    with engine.use_backend(backend):
        for shape, m in (((0, 4, 4, 3), torch.ones(0, 4, 4, dtype=torch.bool)),
                         ((2, 4, 4, 3), torch.zeros(2, 4, 4, dtype=torch.bool))):
            x, w, b, _ = _inputs(shape, 3)
            x.requires_grad_(True)
            y = sparse_dwconv2d(x, w, b, m)
            y.sum().backward()
            assert y.shape == x.shape and not y.any() and x.grad.shape == x.shape and not x.grad.any()
            stage = SparseStage.from_mask(m, 3)
            assert sparse_dwconv2d_rows(stage.gather(x).feats, stage.neighbours, w, b).shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, b, m = _inputs((2, 6, 6, 5), 3, mask=block_mask(2, 6, 6, 2, 0.4))
    stage = SparseStage.from_mask(m, 3)
    feats = stage.gather(x).feats
    with engine.use_backend(backend):
        torch.library.opcheck(torch.ops.kfe.sparse_dwconv2d.default,
                              (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), m))
        torch.library.opcheck(torch.ops.kfe.sparse_dwconv2d_backward.default,
                              (torch.randn_like(x), x.detach(), w.detach(), m))
        torch.library.opcheck(torch.ops.kfe.sparse_dwconv2d_rows.default,
                              (feats.detach().requires_grad_(), stage.neighbours, w, b))
        torch.library.opcheck(torch.ops.kfe.sparse_dwconv2d_rows_backward.default,
                              (torch.randn_like(feats), feats.detach(), stage.neighbours, w.detach()))


def test_compile_fullgraph_no_graph_breaks():
    x, w, b, m = _inputs((2, 6, 6, 5), 3, mask=block_mask(2, 6, 6, 2, 0.4))
    stage = SparseStage.from_mask(m, 3)
    x.requires_grad_(True)

    def step(x, w, b, m, nbr):
        feats = x.reshape(-1, x.shape[-1])[stage.index]
        return (sparse_dwconv2d(x, w, b, m) * 2).sum() + sparse_dwconv2d_rows(feats, nbr, w, b).square().sum()

    explanation = torch._dynamo.explain(step)(x, w, b, m, stage.neighbours)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w, b, m, stage.neighbours)
    (dx,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_()
    expected = step(x2, w, b, m, stage.neighbours)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(dx, x2.grad)


def _bad_table(nbr):
    bad = nbr.clone()
    v, t = (bad >= 0).nonzero()[0].tolist()
    bad[v, t] = (bad[v, t] + 1) % bad.shape[0]
    return bad


BAD_DENSE = [
    ("x rank", lambda x, w, b, m: sparse_dwconv2d(x[0], w, b, m), ValueError, ["x", "4-D"]),
    ("x int", lambda x, w, b, m: sparse_dwconv2d(x.long(), w, b, m), TypeError, ["x", "dtype"]),
    ("x not tensor", lambda x, w, b, m: sparse_dwconv2d(x.tolist(), w, b, m), TypeError, ["x"]),
    ("even k", lambda x, w, b, m: sparse_dwconv2d(x, w[..., :4, :4], b, m), ValueError, ["odd", "k = 4"]),
    ("weight C", lambda x, w, b, m: sparse_dwconv2d(x, w[:5], b, m), ValueError, ["weight", "(6, 1, k, k)"]),
    ("weight groups", lambda x, w, b, m: sparse_dwconv2d(x, w.expand(6, 2, 5, 5), b, m), ValueError, ["weight"]),
    ("weight not square", lambda x, w, b, m: sparse_dwconv2d(x, w[..., :3], b, m), ValueError, ["weight"]),
    ("weight 3-D", lambda x, w, b, m: sparse_dwconv2d(x, w[:, 0], b, m), ValueError, ["weight", "(C, 1, k, k)"]),
    ("weight int", lambda x, w, b, m: sparse_dwconv2d(x, w.long(), b, m), TypeError, ["weight"]),
    ("bias shape", lambda x, w, b, m: sparse_dwconv2d(x, w, b[:3], m), ValueError, ["bias", "(6,)"]),
    ("bias int", lambda x, w, b, m: sparse_dwconv2d(x, w, b.long(), m), TypeError, ["bias"]),
    ("mask shape", lambda x, w, b, m: sparse_dwconv2d(x, w, b, m[:, :2]), ValueError, ["mask", "(2, 5, 4)"]),
    ("mask dtype", lambda x, w, b, m: sparse_dwconv2d(x, w, b, m.float()), TypeError, ["mask", "bool"]),
    ("mask device", lambda x, w, b, m: sparse_dwconv2d(x, w, b, m.to("meta")), ValueError, ["mask", "meta"]),
    ("weight device", lambda x, w, b, m: sparse_dwconv2d(x, w.to("meta"), b, m), ValueError, ["weight", "meta"]),
]


def _rows_args():
    x, w, b, m = _inputs((2, 5, 4, 6), 5, mask=pixel_mask(2, 5, 4, 0.7))
    stage = SparseStage.from_mask(m, 5)
    return stage.gather(x).feats, stage.neighbours, w, b


BAD_ROWS = [
    ("feats rank", lambda f, n, w, b: sparse_dwconv2d_rows(f[None], n, w, b), ValueError, ["feats", "2-D"]),
    ("table dtype", lambda f, n, w, b: sparse_dwconv2d_rows(f, n.long(), w, b), TypeError, ["neighbours", "int32"]),
    ("table taps", lambda f, n, w, b: sparse_dwconv2d_rows(f, n[:, :9], w, b), ValueError, ["neighbours", "k*k"]),
    ("table rows", lambda f, n, w, b: sparse_dwconv2d_rows(f[1:], n, w, b), ValueError, ["neighbours"]),
    ("table range", lambda f, n, w, b: sparse_dwconv2d_rows(f, n.clamp(max=0) - 2, w, b), ValueError,
     ["neighbours", "[-3, -2]"]),
    ("table asymmetric", lambda f, n, w, b: sparse_dwconv2d_rows(f, _bad_table(n), w, b), ValueError,
     ["submanifold"]),
    ("even k", lambda f, n, w, b: sparse_dwconv2d_rows(f, n, w[..., :4, :4], b), ValueError, ["odd"]),
]


@pytest.mark.parametrize("case", BAD_DENSE + BAD_ROWS, ids=[c[0] for c in BAD_DENSE + BAD_ROWS])
def test_bad_inputs_name_the_argument(case):
    name, call, exc, words = case
    args = _rows_args() if case in BAD_ROWS else _inputs((2, 5, 4, 6), 5)
    testing.expect_error(exc, lambda: call(*args), *words)


def test_forced_backend_that_cannot_run_explains_why():
    x, w, b, m = _inputs((1, 3, 3, 4), 3, torch.float64)
    with engine.use_backend("triton"):
        testing.expect_error(BackendUnavailable, lambda: sparse_dwconv2d(x, w, b, m), "triton", "float64")
    with engine.use_backend("cuda"):
        testing.expect_error(BackendUnavailable, lambda: sparse_dwconv2d(x, w, b, m), "no cuda backend")
    assert sparse_op.BACKENDS.pick(x.float())[0].backend == "cpp"  # auto on the CPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 56, 56, 128), (8, 14, 14, 512), (4, 7, 7, 1024)], ids=str)
def test_gpu_matches_reference(dtype, shape):
    N, H, W, _ = shape
    m = block_mask(N, H, W, H // 7, 0.6).cuda()
    x, w, b = (t.cuda() for t in _inputs(shape, 7, dtype, mask=m)[:3])
    for backend in common.gpu_backends("sparse_dwconv2d"):
        _check(backend, x, w, b, m, expect=common.expect("sparse_dwconv2d", backend))
        _check_rows(backend, x, w, b, m, expect=common.expect("sparse_dwconv2d", backend))


def test_bench_suite_runs_and_masks_are_fcmae():
    from engine.bench import core
    from engine.ops.sparse_conv import bench

    m = bench.fcmae_mask(3, 14, 14, 0.6)
    assert (m.sum(dim=(1, 2)) == int(49 * 0.4) * 4).all()  # 19 of 49 patches of 2x2 sites per sample
    assert torch.equal(m, m[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2))  # patch-aligned
    cases = bench.cases(torch.device("cpu"), sizes=[(1, 7, 7, 8)], ratios=(0.6,))
    assert [c.op for c in cases] == ["sparse_dwconv2d", "sparse_block"]
    records = core.run(cases, ["fwd", "fwd+bwd"], warmup=0, repeats=1, providers=["kfe", "kfe-rows", "kfe-sparse"])
    assert {r["provider"] for r in records} == {"reference", "kfe", "kfe-rows", "kfe-sparse"}
    assert all("error" not in r for r in records), [r["error"] for r in records if "error" in r]
