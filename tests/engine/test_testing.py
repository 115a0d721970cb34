"""engine.testing, the harness of every op test: each broken variant that the old check (an absolute floor
of max(1, |expected|) x 1.6e-2 in bf16, 2e-3 in fp16; reference-vs-reference cases) let through must now
fail. The old check is kept here, as `_legacy_ok`, to show that each mutant really passed it."""
import math

import pytest
import torch

import engine
from engine import testing
from engine.ops import contrastive_loss, grn, hog
from engine.ops.contrastive import reference as contrastive_ref
from engine.ops.grn import reference as grn_ref
from engine.ops.hog import reference as hog_ref
from tests.engine.ops.test_contrastive import _inputs as contrastive_inputs
from tests.engine.ops.test_hog import _edges

_LEGACY = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _legacy_ok(actual, expected, dtype) -> bool:
    """The check every op test used before: |a - e| <= tol * max(1, max|e|) + tol * |e|."""
    tol = _LEGACY[dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return bool(((a - e).abs() <= tol * max(1.0, e.abs().max().item()) + tol * e.abs()).all())


class _Mutate(torch.autograd.Function):
    """Identity forward; the backward breaks the gradient the way a buggy kernel would."""

    @staticmethod
    def forward(ctx, x, how):
        ctx.how = how
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return {"zeroed": g * 0, "negated": -g, "halved": g / 2}[ctx.how], None


def grad_mutant(fn, index, how):
    """fn with the gradient of its argument `index` zeroed, negated or halved."""
    def run(*args, **kwargs):
        args = list(args)
        args[index] = _Mutate.apply(args[index], how)
        return fn(*args, **kwargs)
    return run


def _clip_grads(fn, args, backend):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    with engine.use_backend(backend):
        return torch.autograd.grad(fn(*leaves, kind="clip"), leaves, torch.tensor(1.3))


# (what, B, D, dtype, argument, mutation, backend): each passed the legacy check (asserted below).
# arg 0 = the image gradient dI, arg 2 = the temperature (logit scale) gradient.
CONTRASTIVE_MUTANTS = [
    pytest.param("dI all zero at B = 4096: |dI| ~ 1e-3, under the old floor", 4096, 32, torch.bfloat16, 0, "zeroed",
                 "reference", marks=pytest.mark.slow),  # ~25 s: B x B float64 spec, twice
    ("dI halved", 300, 64, torch.bfloat16, 0, "halved", "triton"),
    ("temperature grad zeroed", 2, 64, torch.bfloat16, 2, "zeroed", "triton"),
    ("temperature grad negated", 2, 64, torch.bfloat16, 2, "negated", "triton"),
    ("temperature grad zeroed", 7, 65, torch.bfloat16, 2, "zeroed", "triton"),
    ("temperature grad zeroed", 5, 512, torch.bfloat16, 2, "zeroed", "triton"),
    ("temperature grad halved", 7, 65, torch.float16, 2, "halved", "triton"),
]


@pytest.mark.parametrize("what, B, D, dtype, arg, how, backend", CONTRASTIVE_MUTANTS, ids=str)
def test_contrastive_gradient_mutants_fail(what, B, D, dtype, arg, how, backend):
    image, text, scale, _ = contrastive_inputs(B, D, dtype, "clip")
    args = (image, text, scale)
    mutant = grad_mutant(contrastive_loss, arg, how)
    got = _clip_grads(mutant, args, backend)[arg]
    want = _clip_grads(contrastive_ref.contrastive_loss, [a.double() for a in args], "reference")[arg]
    assert _legacy_ok(got, want, max(dtype, got.dtype, key=lambda d: _LEGACY[d])), "no longer a mutant the old check missed"
    with pytest.raises(AssertionError, match=f"grad of arg {arg}"):
        testing.check_against_reference(mutant, contrastive_ref.contrastive_loss, args, grad=(0, 1, 2),
                                        backend=backend, kwargs={"kind": "clip"})
    if backend == "triton":  # and the unbroken kernel passes the same check
        testing.check_against_reference(contrastive_loss, contrastive_ref.contrastive_loss, args, grad=(0, 1, 2),
                                        backend=backend, kwargs={"kind": "clip"})


def test_clip_at_batch_one_is_refused_as_degenerate():
    # One pair: the softmax of a single logit, loss 0 and every gradient 0; any zeroed kernel passes it.
    image, text, scale, _ = contrastive_inputs(1, 32, torch.bfloat16, "clip")
    mutant = grad_mutant(contrastive_loss, 0, "zeroed")
    got = _clip_grads(mutant, (image, text, scale), "triton")[0]
    assert _legacy_ok(got, torch.zeros_like(got, dtype=torch.float64), torch.bfloat16)
    with pytest.raises(AssertionError, match="all zero"):
        testing.check_against_reference(mutant, contrastive_ref.contrastive_loss, (image, text, scale), grad=(0, 1, 2),
                                        backend="triton", kwargs={"kind": "clip"})


def _hog_ties_down(frames, nbins=9, cell=8, gaussian_window=0):
    """reference.hog_cells with a changed bin rule: a phase exactly on a boundary goes to the lower bin."""
    gx, gy = hog_ref.sobel(frames.detach().double())
    mag = torch.stack([gx, gy], dim=-1).norm(dim=-1)
    phase = torch.atan2(gx, gy) / math.pi * nbins
    bins = (phase.ceil().long() - 1) % nbins
    N, C, H, W = frames.shape
    votes = torch.zeros(N, C, nbins, H, W, dtype=torch.float64).scatter_add_(2, bins.unsqueeze(2), mag.unsqueeze(2))
    cells = votes.unfold(3, cell, cell).unfold(4, cell, cell).sum(dim=(-1, -2))
    return torch.nn.functional.normalize(cells, p=2, dim=2, eps=1e-12).to(hog_ref.acc_dtype(frames))


def test_hog_with_a_changed_bin_rule_fails(monkeypatch):
    # The old boundary tests ran backend="reference" against reference.hog: a changed bin rule in the
    # spec changed both sides and passed. Against a fast path it fails.
    x = _edges("vertical")  # phase exactly +-pi/2: a boundary for 8 bins
    monkeypatch.setattr(hog_ref, "hog_cells", _hog_ties_down)
    testing.check_against_reference(hog, hog_ref.hog, (x,), kwargs={"nbins": 8}, backend="reference")  # the old case
    for backend in testing.fast_backends("hog"):
        with pytest.raises(AssertionError, match="output 0"):
            testing.check_against_reference(hog, hog_ref.hog, (x,), kwargs={"nbins": 8}, backend=backend)


def test_one_wrong_element_in_a_million_fails():
    # 1e-3 of the norm (under bf16's 1e-2) but a whole element wrong: the per-element bound catches it.
    ref = torch.randn(1000, 1000, dtype=torch.float64)
    out = ref.to(torch.bfloat16)
    testing.assert_close(out, ref, torch.bfloat16)
    out[123, 456] = -out[123, 456]
    assert testing.errors(out, ref)[0] < testing.LIMITS[torch.bfloat16].norm
    with pytest.raises(AssertionError, match="worst element"):
        testing.assert_close(out, ref, torch.bfloat16)


def test_zero_or_unwritten_output_fails():
    x, gamma, beta = torch.randn(2, 3, 4, 8), torch.randn(8), torch.randn(8)

    def zero(*args):
        return torch.zeros_like(grn(*args))

    def unwritten(*args):  # what a kernel that skips a row leaves in its poisoned buffer
        y = grn(*args).clone()
        y[1, 2] = float("nan")
        return y

    for fn, words in ((zero, "output 0"), (unwritten, "NaN pattern")):
        with pytest.raises(AssertionError, match=words):
            testing.check_against_reference(fn, grn_ref.grn, (x, gamma, beta), backend="cpp")


def test_small_gradient_is_held_to_its_own_size():
    # A gradient of 1e-4 halved: 5e-5 off, far under the old bf16 floor (1.6e-2), 50% of its norm.
    want = torch.full((64, 64), 1e-4, dtype=torch.float64) * torch.randn(64, 64, dtype=torch.float64).sign()
    got = (want / 2).to(torch.bfloat16)
    assert _legacy_ok(got, want, torch.bfloat16)
    with pytest.raises(AssertionError, match=r"\|\|ref\|\| = 0.499 \(limit 0.01\)"):
        testing.assert_close(got, want, torch.bfloat16)


def test_wrong_backend_fails():
    # On the CPU auto runs kfe::grn on C++; a test that expects Triton (as a GPU test expects it on CUDA)
    # must fail rather than check another path.
    x, gamma, beta = torch.randn(2, 3, 4, 8), torch.randn(8), torch.randn(8)
    with pytest.raises(AssertionError, match="expected 'triton'"):
        testing.check_against_reference(grn, grn_ref.grn, (x, gamma, beta), grad=(0,), backend="auto", expect="triton")
    testing.check_against_reference(grn, grn_ref.grn, (x, gamma, beta), grad=(0,), backend="auto", expect="cpp")
    with pytest.raises(AssertionError, match="no kfe op ran"):  # a "fast path" that calls no kernel at all
        testing.check_against_reference(lambda *a: grn_ref.grn(*a), grn_ref.grn, (x, gamma, beta), backend="cpp")


def test_auto_on_cuda_must_say_what_it_expects(monkeypatch):
    # No GPU here: only the device check is exercised, with the inputs reported as CUDA tensors.
    monkeypatch.setattr(testing, "_devices", lambda args: {"cuda"})
    x, gamma, beta = torch.randn(2, 3, 4, 8), torch.randn(8), torch.randn(8)
    with pytest.raises(ValueError, match="expect="):
        testing.check_against_reference(grn, grn_ref.grn, (x, gamma, beta), backend="auto")
