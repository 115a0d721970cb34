"""GRN v2 (issue 16): launches and bytes counted under the Triton interpreter (tests/counting.py).

Budget (engine/ops/grn/triton.py): 2 launches each way; bytes over unmasked lanes within 1.25x of the
two-pass ideal: forward reads x twice and writes y (3 R C elements), backward reads x and dy twice and
writes dx (5 R C elements); with a mask, masked rows are written (zeros) but not read.
"""
import pytest
import torch

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
