"""kfe::hog / kfe::hog_targets: every backend against the float64 reference, exact bins, masks, bad inputs.

How the comparison stays honest: most test images hold values k/256 (k = 0..256), exact in float32,
float16 and bfloat16, so every backend sees the same pixels whatever the input dtype. Every path takes
the Sobel sums in float64, exact for such values and for ordinary fp32 images too (k/255 as ToTensor
gives, mean/std normalised: test_ordinary_fp32_images), so the bins must be the float64 reference's
pixel for pixel; a single flipped pixel moves a whole magnitude to another bin, far outside the fp32
tolerance the outputs are held to (fp32 outputs: magnitudes and sums are the only rounding left).
"""
import math
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

import engine
from engine import testing
from engine.backend import BackendUnavailable
from engine.ops import hog, hog_targets
from engine.ops.hog import plan, reference
from tests.engine.ops import common

BACKENDS = testing.backends("hog")
# The fast paths, compared with the float64 reference (never the reference with itself: the same atan2 on
# both sides would pass any bin rule). The CUDA kernel runs here under tests/csrc/test_cuda_emulated.py.
FAST = testing.fast_backends("hog")
LOWP = (torch.float32, torch.float16, torch.bfloat16)
# (B, C, H, W) images and (B, C, T, H, W) videos; small for the interpreter, incl. non-square and C = 1.
SHAPES = [(2, 3, 16, 16), (1, 3, 32, 48), (1, 1, 16, 32), (1, 3, 2, 16, 32)]
CPP_SHAPES = [(2, 3, 224, 224), (1, 3, 64, 96), (2, 3, 3, 32, 16)]


def quantised(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 257, shape, generator=gen) / 256).to(dtype)


def ordinary(shape, kind, seed=0):
    """fp32 images as a data loader makes them: k/255 (ToTensor), or that mean/std normalised (ImageNet)."""
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)) / 255
    if kind == "normalised":
        view = (1, -1) + (1,) * (len(shape) - 2)
        x = (x - torch.tensor([0.485, 0.456, 0.406][: shape[1]]).view(view)) / torch.tensor(
            [0.229, 0.224, 0.225][: shape[1]]).view(view)
    return x.float()


def token_mask(x, patch=16, seed=0, p=0.5):
    T = x.shape[2] if x.dim() == 5 else 1
    L = T * (x.shape[-2] // patch) * (x.shape[-1] // patch)
    return torch.rand(x.shape[0], L, generator=torch.Generator().manual_seed(seed)) < p


def check(backend, x, kind="targets", expect=None, allow_zero=False, **kw):
    """kind: hog | targets | masked. Outputs are fp32 and the inputs exact: fp32 limits throughout."""
    if kind == "masked":
        kw["mask"] = token_mask(x, kw.get("patch", 16))
    if kind == "hog":
        kw.pop("patch", None)
    fn, ref = (hog, reference.hog) if kind == "hog" else (hog_targets, reference.hog_targets)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    testing.check_against_reference(fn, ref, (x,), kwargs=kw, backend=backend, dtype=dtype, expect=expect,
                                    allow_zero=allow_zero)


def test_backends_present():
    assert {"reference", "cpp", "triton"} <= set(BACKENDS), BACKENDS


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["hog", "targets", "masked"])
def test_matches_reference(backend, dtype, shape, kind):
    if dtype not in testing.supported_dtypes("hog", backend):
        pytest.fail(f"{backend} must support {dtype}")
    check(backend, quantised(shape, dtype), kind)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("image", ["k/255", "normalised"])
@pytest.mark.parametrize("kind", ["hog", "targets", "masked"])
def test_ordinary_fp32_images(backend, image, kind):
    # fp32 rounding of the gradients used to flip the bins of 1-2% of such images' values (errors up to
    # 0.1); every path now takes the gradients in float64 like the reference, and must match it.
    for shape in [(2, 3, 32, 48), (1, 3, 2, 16, 32)]:
        check(backend, ordinary(shape, image), kind)


@pytest.mark.parametrize("image", ["k/255", "normalised"])
def test_cpp_ordinary_fp32_images_real_size(image):
    x = ordinary((2, 3, 224, 224), image, seed=1)
    check("cpp", x, "hog")
    check("cpp", x, "targets", nbins=8)  # exact ties on pi/4, pi/2, 3pi/4 possible


