"""kfe::contrastive_loss: every backend against the float64 materialised spec, gradients, poison, bad inputs,
NaN, opcheck, compile, FLOP formula, the per-rank row decomposition, and the chunked path's memory bound."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from contextlib import nullcontext
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import engine
from engine import testing
from engine.backend import BackendUnavailable
from engine.nn import ContrastiveLoss
from engine.ops import contrastive_loss
from engine.ops.contrastive import reference
from tests.engine.ops import common

OP = "contrastive_loss"
BACKENDS = testing.backends(OP)
FAST = testing.fast_backends(OP)  # compared with the spec; the chunked reference backend: its own tests
LOWP = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("clip", "siglip")
# (B, D): batch 1 and 2, B not a multiple of any tile (7, 33, 300 > the interpreter's 128-row tile), D not
# a multiple of the K block (65), D = 512 with a small batch (interpreter time grows with B^2 * D).
SHAPES = [(1, 32), (2, 64), (7, 65), (33, 32), (300, 64), (5, 512)]
# CLIP at B = 1 is degenerate (the only pair is its own softmax: loss 0, every gradient 0); SigLIP is not.
CASES = [(kind, shape) for kind in KINDS for shape in SHAPES if not (kind == "clip" and shape[0] == 1)]
ROOT = Path(__file__).resolve().parents[3]


def _inputs(B, D, dtype=torch.float32, kind="clip", seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    text = F.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    # Pull positive pairs together a little so the diagonal matters, as early in training. Not more: the
    # loss is lse - s * <i, t>, and with a strong pull (0.5) it is ~1e-4 at O(s) terms, a difference that
    # float32 cannot give to 1e-5 of itself (the limit every output is held to, relative to its own norm).
    text = F.normalize(text.double() + 0.2 * image.double(), dim=-1).to(dtype)
    scale = 1 + 29 * torch.rand((), generator=gen)                      # s in [1, 30]
    bias = -12 * torch.rand((), generator=gen) if kind == "siglip" else None
    return image, text, scale, bias


def _check(backend, image, text, scale, bias, kind, dtype=None, expect=None):
    args = (image, text, scale) if bias is None else (image, text, scale, bias)
    testing.check_against_reference(contrastive_loss, reference.contrastive_loss, args, grad=range(len(args)),
                                    backend=backend, dtype=dtype, kwargs={"kind": kind}, expect=expect)


def _gpu_tiles(NA, NK, D, device):
    """The GPU's tiling (many row tiles, key columns split across programs, D in slices) at 16-wide tiles."""
    return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_D=32, split=3)


def _rows_op(kind, row_start, row_count):
    def fn(image, text, scale, bias=None):
        return torch.ops.kfe.contrastive_loss(image, text, scale, bias, kind, row_start, row_count)[0]
    return fn


def _rows_spec(kind, row_start, row_count):
    return lambda image, text, scale, bias=None: reference.contrastive_loss(image, text, scale, bias, kind,
                                                                            row_start, row_count)


def test_backends_present():
    assert {"reference", "triton"} <= set(BACKENDS), BACKENDS


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("kind, shape", CASES, ids=str)
def test_matches_reference(backend, dtype, kind, shape):
    if dtype not in testing.supported_dtypes(OP, backend):
        pytest.fail(f"{backend} must support {dtype}")
    _check(backend, *_inputs(*shape, dtype, kind), kind)


# Batches from 2 (CLIP at 1 is degenerate) past the interpreter's 128-row tile, D past the 16-wide K
# blocks; with the GPU's small tiles half the time (key splits, D slices, partial tiles).
@common.interpreted()
@given(B=st.integers(2, 140), D=st.integers(2, 80), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16),
       gpu_tiles=st.booleans())
