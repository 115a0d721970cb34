"""The counting fixture (tests/counting.py) on a kernel whose work is known exactly."""
import pytest
import torch
import triton
import triton.language as tl

from engine.backend import triton_interpreting
from tests.counting import count_triton

pytestmark = pytest.mark.skipif(not triton_interpreting(), reason="counts the Triton interpreter")


@triton.jit
def _matmul(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * N + cols[None, :], mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def test_counts_dots_bytes_padding_and_launches():
    M, N, K = 20, 16, 48  # BM = 16: the second row block is 12/16 padding
    a, b = torch.randn(M, K, dtype=torch.float16), torch.randn(K, N, dtype=torch.float16)
    c = torch.empty(M, N)
    with count_triton() as n:
        _matmul[(2, 1)](a, b, c, M, N, K, BM=16, BN=16, BK=16)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-3, atol=1e-3)
    assert n.launches == 1
    assert n.dot_flops == 2 * 2 * 3 * 16 * 16 * 16  # 2 programs x 3 K steps x (16 x 16 x 16) MACs
    assert n.dots == {("fp16", "fp16", "TF32"): n.dot_flops}
    # a tiles: 2 programs x 3 steps x 256 lanes x 2 B; masked: rows 20..31 of the second program
    # b tiles: same lane count, none masked; c: 2 x 256 lanes x 4 B, rows 20..31 masked
    assert n.load_bytes == 2 * (2 * 3 * 256 * 2)
    assert n.load_masked_bytes == 3 * 12 * 16 * 2
    assert n.store_bytes == 2 * 256 * 4 and n.store_masked_bytes == 12 * 16 * 4


def test_counting_is_undone_after_the_block():
    a, b, c = torch.randn(16, 16), torch.randn(16, 16), torch.empty(16, 16)
    with count_triton() as n:
        pass
    _matmul[(1, 1)](a, b, c, 16, 16, 16, BM=16, BN=16, BK=16)
    assert n.dot_flops == 0 and n.launches == 0