@pytest.mark.parametrize("shape", CPP_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["hog", "targets", "masked"])
def test_cpp_real_sizes(shape, kind):
    check("cpp", quantised(shape), kind)


@pytest.mark.parametrize("backend", [b for b in FAST if torch.float64 in testing.supported_dtypes("hog", b)])
def test_float64(backend):
    x = quantised((1, 3, 16, 32), torch.float64)
    check(backend, x, "hog")
    check(backend, x, "masked", gaussian_window=16)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", ["hog", "masked"])
def test_gaussian_window_and_options(backend, kind):
    x = quantised((1, 2, 16, 32))
    check(backend, x, kind, gaussian_window=16)
    check(backend, x, kind, nbins=6, cell=4, patch=8)


# MaskFeat's 9 bins first, then others (even ones put exact ties on boundaries; 1 bin is trivial);
# cells from 2 to 8 pixels, patches of 1 or 2 cells, up to 6 x 8 tokens.
SHAPE = dict(B=st.integers(1, 2), C=st.integers(1, 3), T=st.sampled_from([0, 2]), h=st.integers(1, 3),
             w=st.integers(1, 4), cell=st.sampled_from([8, 2, 3, 4, 6]), u=st.sampled_from([2, 1]),
             nbins=st.sampled_from([9, 8, 4, 6, 12, 18, 2]), masked=st.booleans(), seed=st.integers(0, 2**16))


def _hypothesis_case(backend, B, C, T, h, w, cell, u, nbins, masked, seed):
    shape = (B, C) + ((T,) if T else ()) + (h * u * cell, w * u * cell)
    x = quantised(shape, seed=seed)
    check(backend, x, "masked" if masked else "targets", patch=u * cell, nbins=nbins, cell=cell)
    check(backend, x, "hog", nbins=nbins, cell=cell)


@common.cheap()
@given(**SHAPE)
def test_hypothesis_shapes_cpp(**case):
    _hypothesis_case("cpp", **case)


@common.interpreted()
@given(**{**SHAPE, "h": st.integers(1, 2), "w": st.integers(1, 3)}, gpu_tiles=st.booleans())  # interpreter time
def test_hypothesis_shapes_triton(gpu_tiles, **case):
    # gpu_tiles: the GPU's 2x2-cell units of kfe::hog (the interpreter takes up to 8x8 cells per program).
    from engine.ops.hog import triton as hog_triton

    with mock.patch.object(hog_triton, "_hog_unit", lambda x, cell: (2, 2)) if gpu_tiles else nullcontext():
        _hypothesis_case("triton", **case)


