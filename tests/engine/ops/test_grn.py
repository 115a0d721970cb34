"""kfe::grn: every backend against the float64 reference, gradients, poison, bad inputs, compile."""
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

import engine
from engine import testing
from engine.backend import BackendUnavailable
from engine.nn import GRN
from engine.ops import grn
from engine.ops.grn import reference
from tests.engine.ops import common

BACKENDS = testing.backends("grn")
FAST = testing.fast_backends("grn")  # compared with the reference; the reference itself has the spec tests
LOWP = (torch.float32, torch.float16, torch.bfloat16)
# Awkward shapes: a single element, odd C, H*W = 1, N = 1, H*W above the interpreter's row block
# (several loop trips), C above its channel block for the fast paths' stats loops.
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 7, 7, 40), (3, 1, 1, 33), (2, 17, 19, 12), (1, 2, 3, 600)]


def _inputs(shape, dtype=torch.float32, masked=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N, H, W, C = shape
    x = torch.randn(shape, generator=gen).to(dtype)
    gamma = torch.randn(C, generator=gen)  # random, not the zero init: zeros would hide most errors
    beta = torch.randn(C, generator=gen)
    mask = torch.rand(N, H, W, generator=gen) > 0.4 if masked else None
    return x, gamma, beta, mask


def _check(backend, x, gamma, beta, mask, dtype=None, expect=None):
    testing.check_against_reference(grn, reference.grn, (x, gamma, beta, mask), grad=(0, 1, 2),
                                    backend=backend, dtype=dtype, expect=expect)


def _gpu_tiles(N, HW, C, device):
    """The GPU's tiling (32-row blocks, the reduction split across programs) at 8-row, 16-channel blocks."""
    block_r, block_c = 8, 16
    split = min(3, common.cdiv(HW, block_r))
    rows = common.cdiv(common.cdiv(HW, split), block_r) * block_r
    return block_r, block_c, common.cdiv(HW, rows), rows


def test_backends_present():
    # Guards the grid below against silently shrinking: the CI machine runs all three.
    assert {"reference", "cpp", "triton"} <= set(BACKENDS), BACKENDS


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_matches_reference(backend, dtype, shape, masked):
    if dtype not in testing.supported_dtypes("grn", backend):
        pytest.fail(f"{backend} must support {dtype}")
    x, gamma, beta, mask = _inputs(shape, dtype, masked)
    _check(backend, x, gamma, beta, mask)


# Real ranges, never opening on a 1x1 map: H*W past the GPU tiles' 8-row blocks, C past 16-channel blocks.
SHAPE = dict(N=st.integers(1, 3), H=st.integers(2, 14), W=st.integers(2, 14), C=st.integers(3, 80),
             masked=st.booleans(), seed=st.integers(0, 2**16))


@common.cheap()
@given(**SHAPE)
def test_hypothesis_shapes_cpp(N, H, W, C, masked, seed):
    _check("cpp", *_inputs((N, H, W, C), torch.float32, masked, seed))


@common.interpreted()
@given(**SHAPE, gpu_tiles=st.booleans())
def test_hypothesis_shapes_triton(N, H, W, C, masked, seed, gpu_tiles):
    from engine.ops.grn import triton as grn_triton

    with mock.patch.object(grn_triton, "_blocks", _gpu_tiles) if gpu_tiles else nullcontext():
        _check("triton", *_inputs((N, H, W, C), torch.float32, masked, seed))


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_input_and_param_shapes(backend):
    # An NCHW tensor viewed as NHWC, with (1, 1, 1, C) parameters in bfloat16 (autocast-style mix).
    x = torch.randn(2, 24, 5, 6).permute(0, 2, 3, 1)
    assert not x.is_contiguous()
    gamma, beta = torch.randn(1, 1, 1, 24, dtype=torch.bfloat16), torch.randn(1, 1, 1, 24, dtype=torch.bfloat16)
    _check(backend, x, gamma, beta, torch.rand(2, 5, 6) > 0.5, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_sites_exactly_zero_and_isolated(backend):
    # Masked sites hold garbage (NaN, inf); it must neither leak into the statistics nor the output.
    x, gamma, beta, mask = _inputs((3, 6, 6, 20), masked=True)
    mask[1] = False  # a fully masked sample
    x[~mask] = float("nan")
    x[0, 0, 0, 0], mask[0, 0, 0] = float("inf"), False
    x.requires_grad_(True)
    with engine.use_backend(backend):
        y = grn(x, gamma, beta, mask)
        (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert (y[~mask] == 0).all() and (dx[~mask] == 0).all()
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    clean = torch.where(mask[..., None], x.detach(), 0)
    testing.assert_close(y[mask], reference.grn(clean.double(), gamma.double(), beta.double(), mask)[mask],
                         torch.float32)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if torch.float64 in testing.supported_dtypes("grn", b)])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(backend, masked):
    x, gamma, beta, mask = _inputs((2, 3, 4, 5), torch.float64, masked)
    gamma, beta = gamma.double(), beta.double()
    args = tuple(t.requires_grad_(True) for t in (x, gamma, beta))
    with engine.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c: grn(a, b, c, mask), args)