def test_hypothesis_shapes(B, D, kind, seed, gpu_tiles):
    from engine.ops.contrastive import triton as ct

    image, text, scale, bias = _inputs(B, D, torch.float32, kind, seed)
    # A relative check of the loss means something only where it is not a tiny difference of O(s) terms
    # (a pair far apart from every other: loss ~1e-4, below float32's resolution of lse - s * <i, t>).
    leaves = [t.double().requires_grad_() for t in (image, text, scale)]
    loss = reference.contrastive_loss(*leaves, None if bias is None else bias.double(), kind)
    (dscale,) = torch.autograd.grad(loss, leaves[2])
    # One float32 ulp of an O(s) term is 1.2e-7 * s, so a 1e-5 relative check of the loss needs loss >~ 1.2e-2 * s:
    # 2e-2 leaves a factor 2 (at 1e-3 a draw with loss = 2.2e-3 * s failed at 1.2e-5 on a 0.2-ulp rounding).
    assume(loss.item() >= 2e-2 * scale.item() and abs(dscale.item()) >= 1e-3)
    with mock.patch.object(ct, "_blocks", _gpu_tiles) if gpu_tiles else nullcontext():
        _check("triton", image, text, scale, bias, kind)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B, row_start, row_count", [(10, 0, 5), (10, 5, 5), (9, 3, 3), (300, 150, 150)])
def test_rank_rows_match_reference(backend, kind, B, row_start, row_count):
    # The terms of one rank's rows (what each process of the multi-process loss computes).
    image, text, scale, bias = _inputs(B, 40, torch.float32, kind)
    args = (image, text, scale) if bias is None else (image, text, scale, bias)
    testing.check_against_reference(_rows_op(kind, row_start, row_count), _rows_spec(kind, row_start, row_count),
                                     args, grad=range(len(args)), backend=backend)


@pytest.mark.parametrize("kind", KINDS)
def test_rank_losses_average_to_the_global_loss(kind):
    # The convention of dist.py, on the spec itself: mean_k loss_k == loss, and sum_k dloss_k == W dloss.
    W, b = 3, 4
    image, text, scale, bias = (t if t is None else t.double().requires_grad_() for t in _inputs(W * b, 16, kind=kind))
    per_rank = [reference.contrastive_loss(image, text, scale, bias, kind, k * b, b) for k in range(W)]
    whole = reference.contrastive_loss(image, text, scale, bias, kind)
    testing.assert_close(sum(per_rank) / W, whole, torch.float64)
    leaves = [t for t in (image, text, scale, bias) if t is not None]
    for got, want in zip(torch.autograd.grad(sum(per_rank), leaves), torch.autograd.grad(W * whole, leaves)):
        testing.assert_close(got, want, torch.float64)


def test_triton_small_tiles_splits_and_d_chunks(monkeypatch):
    # On a GPU the key columns are split across programs and D is covered by several programs; the
    # interpreter normally uses one. Force 16-wide tiles, 3 splits and 32-wide D slices here.
    if "triton" not in BACKENDS:
        pytest.fail("triton backend unavailable")
    from engine.ops.contrastive import triton as ct

    monkeypatch.setattr(ct, "_blocks", lambda NA, NK, D, device: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16,
                                                                      BLOCK_D=32, split=3))
    # B = 40: 3 row tiles (the last partial), 2 key splits of 32 columns; D = 40: 2 slices of 32.
    _check("triton", *_inputs(40, 40, torch.float32, "clip"), "clip")
    image, text, scale, bias = _inputs(40, 40, torch.float32, "siglip")
    testing.check_against_reference(_rows_op("siglip", 20, 17), _rows_spec("siglip", 20, 17),
                                    (image, text, scale, bias), grad=range(4), backend="triton")


def test_reference_backend_many_chunks(monkeypatch):
    monkeypatch.setitem(reference.CHUNK_ELEMENTS, "cpu", 64)  # 1-row chunks at B = 33
    for kind in KINDS:
        _check("reference", *_inputs(33, 20, torch.float32, kind), kind)
        image, text, scale, bias = _inputs(33, 20, torch.float32, kind)
        args = (image, text, scale) if bias is None else (image, text, scale, bias)
        testing.check_against_reference(_rows_op(kind, 11, 11), _rows_spec(kind, 11, 11), args,
                                        grad=range(len(args)), backend="reference")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [(0, 6), (2, 3)], ids=["all", "rank"])