# --- bins on exact boundaries --------------------------------------------------------------------------
def _edges(kind: str, H=16, W=32) -> torch.Tensor:
    y = torch.arange(H).view(H, 1).expand(H, W)
    x = torch.arange(W).view(1, W).expand(H, W)
    img = {"constant": torch.full((H, W), 77), "vertical": (x >= 13) * 200, "horizontal": (y >= 5) * 150,
           "diagonal": (3 * (x + y)) % 257, "antidiagonal": 96 + 2 * x - 3 * y.clamp(max=0) - 2 * y,
           "checker": ((x // 3 + y // 5) % 2) * 256}[kind]
    return (img.clamp(0, 256) / 256).reshape(1, 1, H, W).repeat(2, 3, 1, 1).float()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", ["constant", "vertical", "horizontal", "diagonal", "antidiagonal", "checker"])
@pytest.mark.parametrize("nbins", [9, 8, 4, 2])
def test_exact_boundaries(backend, kind, nbins):
    # Vertical/horizontal edges lie on theta = 0, pi/2, pi; diagonal ones on pi/4, 3pi/4: boundaries for
    # even nbins, where the reference's floor() puts them in the upper bin and the fast paths must too.
    check(backend, _edges(kind), "hog", nbins=nbins, allow_zero=kind == "constant")


def test_known_bins_of_pure_edges():
    # Independent of the reference code: a vertical edge has gx != 0, gy = 0, phase +-pi/2 -> bin
    # floor(4.5) = 4 of 9 (and -4.5 -> -5 mod 9 = 4); a horizontal edge phase 0 or pi -> bin 0.
    for kind, want in (("vertical", 4), ("horizontal", 0)):
        out = reference.hog(_edges(kind, H=16, W=16))  # (2, 3, 9, 2, 2)
        mass = out.sum(dim=(0, 1, 3, 4))
        assert mass.argmax() == want and (mass > 0).sum() == 1, (kind, mass)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradients_give_zero_histograms_not_nan(backend):
    x = quantised((1, 3, 16, 32))
    x[..., :9, :9] = 0.5  # one constant cell: its pixels' 3x3 neighbourhoods must be constant too, hence 9x9
    with engine.use_backend(backend):
        out = hog(x)
    assert torch.isfinite(out).all()
    assert (out[:, :, :, 0, 0] == 0).all()
    with engine.use_backend(backend):
        assert (hog(torch.full((1, 3, 16, 16), 0.25)) == 0).all()


def _probe_image(pairs, side=64):
    """Image whose probe pixels have exactly the gradients 2 * (X, Y) / 256 for (X, Y) in pairs.

    A probe pixel sees nonzero values only at its left/right (gx = 2 * (left - right)) and top/bottom
    (gy = 2 * (top - bottom)) neighbours; probes sit 4 pixels apart so their neighbourhoods don't touch.
    """
    img = torch.zeros(side, side)
    for n, (gx, gy) in enumerate(pairs):
        y, x = 4 * (n // (side // 4)) + 1, 4 * (n % (side // 4)) + 1
        img[y, x - 1 if gx > 0 else x + 1] = abs(gx) / 256
        img[y - 1 if gy > 0 else y + 1, x] = abs(gy) / 256
    return img.expand(1, 3, side, side).contiguous()


def _closest_to_boundaries(nbins, count, R=256):
    v = torch.arange(-R, R + 1, dtype=torch.float64)
    gx, gy = v.view(-1, 1).expand(-1, v.numel()).reshape(-1), v.repeat(v.numel())
    phase = torch.atan2(gx, gy) / math.pi * nbins
    dist = (phase - phase.round()).abs()
    dist[(gx == 0) & (gy == 0)] = 1
    order = dist.argsort()[:count]
    return list(zip(gx[order].long().tolist(), gy[order].long().tolist()))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("nbins", [9, 8])
def test_gradients_nearest_to_bin_boundaries(backend, nbins):
    # The 256 gradients (of this exact domain) whose phase is nearest a bin boundary, exact ties included.
    pairs = _closest_to_boundaries(nbins, 256)
    check(backend, _probe_image(pairs), "hog", nbins=nbins)


def _convergents(t, qmax):
    """(p, q) continued-fraction convergents of t > 0 with 16 <= q <= qmax: |t - p/q| < 1/q^2."""
    out, (p0, q0, p1, q1), x = [], (0, 1, 1, 0), t
    while True:
        a = math.floor(x)
        p0, q0, p1, q1 = p1, q1, a * p1 + p0, a * q1 + q0
        if q1 > qmax:
            return out
        if q1 >= 16:
            out.append((p1, q1))
        if x == a:
            return out
        x = 1 / (x - a)


@pytest.mark.parametrize("backend", FAST)
def test_gradients_within_float32_error_of_a_boundary(backend):
    # Gradients whose orientation is 1e-5 to 1e-10 rad from a 9-bin boundary: closer than a float32
    # cross product can resolve (~1e-7 |P|), far more than float64 needs (~1e-16). A fast path that
    # tests boundaries in float32 must notice these and decide them in float64 (the C++ near filter).
    pairs = []
    for k in range(1, 9):
        t = math.tan(k * math.pi / 9)  # boundary: gx / gy = tan(theta_k), phase = atan2(gx, gy)
        for p, q in _convergents(abs(t), 2 ** 16):
            gx, gy = (p, q) if t > 0 else (p, -q)
            pairs += [(gx, gy), (-gx, -gy)]
    assert 64 <= len(pairs) <= 256, len(pairs)
    check(backend, _probe_image(pairs), "hog", nbins=9)


# --- layout, masks, video ------------------------------------------------------------------------------
def test_reference_against_pixel_loops():
    # The reference recomputed with scalar loops straight from the text, on a tiny image.
    x = quantised((1, 2, 8, 16), torch.float64)
    nbins, cell = 9, 4
    C, H, W = x.shape[1:]
    want = torch.zeros(1, C, nbins, H // cell, W // cell, dtype=torch.float64)
    p = lambda c, i, j: x[0, c, abs(i) if i < H else 2 * H - 2 - i, abs(j) if j < W else 2 * W - 2 - j].item()
    for c in range(C):
        for i in range(H):
            for j in range(W):
                gx = sum(k * (p(c, i + d, j - 1) - p(c, i + d, j + 1)) for d, k in ((-1, 1), (0, 2), (1, 1)))
                gy = sum(k * (p(c, i - 1, j + d) - p(c, i + 1, j + d)) for d, k in ((-1, 1), (0, 2), (1, 1)))
                b = math.floor(math.atan2(gx, gy) / math.pi * nbins) % nbins
                want[0, c, b, i // cell, j // cell] += math.hypot(gx, gy)
    want = want / want.norm(dim=2, keepdim=True).clamp_min(1e-12)
    testing.assert_close(reference.hog(x, nbins=nbins, cell=cell), want, torch.float64)
    # Token (r, q) of patch 8 = 2x2 cells: D index ((c * nbins + b) * 2 + iy) * 2 + ix.
    tokens = reference.hog_targets(x, patch=8, nbins=nbins, cell=cell)
    assert tokens.shape == (1, 2, C * nbins * 4)
    for q in range(2):
        block = want[0, :, :, 0:2, 2 * q:2 * q + 2]  # (C, nbins, 2, 2)
        testing.assert_close(tokens[0, q], block.reshape(-1), torch.float64)


def test_video_tokens_are_frame_major():
    v = quantised((2, 3, 3, 16, 32), torch.float64)
    per_frame = [reference.hog_targets(v[:, :, t]) for t in range(3)]  # (2, 2, 108) each
    testing.assert_close(reference.hog_targets(v), torch.cat(per_frame, dim=1), torch.float64)
    frames = reference.hog(v)  # (B, T, C, nbins, h, w)
    testing.assert_close(frames[:, 1], reference.hog(v[:, :, 1]), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_packing_order(backend):
    x = quantised((2, 3, 2, 32, 32))  # L = 2 frames * 4 tokens
    mask = torch.zeros(2, 8, dtype=torch.bool)
    picks = [(0, 7), (0, 1), (1, 0), (1, 5), (0, 4)]
    for b, l in picks:
        mask[b, l] = True
    with engine.use_backend(backend):
        full = hog_targets(x)
        packed = hog_targets(x, mask=mask)
        none = hog_targets(x, mask=torch.zeros_like(mask))
        every = hog_targets(x, mask=torch.ones_like(mask))  # one run of tokens across rows and frames
    assert torch.equal(every, full.reshape(-1, 108))
    rows = sorted(picks)  # row-major (b, token) order, whatever order the mask was written in
    assert packed.shape == (len(rows), 108) and none.shape == (0, 108)
    for i, (b, l) in enumerate(rows):
        assert torch.equal(packed[i], full[b, l])


def test_masked_targets_compute_only_masked_tokens():
    x = quantised((2, 3, 32, 48))
    mask = token_mask(x)
    units = plan.token_units(x.unsqueeze(2), mask, 16, 9, 8)
    assert units.count == int(mask.sum()) and units.index.tolist() == mask.reshape(-1).nonzero().reshape(-1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_requires_grad_input_is_detached(backend):
    x = quantised((1, 3, 16, 16)).requires_grad_(True)
    with engine.use_backend(backend):
        out = hog_targets(x)
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_and_empty(backend):
    x = quantised((3, 16, 32, 2)).permute(3, 0, 1, 2)  # (2, 3, 16, 32) channels-last storage
    assert not x.is_contiguous()
    check(backend, x, "targets")
    with engine.use_backend(backend):
        assert hog(torch.rand(0, 3, 16, 16)).shape == (0, 3, 9, 2, 2)
        assert hog_targets(torch.rand(0, 3, 16, 16)).shape == (0, 1, 108)


# --- registration, compile, errors ---------------------------------------------------------------------
def test_opcheck():
    x = quantised((1, 3, 1, 16, 32))
    torch.library.opcheck(torch.ops.kfe.hog.default, (x, 9, 8, 0))
    torch.library.opcheck(torch.ops.kfe.hog_targets.default, (x, None, 16, 9, 8, 0))
    torch.library.opcheck(torch.ops.kfe.hog_targets.default, (x, token_mask(x), 16, 9, 8, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    x = quantised((2, 3, 32, 32))
    mask = token_mask(x)

    def step(images):
        return hog_targets(images).square().mean(), hog(images).sum()

    def masked_step(images, mask):  # MaskFeat: targets of the masked tokens only
        return hog_targets(images, mask=mask).square().mean()

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    for got, want in zip(torch.compile(step, fullgraph=True, backend="aot_eager")(x), step(x)):
        torch.testing.assert_close(got, want)
    # A mask makes the row count data-dependent, as x[mask] does: one graph needs dynamo's flag.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explanation = torch._dynamo.explain(masked_step)(x, mask)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(masked_step, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, mask), masked_step(x, mask))
    video = quantised((1, 3, 2, 16, 32))
    torch.testing.assert_close(torch.compile(hog, fullgraph=True, backend="aot_eager")(video), hog(video))


BAD_INPUTS = [
    ("images not tensor", lambda x, m: hog(x.tolist()), TypeError, ["images"]),
    ("images int", lambda x, m: hog((x * 256).long()), TypeError, ["images", "dtype"]),
    ("images 3-D", lambda x, m: hog(x[0]), ValueError, ["images", "(B, C, H, W)"]),
    ("images no channel", lambda x, m: hog(x[:, :0]), ValueError, ["images", "C >= 1"]),
    ("targets no channel", lambda x, m: hog_targets(x[:, :0]), ValueError, ["images", "C >= 1"]),
    ("H not multiple of cell", lambda x, m: hog(x[..., :12, :]), ValueError, ["cell=8", "H=12"]),
    ("W not multiple of cell", lambda x, m: hog(x, cell=5), ValueError, ["cell=5", "W=32"]),
    ("tiny image", lambda x, m: hog(x[..., :1, :], cell=1), ValueError, ["H=1", ">= 2"]),
    ("nbins zero", lambda x, m: hog(x, nbins=0), ValueError, ["nbins"]),
    ("nbins float", lambda x, m: hog(x, nbins=9.0), TypeError, ["nbins"]),
    ("cell bool", lambda x, m: hog(x, cell=True), TypeError, ["cell"]),
    ("gaussian negative", lambda x, m: hog(x, gaussian_window=-1), ValueError, ["gaussian_window"]),
    ("gaussian not dividing", lambda x, m: hog(x, gaussian_window=12), ValueError, ["gaussian_window=12"]),
    ("patch not multiple of cell", lambda x, m: hog_targets(x, patch=12), ValueError, ["patch", "cell=8"]),
    ("H not multiple of patch", lambda x, m: hog_targets(torch.cat([x, x[..., :8, :]], dim=-2)), ValueError, ["patch=16", "H=24"]),
    ("patch zero", lambda x, m: hog_targets(x, patch=0), ValueError, ["patch"]),
    ("mask shape", lambda x, m: hog_targets(x, mask=m[:, :1]), ValueError, ["mask", "(2, 2)"]),
    ("mask dtype", lambda x, m: hog_targets(x, mask=m.float()), TypeError, ["mask", "bool"]),
    ("mask device", lambda x, m: hog_targets(x, mask=m.to("meta")), ValueError, ["mask", "meta"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_name_the_argument(case):
    _, call, exc, words = case
    x = quantised((2, 3, 16, 32))
    testing.expect_error(exc, lambda: call(x, token_mask(x)), *words)


@pytest.mark.parametrize("kind", ["hog", "masked"])
def test_triton_partial_units(monkeypatch, kind):
    # The GPU's 2x2-cell units of kfe::hog, forced under the interpreter (which otherwise takes up to
    # 8x8 cells per program): odd cell counts leave partial units on the right and bottom.
    from engine.ops.hog import triton as hog_triton

    monkeypatch.setattr(hog_triton, "_hog_unit", lambda x, cell: (2, 2))
    check("triton", quantised((1, 3, 24, 40)), kind, patch=8)           # 3 x 5 cells
    check("triton", quantised((1, 2, 2, 12, 18)), kind, cell=6, patch=6)  # video, 2 x 3 cells
    check("triton", ordinary((1, 3, 24, 40), "k/255"), kind, patch=8)


def test_cuda_size_check_runs_without_cuda():
    # The cuda backend's shared memory per block is bounded: sizes that would not fit must be refused
    # by the check (auto then falls back to triton or the reference) rather than fail at launch.
    from engine.ops.hog import cuda as hog_cuda
    from engine.ops.hog.op import BACKENDS as HOG

    check_fn = HOG.impls["cuda"].check
    x = torch.zeros(1, 3, 1, 16, 16)
    assert check_fn(x, 9, 8) == [] and check_fn(x, 9, 8, 16) == [] and check_fn(x, 9, 8, 64) == []
    for args in [(9, 8, 80), (9, 128), (200, 64)]:
        why = check_fn(x, *args)
        assert why and "shared memory" in why[0], (args, why)
    for nbins, cell, patch in [(9, 8, 16), (9, 8, 64), (9, 8, 80), (9, 128, None), (200, 64, None), (32, 16, 32)]:
        u = patch // cell if patch else max(1, 16 // cell)
        smem = hog_cuda._channels_per_block(3, nbins, cell, u, u)[1]
        assert (smem <= hog_cuda.MAX_SHARED) == (check_fn(x, nbins, cell, patch) == [])


def test_forced_backend_that_cannot_run_explains_why():
    x = quantised((1, 3, 16, 16), torch.float64)
    with engine.use_backend("triton"):
        testing.expect_error(BackendUnavailable, lambda: hog(x), "triton", "float64")
        testing.expect_error(BackendUnavailable, lambda: hog(x.float(), nbins=40), "nbins <= 32")
    with engine.use_backend("cuda"):
        testing.expect_error(BackendUnavailable, lambda: hog(x.float()), "cuda")


# --- GPU (skipped without CUDA) -------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("shape", [(16, 3, 224, 224), (2, 3, 4, 224, 224), (4, 3, 96, 160)], ids=str)
def test_gpu_matches_reference(dtype, shape):
    x = quantised(shape, dtype).cuda()
    for backend in common.gpu_backends("hog"):
        e = common.expect("hog", backend)
        for kind in ("hog", "targets", "masked"):
            check(backend, x, kind, expect=e)
        check(backend, x, "masked", expect=e, gaussian_window=16)


@pytest.mark.gpu
@pytest.mark.parametrize("image", ["k/255", "normalised"])
def test_gpu_ordinary_fp32_images_and_odd_cell_counts(image):
    # 88 x 120: 11 x 15 cells, partial 2x2-cell units in kfe::hog on both edges.
    x = ordinary((4, 3, 88, 120), image).cuda()
    for backend in common.gpu_backends("hog"):
        e = common.expect("hog", backend)
        for kind in ("hog", "targets", "masked"):
            check(backend, x, kind, expect=e, patch=8)
        check(backend, x, "hog", expect=e, nbins=8)


@pytest.mark.gpu
@pytest.mark.parametrize("nbins", [9, 8, 4])
def test_gpu_exact_boundaries(nbins):
    images = [_probe_image(_closest_to_boundaries(nbins, 256))] + [
        _edges(k) for k in ("vertical", "horizontal", "diagonal", "antidiagonal")]
    for backend in common.gpu_backends("hog"):
        for x in images:
            check(backend, x.cuda(), "hog", expect=common.expect("hog", backend), nbins=nbins)


@pytest.mark.gpu
def test_gpu_cuda_runtime_compiled_path(monkeypatch):
    # The NVRTC/CuPy path of the cuda backend, even where engine._C carries the compiled kernel.
    pytest.importorskip("cupy", reason="cupy (cupy-cuda13x) compiles csrc/cuda/hog.cu at run time")
    from engine.ops.hog import cuda as hog_cuda

    monkeypatch.setattr(hog_cuda._ext, "has_op", lambda name: False)
    x = quantised((8, 3, 224, 224), torch.bfloat16).cuda()
    check("cuda", x, "masked")
    check("cuda", x, "hog", gaussian_window=16)