def test_reference_is_the_official_formula():
    # ConvNeXt V2's own GRN (Alg. 1 of the paper / official repo), written out independently.
    x, gamma, beta, _ = _inputs((2, 5, 5, 16), torch.float64)
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    official = gamma.double() * (x * nx) + beta.double() + x
    testing.assert_close(reference.grn(x, gamma.double(), beta.double()), official, torch.float64)


def test_reference_mask_is_per_sample_over_visible_sites():
    x, gamma, beta, mask = _inputs((3, 5, 4, 9), torch.float64, masked=True)
    gamma, beta = gamma.double(), beta.double()
    expected = torch.zeros_like(x)
    for n in range(x.shape[0]):
        rows = x[n][mask[n]]  # (V, C): only this sample's visible sites
        gx = rows.norm(dim=0)
        expected[n][mask[n]] = gamma * rows * (gx / (gx.mean() + 1e-6)) + beta + rows
    testing.assert_close(reference.grn(x, gamma, beta, mask), expected, torch.float64)


def test_triton_split_reduction_and_channel_loops(monkeypatch):
    # On a GPU the H*W reduction is split across programs when the batch is small; the interpreter
    # normally uses one split. Force small blocks and three splits to exercise that path here.
    if "triton" not in BACKENDS:
        pytest.fail("triton backend unavailable")
    from engine.ops.grn import triton as grn_triton

    monkeypatch.setattr(grn_triton, "_blocks", lambda N, HW, C, device: (4, 8, 3, 7))
    x, gamma, beta, mask = _inputs((2, 4, 5, 21), masked=True)
    _check("triton", x, gamma, beta, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, gamma, beta, mask = _inputs((2, 3, 3, 8), masked=True)
    with engine.use_backend(backend):
        torch.library.opcheck(torch.ops.kfe.grn.default, (x.requires_grad_(), gamma.requires_grad_(),
                                                          beta.requires_grad_(), mask, 1e-6))
        dy = torch.randn_like(x)
        torch.library.opcheck(torch.ops.kfe.grn_backward.default, (dy, x.detach(), gamma.detach(), mask, 1e-6))


def test_compile_fullgraph_no_graph_breaks():
    layer = GRN(12)
    torch.nn.init.normal_(layer.gamma)
    torch.nn.init.normal_(layer.beta)
    x, mask = torch.randn(2, 4, 4, 12, requires_grad=True), torch.rand(2, 4, 4) > 0.3

    def step(x, mask):
        return (layer(x, mask) * 2).sum()

    explanation = torch._dynamo.explain(step)(x, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, mask)
    loss.backward()
    expected_x = x.detach().clone().requires_grad_()
    step(expected_x, mask).backward()
    torch.testing.assert_close(loss, step(x.detach(), mask))
    torch.testing.assert_close(x.grad, expected_x.grad)


def test_module_matches_official_layout():
    layer = GRN(32)
    assert dict(layer.state_dict()).keys() == {"gamma", "beta"}
    assert layer.gamma.shape == layer.beta.shape == (1, 1, 1, 32)
    x = torch.randn(2, 3, 3, 32)
    torch.testing.assert_close(layer(x), x)  # zero init: identity, as in ConvNeXt V2
    official = {"gamma": torch.randn(1, 1, 1, 32), "beta": torch.randn(1, 1, 1, 32)}
    layer.load_state_dict(official)
    torch.testing.assert_close(layer(x), reference.grn(x, official["gamma"], official["beta"]))


def test_empty_batch():
    for backend in BACKENDS:
        with engine.use_backend(backend):
            x = torch.randn(0, 3, 3, 4, requires_grad=True)
            y = grn(x, torch.ones(4), torch.ones(4))
            y.sum().backward()
            assert y.shape == x.shape and x.grad.shape == x.shape


BAD_INPUTS = [
    ("x rank", lambda x, g, b, m: grn(x[0], g, b), ValueError, ["x", "4-D"]),
    ("x int", lambda x, g, b, m: grn(x.long(), g, b), TypeError, ["x", "dtype"]),
    ("x not tensor", lambda x, g, b, m: grn(x.tolist(), g, b), TypeError, ["x"]),
    ("gamma size", lambda x, g, b, m: grn(x, g[:-1], b), ValueError, ["gamma", "(8,)"]),
    ("beta shape", lambda x, g, b, m: grn(x, g, b.reshape(8, 1)), ValueError, ["beta", "(1, 1, 1, 8)"]),
    ("gamma int", lambda x, g, b, m: grn(x, g.long(), b), TypeError, ["gamma"]),
    ("mask shape", lambda x, g, b, m: grn(x, g, b, m[:, :2]), ValueError, ["mask", "(2, 3, 4)"]),
    ("mask dtype", lambda x, g, b, m: grn(x, g, b, m.float()), TypeError, ["mask", "bool"]),
    ("gamma device", lambda x, g, b, m: grn(x, g.to("meta"), b), ValueError, ["gamma", "meta"]),
    ("mask device", lambda x, g, b, m: grn(x, g, b, m.to("meta")), ValueError, ["mask", "meta"]),
    ("eps negative", lambda x, g, b, m: grn(x, g, b, eps=-1.0), ValueError, ["eps"]),
    ("eps nan", lambda x, g, b, m: grn(x, g, b, eps=float("nan")), ValueError, ["eps"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_name_the_argument(case):
    _, call, exc, words = case
    x, gamma, beta, mask = _inputs((2, 3, 4, 8), masked=True)
    testing.expect_error(exc, lambda: call(x, gamma, beta, mask), *words)


def test_forced_backend_that_cannot_run_explains_why():
    x, gamma, beta, _ = _inputs((1, 2, 2, 4), torch.float64)
    with engine.use_backend("triton"):
        testing.expect_error(BackendUnavailable, lambda: grn(x, gamma, beta), "triton", "float64")
    with engine.use_backend("cuda"):
        testing.expect_error(BackendUnavailable, lambda: grn(x, gamma, beta), "no cuda backend")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(8, 56, 56, 128), (4, 7, 7, 4096), (1, 56, 56, 96)], ids=str)
def test_gpu_matches_reference(dtype, shape):
    x, gamma, beta, mask = (t if t is None else t.cuda() for t in _inputs(shape, dtype, masked=True))
    for backend in common.gpu_backends("grn"):
        _check(backend, x, gamma, beta, mask, expect=common.expect("grn", backend))
        _check(backend, x, gamma, beta, None, expect=common.expect("grn", backend))
