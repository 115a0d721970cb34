"""GRN v2 (issue 16): launches and bytes counted under the Triton interpreter (tests/counting.py).

Budget (engine/ops/grn/triton.py): 2 launches each way; bytes over unmasked lanes within 1.25x of the
two-pass ideal: forward reads x twice and writes y (3 R C elements), backward reads x and dy twice and
writes dx (5 R C elements); with a mask, masked rows are written (zeros) but not read.
"""
import pytest
import torch
import triton

import engine
from engine.backend import triton_interpreting
from engine.ops import grn
from engine.ops.grn import reference
from tests.counting import count_triton

pytestmark = pytest.mark.skipif(not triton_interpreting(), reason="counts the Triton interpreter")


def _moved(c):
    return c.load_bytes - c.load_masked_bytes + c.store_bytes - c.store_masked_bytes


@pytest.mark.parametrize("N, H, W, C, dtype, masked", [
    (2, 16, 16, 128, torch.float32, False),
    (4, 7, 7, 768, torch.bfloat16, False),   # C not a power of two, HW = 49 rows per sample
    (2, 16, 16, 96, torch.bfloat16, True),
])
def test_launches_and_bytes_within_budget(N, H, W, C, dtype, masked):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, W, C, generator=gen).to(dtype).requires_grad_()
    gamma, beta = torch.randn(C, generator=gen).requires_grad_(), torch.randn(C, generator=gen).requires_grad_()
    mask = torch.rand(N, H, W, generator=gen) > 0.4 if masked else None
    dy = torch.randn(N, H, W, C, generator=gen).to(dtype)
    with engine.use_backend("triton"), count_triton() as fwd:
        y = grn(x, gamma, beta, mask=mask)
    with engine.use_backend("triton"), count_triton() as bwd:
        y.backward(dy)
    assert fwd.launches == 2 and bwd.launches == 2, (fwd.launches, bwd.launches)
    elem = x.element_size() * C
    rows, seen = N * H * W, N * H * W if mask is None else int(mask.sum())
    assert _moved(fwd) <= 1.25 * elem * (2 * seen + rows), _moved(fwd) / (elem * (2 * seen + rows))
    assert _moved(bwd) <= 1.25 * elem * (4 * seen + rows), _moved(bwd) / (elem * (4 * seen + rows))
    # still the function: compare with the spec in float64
    want = reference.grn(x.detach().double(), gamma.detach().double(), beta.detach().double(), mask)
    err = (y.detach().double() - want).norm() / want.norm()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2), err


@pytest.mark.parametrize("N, H, W, C, dtype, masked", [
    (2, 8, 8, 40, torch.float32, False),    # ConvNeXt V2 widths that are not powers of two
    (2, 8, 8, 80, torch.bfloat16, False),
    (1, 8, 8, 320, torch.float32, False),
    (2, 12, 12, 320, torch.float32, False),  # HW = 144: a row tail (32-row tiles)
    (2, 16, 16, 160, torch.bfloat16, True),  # a mask
])
def test_gpu_tiles_per_c_leave_no_padded_lanes(N, H, W, C, dtype, masked):
    """With the H200's tiles (assume_gpu): 2 launches each way, moved bytes within 1.25x of the ideal, and
    the per-C channel tile pads no lanes (masked-lane bytes: only the HW tail and the masked rows)."""
    from engine.ops._target import H200, assume_gpu
    from engine.ops.grn.triton import _blocks

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, H, W, C, generator=gen).to(dtype).requires_grad_()
    gamma, beta = torch.randn(C, generator=gen).requires_grad_(), torch.randn(C, generator=gen).requires_grad_()
    mask = torch.rand(N, H, W, generator=gen) > 0.4 if masked else None
    dy = torch.randn(N, H, W, C, generator=gen).to(dtype)
    with assume_gpu(H200):
        block_r, block_c, _, _ = _blocks(N, H * W, C, x.device)
        with engine.use_backend("triton"), count_triton() as fwd:
            y = grn(x, gamma, beta, mask=mask)
        with engine.use_backend("triton"), count_triton() as bwd:
            y.backward(dy)
    assert C % block_c == 0, (C, block_c)
    assert fwd.launches == 2 and bwd.launches == 2
    elem = x.element_size() * C
    rows, seen = N * H * W, N * H * W if mask is None else int(mask.sum())
    assert _moved(fwd) <= 1.25 * elem * (2 * seen + rows), _moved(fwd) / (elem * (2 * seen + rows))
    assert _moved(bwd) <= 1.25 * elem * (4 * seen + rows), _moved(bwd) / (elem * (4 * seen + rows))
    # masked lanes: only rows past HW in the last row block (at most HW/4 of them) and masked rows (read
    # as 0, written as 0); forward: 2 loads + 1 store of x-sized tiles, backward: 4 loads + 1 store
    pad_rows = triton.cdiv(H * W, block_r) * block_r - H * W
    assert pad_rows <= H * W / 4, (H * W, block_r)
    tail, hidden = N * pad_rows * elem, (rows - seen) * elem
    assert fwd.load_masked_bytes + fwd.store_masked_bytes <= 3 * tail + 2 * hidden + 0.02 * _moved(fwd)
    assert bwd.load_masked_bytes + bwd.store_masked_bytes <= 5 * tail + 4 * hidden + 0.02 * _moved(bwd)
    want = reference.grn(x.detach().double(), gamma.detach().double(), beta.detach().double(), mask)
    err = (y.detach().double() - want).norm() / want.norm()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2), err
    xd = x.detach().double().requires_grad_()
    gd, bd = gamma.detach().double().requires_grad_(), beta.detach().double().requires_grad_()
    reference.grn(xd, gd, bd, mask).backward(dy.double())
    for got, ref in ((x.grad, xd.grad), (gamma.grad, gd.grad), (beta.grad, bd.grad)):
        err = (got.double() - ref).norm() / ref.norm()
        assert err <= (1e-5 if dtype == torch.float32 else 1e-2), err
