"""Contrastive v2 (issue 16): counted matrix work, the precision path taken, deterministic split partials.

Counted with tests/counting.py under the Triton interpreter: every tl.dot the forward and backward
execute. Budget (engine/ops/contrastive/triton.py): 2 B^2 D forward + 6 B^2 D backward = 8 B^2 D,
plus tile padding (B rounded up to the row/column tile).
"""
import pytest
import torch
import torch.nn.functional as F

import engine
from engine.backend import triton_interpreting
from engine.ops import contrastive_loss
from engine.ops.contrastive import reference
from engine.ops.contrastive import triton as ct
from tests.counting import count_triton

pytestmark = pytest.mark.skipif(not triton_interpreting(), reason="counts the Triton interpreter")


def _inputs(B, D, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(image + torch.randn(B, D, generator=gen, dtype=torch.float64), dim=-1)
    scale = torch.tensor(20.0, dtype=torch.float64)
    bias = torch.tensor(-6.0, dtype=torch.float64) if kind == "siglip" else None
    return image, text, scale, bias


def _run(image, text, scale, bias, kind, autocast=None):
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale)]
    with engine.use_backend("triton"), count_triton() as fwd:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = contrastive_loss(*leaves, bias, kind=kind)
    with engine.use_backend("triton"), count_triton() as bwd:
        loss.backward()
    return loss.detach(), [t.grad for t in leaves], fwd, bwd


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def _want(image, text, scale, bias, kind):
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale)]
    loss = reference.contrastive_loss(*leaves, bias, kind)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("D", [256, 512, 768, 1024])
def test_counted_matrix_work_within_8_B2_D(kind, D):
    B = 128
    image, text, scale, bias = _inputs(B, D, kind)
    _, _, fwd, bwd = _run(image.float(), text.float(), scale.float(), None if bias is None else bias.float(), kind)
    assert fwd.launches == 1 and bwd.launches == 1, (fwd.launches, bwd.launches)
    assert fwd.dot_flops <= 2 * B * B * D, fwd.dot_flops / (B * B * D)
    assert fwd.dot_flops + bwd.dot_flops <= 8 * B * B * D, (fwd.dot_flops + bwd.dot_flops) / (B * B * D)


def test_counted_work_with_tile_padding():
    B, D, kind = 200, 256, "clip"  # 128-row tiles: 200 rows pad to 256
    image, text, scale, _ = _inputs(B, D, kind)
    _, _, fwd, bwd = _run(image.float(), text.float(), scale.float(), None, kind)
    Bp = 256
    assert fwd.dot_flops + bwd.dot_flops <= 8 * Bp * Bp * D
    assert fwd.load_masked_bytes > 0  # the padding shows in the byte counts


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_autocast_runs_16_bit_dots(kind, dtype, name):
    # fp32 embeddings under autocast (what F.normalize gives a CLIP model): the dots take the autocast
    # dtype, as torch.matmul would; the interpreter computes them exactly, so only the counter shows it.
    image, text, scale, bias = _inputs(96, 64, kind)
    f32 = [image.float(), text.float(), scale.float(), None if bias is None else bias.float()]
    loss, grads, fwd, bwd = _run(*f32, kind, autocast=dtype)
    assert fwd.dot_dtypes() == {(name, name)} and bwd.dot_dtypes() == {(name, name)}, (fwd.dots, bwd.dots)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    want_loss, want_grads = _want(image, text, scale, bias, kind)
    assert _rel(loss, want_loss) <= 1e-2
    for got, want in zip(grads, want_grads):
        assert _rel(got, want) <= 1e-2


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fp32_exact_outside_autocast_and_tf32_when_allowed(kind):
    image, text, scale, bias = _inputs(96, 64, kind)
    f32 = [image.float(), text.float(), scale.float(), None if bias is None else bias.float()]
    assert torch.get_float32_matmul_precision() == "highest"
    loss, grads, fwd, bwd = _run(*f32, kind)
    assert (fwd.dots | bwd.dots).keys() == {("fp32", "fp32", "IEEE")}
    want_loss, want_grads = _want(image, text, scale, bias, kind)
    assert _rel(loss, want_loss) <= 1e-5
    for got, want in zip(grads, want_grads):
        assert _rel(got, want) <= 1e-5
    try:
        torch.set_float32_matmul_precision("high")
        _, _, fwd, bwd = _run(*f32, kind)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert (fwd.dots | bwd.dots).keys() == {("fp32", "fp32", "TF32")}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_split_partials_match_reference_and_are_bitwise_reproducible(monkeypatch, kind):
    # The GPU layout: several row groups (dT partials) x key splits (dI partials), partial tiles.
    monkeypatch.setattr(ct, "_blocks", lambda NA, NK, D, device: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16,
                                                                      BLOCK_D=16, split=2))
    monkeypatch.setattr(ct, "_row_groups", lambda row_blocks, NK, D, device: 2)
    image, text, scale, bias = _inputs(45, 40, kind)
    f32 = [image.float(), text.float(), scale.float(), None if bias is None else bias.float()]
    loss, grads, _, bwd = _run(*f32, kind)
    assert bwd.launches == 1
    want_loss, want_grads = _want(image, text, scale, bias, kind)
    assert _rel(loss, want_loss) <= 1e-5
    for got, want in zip(grads, want_grads):
        assert _rel(got, want) <= 1e-5
    loss2, grads2, _, _ = _run(*f32, kind)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_autocast_cast_traces_without_graph_breaks():
    image, text, scale, _ = _inputs(32, 16, "clip")
    image, text, scale = image.float().requires_grad_(), text.float(), scale.float()

    def step(image, text, scale):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return contrastive_loss(image, text, scale)

    with engine.use_backend("triton"):
        eager = step(image, text, scale)
        with count_triton() as counted:
            compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(image, text, scale)
    assert counted.dot_dtypes() == {("bf16", "bf16")}
    assert torch.equal(compiled, eager)