def test_gradcheck_float64(kind, rows):
    image, text, scale, bias = _inputs(6, 5, torch.float64, kind)
    args = tuple(t.double().requires_grad_() for t in (image, text, scale, bias) if t is not None)
    with engine.use_backend("reference"):
        assert torch.autograd.gradcheck(_rows_op(kind, *rows), args)


@pytest.mark.parametrize("kind", KINDS)
def test_spec_is_open_clips_loss(kind):
    # The real open_clip ClipLoss / SigLipLoss (world size 1) as the peer: value and every gradient.
    from open_clip.loss import ClipLoss, SigLipLoss

    image, text, scale, bias = _inputs(9, 16, torch.float64, kind)
    args = (image, text, scale.double()) + (() if bias is None else (bias.double(),))
    peer = ClipLoss() if kind == "clip" else SigLipLoss()
    testing.check_against_reference(lambda *a: reference.contrastive_loss(*a, kind=kind), lambda *a: peer(*a), args,
                                    grad=range(len(args)), backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["image", "text", "scale"])
def test_nan_input_gives_nan_loss(backend, kind, where):
    image, text, scale, bias = _inputs(20, 24, torch.float32, kind)
    if where == "scale":
        scale = torch.tensor(float("nan"))
    else:
        (image if where == "image" else text)[13, 5] = float("nan")
    image.requires_grad_(True)
    with engine.use_backend(backend):
        loss = contrastive_loss(image, text, scale, bias, kind=kind)
        (grad,) = torch.autograd.grad(loss, image)
    assert loss.isnan(), f"NaN in {where} gave loss {loss.item()}"
    assert grad.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_inf_input_gives_non_finite_loss(backend, kind):
    # The contract (see contrastive_loss): a non-finite input gives a non-finite loss; whether NaN or inf
    # depends on the order of operations, which differs between backends (e.g. -inf in image: the chunked
    # reference gives inf for CLIP, the Triton kernel NaN).
    for where in ("image", "text", "scale") + (("bias",) if kind == "siglip" else ()):
        for value in (float("inf"), float("-inf")):
            image, text, scale, bias = _inputs(20, 24, torch.float32, kind)
            if where == "scale":
                scale = torch.tensor(value)
            elif where == "bias":
                bias = torch.tensor(value)
            else:
                (image if where == "image" else text)[13, 5] = value
            with engine.use_backend(backend):
                loss = contrastive_loss(image, text, scale, bias, kind=kind)
            assert not loss.isfinite(), f"{value} in {where} gave loss {loss.item()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    image, text, scale, bias = _inputs(12, 16, torch.float32, "siglip")
    cases = [("clip", None, (0, 12)), ("clip", None, (4, 4)), ("siglip", bias, (0, 12)), ("siglip", bias, (8, 4))]
    with engine.use_backend(backend):
        for kind, b, rows in cases[1:3] if backend == "triton" else cases:  # the interpreter is slow
            leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
            b = None if b is None else b.clone().requires_grad_()
            torch.library.opcheck(torch.ops.kfe.contrastive_loss.default, (*leaves, b, kind, *rows))
            _, stats = torch.ops.kfe.contrastive_loss(image, text, scale, b, kind, *rows)
            torch.library.opcheck(torch.ops.kfe.contrastive_loss_backward.default,
                                  (torch.tensor(1.5), image, text, scale, None if b is None else b.detach(),
                                   stats, kind, *rows))


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_no_graph_breaks(kind):
    loss_fn = ContrastiveLoss(kind)
    towers = torch.nn.Linear(16, 8)
    x_image, x_text = torch.randn(10, 16), torch.randn(10, 16)

    def step(x_image, x_text):
        image, text = F.normalize(towers(x_image), dim=-1), F.normalize(towers(x_text.flip(1)), dim=-1)
        return loss_fn(image, text) * 2

    explanation = torch._dynamo.explain(step)(x_image, x_text)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    params = list(towers.parameters()) + list(loss_fn.parameters())
    with torch.no_grad():
        loss_fn.logit_scale.fill_(7.0)  # past the cap: the compiled graph clamps the parameter in place
    got = torch.autograd.grad(compiled(x_image, x_text), params)
    assert math.isclose(loss_fn.logit_scale.item(), math.log(100), rel_tol=1e-6)
    want = torch.autograd.grad(step(x_image, x_text), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.slow  # inductor compiles C++: ~18 s with a warm FX graph cache, ~25 s cold, on this shared CPU
def test_compile_inductor_reference_path():
    # The real compiler (not aot_eager) around the custom op and the in-place clamp, on the CPU path.
    loss_fn = ContrastiveLoss("siglip")
    image, text, _, _ = _inputs(12, 16, torch.float32, "siglip")

    def step(image, text):
        return loss_fn(F.normalize(image * 2, dim=-1), text)

    image.requires_grad_(True)
    with engine.use_backend("reference"):
        with torch.no_grad():
            loss_fn.logit_scale.fill_(6.0)
        compiled = torch.compile(step, fullgraph=True, backend="inductor")
        got = compiled(image, text)
        assert math.isclose(loss_fn.logit_scale.item(), math.log(100), rel_tol=1e-6)
        got_grads = torch.autograd.grad(got, [image, *loss_fn.parameters()])
        want = step(image, text)
        want_grads = torch.autograd.grad(want, [image, *loss_fn.parameters()])
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kind", KINDS)
def test_flop_formula(kind):
    B, D = 12, 16
    image, text, scale, bias = (t if t is None else t.requires_grad_() for t in _inputs(B, D, kind=kind))
    with FlopCounterMode(display=False) as counter:
        contrastive_loss(image, text, scale, bias, kind=kind).backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts == {"kfe.contrastive_loss": 2 * B * B * D, "kfe.contrastive_loss_backward": 4 * B * B * D}
    with FlopCounterMode(display=False) as counter:  # a rank's rows: CLIP needs rows and columns R
        torch.ops.kfe.contrastive_loss(image.detach(), text.detach(), scale.detach(), None, kind, 4, 3)
    cells = 2 * 3 * B - 3 * 3 if kind == "clip" else 3 * B
    assert counter.get_total_flops() == 2 * D * cells


def test_chunked_cpu_path_never_materialises_b_by_b():
    # Forward + backward at B = 16384 through the auto path in a fresh process; its peak RSS above the
    # pre-call level must stay far below one B x B fp32 matrix (1 GiB; materialised CLIP takes several).
    # D is small to keep the test fast: the logits chunks, not D, are what could blow up.
    B, D = 16384, 16
    script = textwrap.dedent(f"""
        import torch, torch.nn.functional as F
        from engine.ops import contrastive_loss
        from engine.ops.contrastive.op import BACKENDS
        def status(key):
            return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))
        warm = F.normalize(torch.randn(64, {D}), dim=-1).requires_grad_()  # page in the BLAS code first
        contrastive_loss(warm, warm.flip(0), torch.tensor(2.0)).backward()
        image = F.normalize(torch.randn({B}, {D}), dim=-1).requires_grad_()
        text = F.normalize(torch.randn({B}, {D}), dim=-1).requires_grad_()
        scale = torch.tensor(20.0, requires_grad=True)
        assert BACKENDS.pick(image)[0].backend == "reference"
        open('/proc/self/clear_refs', 'w').write('5')  # reset the high-water mark
        before = status('VmRSS:')
        contrastive_loss(image, text, scale).backward()
        print(status('VmHWM:') - before)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    extra = int(out.stdout.split()[-1])
    assert extra < B * B * 4 / 4, f"peak RSS grew by {extra / 2**20:.0f} MiB; B x B fp32 is {B * B * 4 / 2**20:.0f} MiB"


BAD_INPUTS = [
    ("image rank", lambda i, t, s, b: contrastive_loss(i[0], t, s), ValueError, ["image", "2-D"]),
    ("text rank", lambda i, t, s, b: contrastive_loss(i, t[None], s), ValueError, ["text", "2-D"]),
    ("B mismatch", lambda i, t, s, b: contrastive_loss(i, t[:5], s), ValueError, ["text", "(6, 8)", "rows"]),
    ("D mismatch", lambda i, t, s, b: contrastive_loss(i, t[:, :7], s), ValueError, ["text", "(6, 8)", "embedding"]),
    ("image int", lambda i, t, s, b: contrastive_loss(i.long(), t.long(), s), TypeError, ["image", "dtype"]),
    ("dtype mix", lambda i, t, s, b: contrastive_loss(i, t.double(), s), TypeError, ["text", "float64"]),
    ("image list", lambda i, t, s, b: contrastive_loss(i.tolist(), t, s), TypeError, ["image"]),
    ("empty", lambda i, t, s, b: contrastive_loss(i[:0], t[:0], s), ValueError, ["non-empty"]),
    ("scale shape", lambda i, t, s, b: contrastive_loss(i, t, s.expand(3)), ValueError, ["logit_scale", "(3,)"]),
    ("scale 2-D", lambda i, t, s, b: contrastive_loss(i, t, s.reshape(1, 1)), ValueError, ["logit_scale", "scalar"]),
    ("scale int", lambda i, t, s, b: contrastive_loss(i, t, s.long()), TypeError, ["logit_scale", "dtype"]),
    ("scale str", lambda i, t, s, b: contrastive_loss(i, t, "10"), TypeError, ["logit_scale"]),
    ("scale device", lambda i, t, s, b: contrastive_loss(i, t, s.to("meta")), ValueError, ["logit_scale", "meta"]),
    ("text device", lambda i, t, s, b: contrastive_loss(i, t.to("meta"), s), ValueError, ["text", "meta"]),
    ("bias shape", lambda i, t, s, b: contrastive_loss(i, t, s, b.expand(2), kind="siglip"), ValueError,
     ["logit_bias", "(2,)"]),
    ("bias with clip", lambda i, t, s, b: contrastive_loss(i, t, s, b), ValueError, ["logit_bias", "siglip"]),
    ("kind", lambda i, t, s, b: contrastive_loss(i, t, s, kind="infonce"), ValueError, ["kind", "infonce"]),
    ("group str", lambda i, t, s, b: contrastive_loss(i, t, s, group="x"), TypeError, ["group", "ProcessGroup", "str"]),
    ("group True", lambda i, t, s, b: contrastive_loss(i, t, s, group=True), TypeError, ["group", "bool"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_name_the_argument(case):
    _, call, exc, words = case
    image, text, scale, bias = _inputs(6, 8, kind="siglip")
    testing.expect_error(exc, lambda: call(image, text, scale, bias), *words)


def test_scalars_accept_numbers_and_shape_1():
    image, text, scale, bias = _inputs(6, 8, kind="siglip")
    want = reference.contrastive_loss(image, text, scale, bias, "siglip")
    got = contrastive_loss(image, text, scale.item(), bias.reshape(1), kind="siglip")
    testing.assert_close(got, want.double(), torch.float32)


def test_forced_backend_that_cannot_run_explains_why():
    image, text, scale, _ = _inputs(4, 8, torch.float64)
    with engine.use_backend("triton"):
        testing.expect_error(BackendUnavailable, lambda: contrastive_loss(image, text, scale), "triton", "float64")


def test_module_parameters_and_clamp():
    clip, siglip = ContrastiveLoss(), ContrastiveLoss("siglip")
    assert set(clip.state_dict()) == {"logit_scale"} and set(siglip.state_dict()) == {"logit_scale", "logit_bias"}
    assert math.isclose(clip.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(siglip.logit_scale.item(), math.log(10), rel_tol=1e-6) and siglip.logit_bias.item() == -10
    image, text, _, _ = _inputs(6, 8)
    testing.assert_close(clip(image, text), reference.contrastive_loss(image.double(), text.double(),
                                                                     torch.tensor(1 / 0.07)), torch.float32)
    with torch.no_grad():
        clip.logit_scale.fill_(7.0)  # exp(7) > 100: the parameter itself is clamped to log(100) in forward
    loss = clip(image, text)
    assert math.isclose(clip.logit_scale.item(), math.log(100), rel_tol=1e-6)
    testing.assert_close(loss, reference.contrastive_loss(image.double(), text.double(), torch.tensor(100.0)),
                         torch.float32)
    loss.backward()
    assert clip.logit_scale.grad.abs() > 0  # the true gradient, not the zero of a clamp in the graph
    with torch.no_grad():
        clip.logit_scale.fill_(-1.0)  # and at least 1 (open_clip's clamp_(0, log 100))
    testing.assert_close(clip.scale(), torch.tensor(1.0), torch.float32)
    assert clip.logit_scale.item() == 0
    testing.expect_error(ValueError, lambda: ContrastiveLoss("triplet"), "kind")
    for bad in (dict(init_temperature=0.0), dict(init_temperature=2.0), dict(init_temperature=0.001),
                dict(max_scale=0.5)):
        testing.expect_error(ValueError, lambda: ContrastiveLoss(**bad), "init_temperature", "max_scale")


def test_scale_pushed_past_the_cap_comes_back_under_adam():
    # Phase 1 drives the scale up (the negated loss of unrelated pairs grows with it) until it hits the cap
    # and Adam's momentum carries the parameter past it; phase 2 minimises the loss, which wants a small
    # scale. Clamping only the value used (exp(logit_scale.clamp(max=log 100))) zeroes the gradient above
    # the cap and leaves the parameter stuck there for good; clamping the parameter brings it back.
    gen = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(16, 8, generator=gen), dim=-1) for _ in range(2))
    module = ContrastiveLoss()
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    for sign, steps in ((-1, 40), (1, 50)):
        for _ in range(steps):
            opt.zero_grad()
            loss = sign * module(image, text)
            assert module.logit_scale.item() <= math.log(100) * (1 + 1e-6)  # clamped by the forward
            loss.backward()
            opt.step()
        if sign == -1:
            assert module.logit_scale.item() > math.log(100), "phase 1 must push the parameter past the cap"
    assert module.logit_scale.item() < math.log(100) - 1, module.logit_scale.item()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(4096, 512), (1000, 768), (333, 1024)], ids=str)
def test_gpu_matches_reference(kind, dtype, shape):
    # bf16 at B = 4096: |dI| ~ 5e-4, held to 1e-2 of its own norm (an all-zero gradient fails).
    image, text, scale, bias = (t if t is None else t.cuda() for t in _inputs(*shape, dtype, kind))
    for backend in common.gpu_backends(OP):
        _check(backend, image, text, scale, bias, kind, expect=common.expect(OP, backend))
        args = (image, text, scale) if bias is None else (image, text, scale, bias)
        B = shape[0]
        testing.check_against_reference(_rows_op(kind, B // 4, B // 4), _rows_spec(kind, B // 4, B // 4), args,
                                        grad=range(len(args)), backend=backend, expect=common.expect(OP, backend))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_memory_b65536(kind):
    # The bound: forward + backward at B = 65536, D = 512 in bf16 under 1 GB of extra memory.
    B, D = 65536, 512
    image, text, scale, bias = (t if t is None else t.cuda() for t in _inputs(B, D, torch.bfloat16, kind))
    leaves = [t.requires_grad_() for t in (image, text, scale) + ((bias,) if bias is not None else ())]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with engine.backend.record_backends() as ran:
        loss = contrastive_loss(image, text, scale, bias, kind=kind)
        grads = torch.autograd.grad(loss, leaves)
    torch.cuda.synchronize()
    testing.assert_ran(ran, common.CUDA_AUTO[OP], "B = 65536")
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert extra < 1e9, f"{extra / 1e6:.0f} MB"  # the issue: "peak extra memory < 1 GB"
