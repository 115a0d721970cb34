"""What `auto` picks for each op on the CPU and on CUDA (issue 13, item 7), and why.

The CUDA column is judged without a GPU: pick(..., device="cuda") asks what auto would do if the same
inputs lived on a CUDA device, with the CUDA runtime reported present.
"""
import pytest
import torch

import engine.ops  # noqa: F401  (registers every op)
from engine import _ext, backend
from engine.cli import explain_pick

# op: (auto on CPU, auto on CUDA). CPU: the fastest correct provider measured with `kfe bench --device
# cpu` (attention: torch's own fused CPU attention, forward ~4-8x, backward ~1.5x the reference; the others: engine._C's C++
# kernels). CUDA: the fused kernels (HOG's CUDA C++ kernel where the extension or CuPy has it).
EXPECTED = {
    "attention": ("torch", "triton"),
    "contrastive_loss": ("reference", "triton"),
    "grn": ("cpp", "triton"),
    "grn_rows": ("cpp", "triton"),
    "hog": ("cpp", "cuda"),
    "sparse_dwconv2d": ("cpp", "triton"),
}


def test_every_op_states_its_auto_choice():
    assert set(backend.REGISTRY) == set(EXPECTED)


@pytest.mark.skipif(not _ext.loaded(), reason="engine._C not built: the cpp column needs it")
@pytest.mark.parametrize("op", sorted(EXPECTED))
def test_auto_on_cpu(op):
    table = backend.REGISTRY[op]
    impl, _ = table.pick(*table.example(torch.device("cpu")))
    assert impl.backend == EXPECTED[op][0]


@pytest.mark.parametrize("op", sorted(EXPECTED))
def test_auto_on_cuda(op, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    table = backend.REGISTRY[op]
    if "cuda" in table.impls:  # as where engine._C was built with CUDA or CuPy is installed
        monkeypatch.setattr(table.impls["cuda"], "available", lambda: [])
    impl, _ = table.pick(*table.example(torch.device("cpu")), device="cuda")
    assert impl.backend == EXPECTED[op][1]


def test_torch_attention_backend_covers_what_its_kernel_gets_wrong():
    """aten's CPU flash attention returns NaN for scale <= 0 and dies (SIGFPE) on zero queries; the
    backend maps both onto inputs it gets right. Float64, so any slip shows far above rounding."""
    from engine.ops.attention import reference, sdpa

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64) for n in (5, 7, 7))
    dout = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    for causal, scale in ((True, -0.7), (False, 0.0), (True, 0.3)):
        out, lse = sdpa.forward(q, k, v, causal, scale)
        want_out, want_lse = reference.forward(q, k, v, causal, scale)
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=0)
        torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=0)
        grads = sdpa.backward(dout, q, k, v, out, lse, causal, scale)
        for got, want in zip(grads, reference.backward(dout, q, k, v, want_out, want_lse, causal, scale)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    empty = q[:, :, :0]
    out, lse = sdpa.forward(empty, k, v, False, 0.3)
    assert out.shape == (2, 3, 0, 8) and lse.shape == (2, 3, 0) and lse.dtype == torch.float64
    dq, dk, dv = sdpa.backward(out, empty, k, v, out, lse, False, 0.3)
    assert dq.shape == empty.shape and not dk.any() and not dv.any()


def test_explanation_names_the_choice_and_what_was_passed_over():
    table = backend.REGISTRY["attention"]
    line = explain_pick(table, torch.randn(1, 2, 5, 8))
    assert line.startswith("torch (") and "flash attention" in line and "passed over triton" in line
    assert explain_pick(table, torch.randn(1, 2, 5, 8), device="cuda").startswith("triton")
