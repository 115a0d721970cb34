"""kfe::attention: every backend against the float64 reference, gradients, poison, bad inputs, compile."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import engine
from engine import testing
from engine.backend import BackendUnavailable
from engine.ops import attention
from engine.ops.attention import reference
from engine.ops.attention.op import MAX_HEAD_DIM, flop_count, useful_pairs
from tests.engine.ops import common

BACKENDS = testing.backends("attention")
FAST = testing.fast_backends("attention")  # compared with the reference (never with itself)
LOWP = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 72, 80, 96, 128)
# (N, M, causal): the lengths (77 is CLIP's causal text tower), then cross-attention M != N
# (causal with N < M and N > M exercises the top-left alignment).
SEQS = [(1, 1, False), (7, 7, False), (50, 50, False), (77, 77, True), (197, 197, False), (257, 257, False),
        (7, 50, False), (50, 7, True), (197, 50, False), (1, 77, True), (77, 1, True), (257, 197, True)]


def _inputs(B, H, N, M, D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(dtype) for L in (N, M, M))
    return q, k, v


def _check(backend, q, k, v, causal=False, scale=None, dtype=None):
    # One key per query (M = 1, or causal with N = 1: top-left alignment) makes the softmax constant:
    # dq and dk are exactly zero there, which is the right answer and not a degenerate case to refuse.
    one_key = k.shape[-2] == 1 or (causal and q.shape[-2] == 1)
    testing.check_against_reference(
        lambda q, k, v: attention(q, k, v, causal=causal, scale=scale),
        lambda q, k, v: reference.attention(q, k, v, causal, scale), (q, k, v), grad=(0, 1, 2),
        backend=backend, dtype=dtype, allow_zero=one_key)


def test_backends_present():
    assert {"reference", "triton"} <= set(BACKENDS), BACKENDS


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(backend, dtype, D):
    if dtype not in testing.supported_dtypes("attention", backend):
        pytest.fail(f"{backend} must support {dtype}")
    _check(backend, *_inputs(2, 1, 50, 50, D, dtype), causal=D in (72, 128))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("seq", SEQS, ids=str)
def test_sequence_lengths(backend, dtype, seq):
    N, M, causal = seq
    D = HEAD_DIMS[SEQS.index(seq) % len(HEAD_DIMS)]  # each length meets a different head dim
    H = 1 if max(N, M) > 128 else 2  # interpreter time grows with the number of programs
    _check(backend, *_inputs(1, H, N, M, D, dtype), causal=causal)


@common.interpreted()
@given(N=st.integers(2, 260), M=st.integers(2, 260), D=st.sampled_from(HEAD_DIMS + (1, 16, 40, 160, 256)),
       causal=st.booleans(), dtype=st.sampled_from(LOWP), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(N, M, D, causal, dtype, seed):
    # Up to 260: past the GPU's 64- and 128-row tiles (the interpreter takes whole sequences).
    _check("triton", *_inputs(1, 1, N, M, D, dtype, seed), causal=causal)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=str)
@pytest.mark.parametrize("seq", [(50, 77, True), (77, 50, True), (64, 64, True), (45, 70, False), (1, 40, True),
                                 (40, 1, True)], ids=str)
def test_triton_small_blocks(monkeypatch, blocks, seq):
    # The interpreter normally takes whole sequences in one block; the GPU walks many. Small tiles
    # exercise every loop: unmasked bulk blocks, the causal diagonal, N and M tails, BLOCK_M != BLOCK_N.
    from engine.ops.attention import triton as attn_triton

    cfg = attn_triton.Config(*blocks, 1, 1)
    monkeypatch.setattr(attn_triton, "configs", lambda *a: {"fwd": cfg, "dkdv": cfg, "dq": cfg})
    N, M, causal = seq
    _check("triton", *_inputs(2, 2, N, M, 24), causal=causal)


# Each split head dim meets both tile shapes and both 16-bit dtypes, with N < M and N > M.
SPLIT_CASES = [(D, blocks, dtype, NM) for D in (72, 80, 96)
               for blocks, dtype, NM in [((16, 32), torch.float16, (37, 50)), ((32, 16), torch.bfloat16, (50, 37))]]


@pytest.mark.parametrize("D, blocks, dtype, NM", SPLIT_CASES, ids=str)
def test_triton_small_blocks_split_head_dim(monkeypatch, D, blocks, dtype, NM):
    # D = 72 / 80 / 96 run as two head-dim pieces (64 + 16, 64 + 16, 64 + 32; 72's second piece is
    # masked past D) on many blocks: bulk, causal diagonal and tails, in the GPU's 16-bit dtypes.
    from engine.ops.attention import triton as attn_triton

    cfg = attn_triton.Config(*blocks, 1, 1)
    monkeypatch.setattr(attn_triton, "configs", lambda *a: {"fwd": cfg, "dkdv": cfg, "dq": cfg})
    _check("triton", *_inputs(1, 1, *NM, D, dtype), causal=True)


@pytest.mark.parametrize("backend", FAST)
def test_strided_views_of_packed_qkv(backend):
    # q, k, v as the Attention module makes them: views of one (B, N, 3, H, D) projection, with
    # B, H > 1 so that batch and head strides differ from the contiguous layout's.
    B, N, H, D = 2, 33, 3, 40
    qkv = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    _check(backend, q, k, v, causal=True)


@pytest.mark.parametrize("backend", FAST)
def test_explicit_scale(backend):
    q, k, v = _inputs(1, 2, 40, 60, 32)
    _check(backend, q, k, v, scale=1.0)
    _check(backend, q, k, v, scale=-0.3, causal=True)


@pytest.mark.parametrize("backend", FAST)
def test_numpy_scalar_scale(backend):
    # Any real scalar is a scale: np.float32 (not a float subclass, unlike np.float64) and np.int64.
    q, k, v = _inputs(1, 2, 9, 12, 16)
    for scale in (np.float32(0.5), np.float64(0.5), np.int64(1)):
        _check(backend, q, k, v, scale=scale)


@pytest.mark.parametrize("backend", FAST)
def test_saturated_softmax(backend):
    # Logits of magnitude ~700: exp() without the running-max subtraction overflows to inf (NaN out).
    # Forward only: a backward that recomputes P = exp(S - LSE) from a saved fp32 LSE (FlashAttention-2's,
    # and the reference backend's) inherits LSE's rounding, ulp(700) = 6e-5, so its gradients miss the
    # 1e-5 fp32 bound at such logits (measured up to 2e-4 relative; torch's fp32 autograd: 1e-5).
    q, k, v = _inputs(1, 2, 40, 60, 32)
    testing.check_against_reference(lambda q, k, v: attention(q, k, v, scale=1.0),
                                    lambda q, k, v: reference.attention(q, k, v, False, 1.0), (q * 30, k, v),
                                    backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_upstream_gradient(backend):
    q, k, v = (t.requires_grad_() for t in _inputs(2, 2, 20, 30, 16))
    dout = torch.randn(2, 2, 16, 20).transpose(-1, -2)  # (B, H, N, D), not contiguous
    with engine.use_backend(backend):
        got = torch.autograd.grad(attention(q, k, v, causal=True), (q, k, v), dout)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(reference.attention(*ref, causal=True), ref, dout.double())
    for g, w in zip(got, want):
        testing.assert_close(g, w, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_lse_is_the_log_sum_exp(backend):
    q, k, v = _inputs(2, 1, 30, 45, 24)
    with engine.use_backend(backend):
        _, lse = torch.ops.kfe.attention(q, k, v, True, 0.2)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.2
    s = s.masked_fill(~reference.causal_mask(30, 45, q.device), float("-inf"))
    assert lse.dtype == torch.float32
    testing.assert_close(lse, torch.logsumexp(s, dim=-1), torch.float32)


def test_gradcheck_float64_reference_backend():
    q, k, v = (t.double().requires_grad_() for t in _inputs(1, 2, 5, 7, 3))
    with engine.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=True), (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("NM", [(9, 9), (5, 12), (12, 5)], ids=str)
def test_reference_is_torch_sdpa(causal, NM):
    # The spec agrees with torch SDPA, including is_causal's top-left alignment when N != M.
    N, M = NM
    q, k, v = (t.double() for t in _inputs(2, 3, N, M, 8))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    testing.assert_close(reference.attention(q, k, v, causal), expected, torch.float64)
    out, _ = reference.forward(q, k, v, causal, 8 ** -0.5)
    testing.assert_close(out, expected, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = _inputs(1, 2, 9, 13, 16)
    with engine.use_backend(backend):
        torch.library.opcheck(torch.ops.kfe.attention.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 0.25))
        out, lse = torch.ops.kfe.attention(q.detach(), k.detach(), v.detach(), True, 0.25)
        torch.library.opcheck(torch.ops.kfe.attention_backward.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, True, 0.25))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_no_graph_breaks(backend):
    layer = engine.nn.Attention(48, num_heads=3)
    x = torch.randn(2, 11, 48, requires_grad=True)

    def step(x):
        return (layer(x) * 2).sum() + layer(x, causal=True).sum()

    with engine.use_backend(backend):
        explanation = torch._dynamo.explain(step)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
        (grad,) = torch.autograd.grad(loss, x)
        expected_x = x.detach().clone().requires_grad_()
        expected = step(expected_x)
        (expected_grad,) = torch.autograd.grad(expected, expected_x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("causal", [False, True])
def test_flop_counter_counts_attention(causal):
    from torch.utils.flop_counter import FlopCounterMode

    B, H, N, M, D = 2, 3, 10, 14, 8
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, N, M, D))
    with FlopCounterMode(display=False) as counter:
        attention(q, k, v, causal=causal).backward(torch.ones(B, H, N, D))
    counts = counter.get_flop_counts()["Global"]
    pairs = sum(min(i + 1, M) for i in range(N)) if causal else N * M  # written out, not the helper
    assert counts[torch.ops.kfe.attention] == 4 * B * H * pairs * D
    assert counts[torch.ops.kfe.attention_backward] == 10 * B * H * pairs * D
    assert counter.get_total_flops() == 14 * B * H * pairs * D


def test_useful_pairs_counts_the_causal_mask():
    for N, M in [(1, 1), (7, 7), (5, 9), (9, 5), (77, 77)]:
        assert useful_pairs(N, M, True) == int(reference.causal_mask(N, M, torch.device("cpu")).sum())
        assert useful_pairs(N, M, False) == N * M
    assert flop_count((256, 12, 197, 64), (256, 12, 197, 64), False) == 4 * 256 * 12 * 197 * 197 * 64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_module_loads_timm_state_dict_and_matches_sdpa(backend, qkv_bias):
    dim, heads, B, N = 64, 4, 2, 13
    layer = engine.nn.Attention(dim, heads, qkv_bias=qkv_bias)
    sd = {"qkv.weight": torch.randn(3 * dim, dim) * 0.1, "proj.weight": torch.randn(dim, dim) * 0.1,
          "proj.bias": torch.randn(dim)}
    if qkv_bias:
        sd["qkv.bias"] = torch.randn(3 * dim)
    assert set(layer.state_dict()) == set(sd)
    layer.load_state_dict(sd)
    x = torch.randn(B, N, dim)
    # timm's VisionTransformer Attention.forward, written out with plain PyTorch.
    qkv = F.linear(x, sd["qkv.weight"], sd.get("qkv.bias")).reshape(B, N, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    for causal in (False, True):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, N, dim)
        with engine.use_backend(backend):
            torch.testing.assert_close(layer(x, causal=causal), F.linear(o, sd["proj.weight"], sd["proj.bias"]),
                                       rtol=1e-5, atol=1e-5)


def test_module_rejects_indivisible_heads():
    testing.expect_error(ValueError, lambda: engine.nn.Attention(50, 3), "50", "num_heads")


def test_module_rejects_bad_input():
    layer = engine.nn.Attention(64, 4)
    testing.expect_error(ValueError, lambda: layer(torch.randn(13, 64)), "x", "(B, N, dim)", "(13, 64)")
    testing.expect_error(ValueError, lambda: layer(torch.randn(2, 13, 32)), "x", "dim = 64", "(2, 13, 32)")
    testing.expect_error(TypeError, lambda: layer([[0.0] * 64]), "x", "Tensor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_queries(backend):
    with engine.use_backend(backend):
        for qs, ks in [((0, 2, 5, 8), (0, 2, 6, 8)), ((1, 2, 0, 8), (1, 2, 6, 8))]:
            q, k, v = torch.randn(qs, requires_grad=True), torch.randn(ks, requires_grad=True), torch.randn(ks)
            out = attention(q, k, v.requires_grad_())
            gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
            assert out.shape == qs and gq.shape == qs and gk.shape == ks
            assert not gk.any() and not gv.any()


def test_triton_head_dim_limit_matches_op():
    from engine.ops.attention import triton as attn_triton

    assert attn_triton.MAX_HEAD_DIM == MAX_HEAD_DIM


BAD_INPUTS = [
    ("q rank", lambda q, k, v: attention(q[0], k, v), ValueError, ["q", "4-D"]),
    ("k rank", lambda q, k, v: attention(q, k[..., None], v), ValueError, ["k", "4-D"]),
    ("q not tensor", lambda q, k, v: attention(q.tolist(), k, v), TypeError, ["q"]),
    ("q int", lambda q, k, v: attention(q.long(), k, v), TypeError, ["q", "dtype"]),
    ("batch mismatch", lambda q, k, v: attention(q, k[:1], v[:1]), ValueError, ["k", "(2, 3, M, 16)"]),
    ("heads mismatch", lambda q, k, v: attention(q, k[:, :2], v[:, :2]), ValueError, ["k", "(2, 3, M, 16)"]),
    ("head dim mismatch", lambda q, k, v: attention(q, k[..., :8], v[..., :8]), ValueError, ["k", "(2, 3, M, 16)"]),
    ("v shape", lambda q, k, v: attention(q, k, v[:, :, :4]), ValueError, ["v", "(2, 3, 7, 16)"]),
    ("head dim > 256", lambda q, k, v: attention(*(torch.zeros(1, 1, 2, 257) for _ in range(3))), ValueError,
     ["head dim", "256", "257"]),
    ("no keys", lambda q, k, v: attention(q, k[:, :, :0], v[:, :, :0]), ValueError, ["M >= 1"]),
    ("dtype mix", lambda q, k, v: attention(q, k.half(), v), TypeError, ["k", "float16", "float32"]),
    ("v dtype", lambda q, k, v: attention(q, k, v.bfloat16()), TypeError, ["v", "bfloat16"]),
    ("device mix", lambda q, k, v: attention(q, k, v.to("meta")), ValueError, ["v", "meta", "cpu"]),
    ("causal not bool", lambda q, k, v: attention(q, k, v, causal=1), TypeError, ["causal"]),
    ("scale nan", lambda q, k, v: attention(q, k, v, scale=float("nan")), ValueError, ["scale"]),
    ("scale tensor", lambda q, k, v: attention(q, k, v, scale=torch.tensor(1.0)), TypeError, ["scale"]),
    ("scale numpy nan", lambda q, k, v: attention(q, k, v, scale=np.float32("nan")), ValueError, ["scale"]),
    ("scale bool", lambda q, k, v: attention(q, k, v, scale=True), TypeError, ["scale"]),
    ("scale numpy array", lambda q, k, v: attention(q, k, v, scale=np.ones(1)), TypeError, ["scale"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_name_the_argument(case):
    _, call, exc, words = case
    q, k, v = _inputs(2, 3, 5, 7, 16)
    testing.expect_error(exc, lambda: call(q, k, v), *words)


def test_forced_backend_that_cannot_run_explains_why():
    q, k, v = _inputs(1, 1, 3, 3, 8, torch.float64)
    with engine.use_backend("triton"):
        testing.expect_error(BackendUnavailable, lambda: attention(q, k, v), "triton", "float64")
    with engine.use_backend("cuda"):
        testing.expect_error(BackendUnavailable, lambda: attention(q, k, v), "no cuda backend")
