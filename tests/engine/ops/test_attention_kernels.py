"""kfe::attention beyond the numerics grid: Triton tile choice and launch, the bench suite, GPU sizes."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton

import engine
from engine import testing
from engine.bench import core
from engine.ops import attention
from engine.ops.attention import bench as attn_bench
from engine.ops.attention import reference
from engine.ops.attention import triton as attn_triton
from engine.ops.attention.op import useful_pairs
from engine.ops._target import H200
from tests.engine.ops.common import CUDA_AUTO


def _inputs(B, H, N, M, D, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype) for L in (N, M, M))


def _check(q, k, v, causal, backend="triton", expect=None):
    testing.check_against_reference(lambda q, k, v: attention(q, k, v, causal=causal),
                                    lambda q, k, v: reference.attention(q, k, v, causal), (q, k, v),
                                    grad=(0, 1, 2), backend=backend, expect=expect)


# ------------------------------------------------------------------------------------------ tiles
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_tile_table(monkeypatch, dtype):
    monkeypatch.setattr(attn_triton, "gpu", lambda device: H200)  # the configs an H200 gets
    cuda = torch.device("cuda")
    for D in (1, 32, 64, 72, 80, 96, 128, 160, 256):
        for N, M in [(1, 1), (50, 50), (77, 197), (4096, 4096)]:
            for name, cfg in attn_triton.configs(N, M, D, dtype, cuda).items():
                for block, length in ((cfg.block_m, N), (cfg.block_n, M)):
                    assert block >= 16 and block == triton.next_power_of_2(block), (name, cfg)
                    assert block <= max(16, triton.next_power_of_2(length)), (name, cfg, N, M)
                assert cfg.num_warps in (4, 8) and cfg.num_stages >= 1
    big = attn_triton.configs(4096, 4096, 64, dtype, cuda)["fwd"]
    if dtype == torch.bfloat16:
        assert (big.block_m, big.block_n) == (128, 64)  # FlashAttention-2's tile for D <= 64
    # Lengths just past a multiple of 128 take 64-row tiles (257: 320 rows computed, not 384); lengths
    # that fill their tiles keep 128.
    for N, rows in [(257, 64), (300, 64), (197, 128), (256, 128), (784, 128), (4096, 128)]:
        cfgs = attn_triton.configs(N, N, 80, dtype, cuda)
        if dtype == torch.bfloat16:
            assert cfgs["fwd"].block_m == cfgs["dq"].block_m == cfgs["dkdv"].block_n == rows, (N, cfgs)


def test_head_split_pads_less_than_next_pow2():
    split = {D: attn_triton.head_split(D) for D in (1, 8, 16, 24, 32, 40, 64, 72, 80, 96, 112, 128, 160, 256)}
    assert split == {1: (16, 0), 8: (16, 0), 16: (16, 0), 24: (32, 0), 32: (32, 0), 40: (32, 16), 64: (64, 0),
                     72: (64, 16), 80: (64, 16), 96: (64, 32), 112: (128, 0), 128: (128, 0), 160: (128, 32),
                     256: (256, 0)}
    for D, (d0, d1) in split.items():
        assert d0 + d1 >= D and d0 + d1 <= max(16, triton.next_power_of_2(D))
        c = attn_triton.head_consts(D)
        assert c["MASK_D0"] == (d1 == 0 and d0 != D) and c["MASK_D1"] == (d1 > 0 and d0 + d1 != D)


@pytest.mark.parametrize("D, pieces", [(72, (64, 16)), (64, (64, 0))])
def test_kernels_run_on_the_head_split(monkeypatch, D, pieces):
    # The forward, dK/dV and dQ launches all get the split widths, and the result
    # still matches the reference.
    seen = []
    launch = attn_triton._launch
    monkeypatch.setattr(attn_triton, "_launch", lambda kernel, cfg, grid, *args, **consts: (
        seen.append((kernel, consts["BLOCK_D0"], consts["BLOCK_D1"])), launch(kernel, cfg, grid, *args, **consts)))
    _check(*_inputs(1, 2, 20, 24, D), causal=True)
    assert {k for k, *_ in seen} == {attn_triton._attn_fwd_kernel, attn_triton._attn_bwd_dkdv_kernel,
                                     attn_triton._attn_bwd_dq_kernel}
    assert {tuple(w) for _, *w in seen} == {pieces}


def test_launch_falls_back_to_tiles_that_fit(monkeypatch):
    from triton.runtime.errors import OutOfResources

    tried = []

    class FakeKernel:  # "compiles" only with <= 32-row tiles and one stage, like a GPU short of memory
        def __getitem__(self, grid):
            def run(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **consts):
                tried.append((grid, BLOCK_M, BLOCK_N, num_stages))
                if BLOCK_M > 32 or num_stages > 1:
                    raise OutOfResources(300_000, 232_448, "shared memory")
            return run

    kernel = FakeKernel()
    monkeypatch.setattr(attn_triton, "_fitted", {})
    cfg = attn_triton.Config(128, 64, 4, 3)
    attn_triton._launch(kernel, cfg, lambda c: (triton.cdiv(1000, c.block_m), 1), D=64, PRECISION="tf32")
    assert tried[-1] == ((32, 1), 32, 64, 1)
    n = len(tried)
    attn_triton._launch(kernel, cfg, lambda c: (triton.cdiv(1000, c.block_m), 1), D=64, PRECISION="tf32")
    assert len(tried) == n + 1  # the fitted tile is remembered: no second round of failed compiles
    assert attn_triton.Config(16, 16, 4, 1).smaller() is None


def test_batch_chunks_cover_grid_limit(monkeypatch):
    spans = list(attn_triton._batch_chunks(7000, 16))
    assert all((s.stop - s.start) * 16 <= 65535 for s in spans)
    assert spans[0].start == 0 and spans[-1].stop == 7000
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    # One batch element per launch: every launch sees offset views of the inputs and outputs.
    monkeypatch.setattr(attn_triton, "_batch_chunks", lambda B, H: (slice(b, b + 1) for b in range(B)))
    _check(*_inputs(3, 2, 20, 24, 16), causal=True)


def test_importing_engine_leaves_triton_mode_open():
    # kfe::attention's FLOP formula imports torch.utils.flop_counter, which imports triton; Triton
    # reads TRITON_INTERPRET when a kernel is decorated, so setting it after `import engine` works.
    code = ("import os, sys, engine; assert 'triton' in sys.modules; os.environ['TRITON_INTERPRET'] = '1'\n"
            "from engine.ops.attention import triton as t\n"
            "from triton.runtime.interpreter import InterpretedFunction\n"
            "assert isinstance(t._attn_fwd_kernel, InterpretedFunction), type(t._attn_fwd_kernel)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ------------------------------------------------------------------------------------------ bench
def test_bench_case_counts_useful_flops_and_bytes():
    case = attn_bench.case_for(torch.device("cpu"), (2, 3, 10, 12, 8), True, torch.bfloat16)
    fwd = 4 * 2 * 3 * useful_pairs(10, 12, True) * 8
    assert case.flops == {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}
    row = 2 * 3 * 8 * 2  # bytes of one sequence position over B, H, D in bf16
    assert case.bytes == {"fwd": row * 44, "bwd": row * 88, "fwd+bwd": row * 132}
    assert case.shape == "2x3x10x12x8-causal"
    assert {"reference", "compiled-reference", "sdpa-math", "kfe"} <= set(case.providers)
    q, k, v = case.make_inputs()
    assert q.shape == (2, 3, 10, 8) and k.shape == v.shape == (2, 3, 12, 8) and q.dtype == torch.bfloat16


def test_bench_providers_agree_and_time_every_mode():
    # Every provider against the float64 spec; "kfe" on the Triton path (on the CPU auto is not a fast
    # kfe kernel, and comparing it with the reference provider would compare a path with itself).
    (case,) = attn_bench.cases(torch.device("cpu"), sizes=[(1, 2, 9, 16)])
    inputs = case.make_inputs()
    expected = reference.attention(*(t.double() for t in inputs))
    for name in ("reference", "kfe", *(p for p in case.providers if p.startswith("sdpa-"))):
        with engine.use_backend("triton" if name == "kfe" else "auto"), engine.backend.record_backends() as ran:
            got = case.providers[name](*inputs)
        if name == "kfe":
            testing.assert_ran(ran, "triton", "kfe provider")
        testing.assert_close(got, expected, torch.float32, name=name)
    records = core.run([case], core.MODES, warmup=0, repeats=2, providers=["kfe", "sdpa-math"])
    assert {(r["provider"], r["mode"]) for r in records} == {
        (p, m) for p in ("reference", "kfe", "sdpa-math") for m in core.MODES}
    for r in records:
        assert "error" not in r, r
        assert r["tflops"] > 0 and r["gbs"] > 0


def test_bench_suite_rejects_bad_sizes():
    # The suite's contract: a ValueError that says what sizes it takes and what it got (`kfe bench`
    # turns a ValueError from a suite into `error: ...` and exit status 2; the CLI's own tests cover that).
    for sizes in ([(2, 3, 4)], [(2, 3, 4, 5, 6, 7)]):
        testing.expect_error(ValueError, lambda: attn_bench.cases(torch.device("cpu"), sizes=sizes),
                             "BxHxNxD", "BxHxNxMxD", "x".join(map(str, sizes[0])))


# ------------------------------------------------------------------------------------------ GPU
# The table at a smaller batch (the kernels see the real N, M, D and tiles), plus causal and
# cross-attention cases and the largest head dim.
GPU_SHAPES = [(2, 12, 197, 197, 64, False), (2, 16, 50, 50, 64, False), (2, 16, 197, 197, 32, False),
              (2, 16, 257, 257, 80, False), (2, 16, 256, 256, 72, False), (1, 12, 784, 784, 64, False),
              (1, 2, 4096, 4096, 64, False), (2, 8, 77, 77, 64, True), (2, 4, 300, 1000, 96, True),
              (1, 2, 1000, 300, 128, True), (1, 2, 200, 130, 256, True)]


# bf16 (the training dtype) at every shape; fp32 and fp16 at three (each new (D, dtype, causal) is a
# fresh Triton compile, and the GPU check has a few minutes).
GPU_GRID = ([(s, torch.bfloat16) for s in GPU_SHAPES]
            + [(GPU_SHAPES[i], dt) for i in (0, 3, 8) for dt in (torch.float32, torch.float16)])


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", GPU_GRID, ids=str)
def test_gpu_matches_float64_reference(shape, dtype):
    *dims, causal = shape
    _check(*_inputs(*dims, dtype=dtype, device="cuda"), causal=causal, backend="auto", expect=CUDA_AUTO["attention"])


def _errors(fn, q, k, v, causal, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out = reference.attention(*ref, causal)
    want = torch.autograd.grad(want_out, ref, dout.double())
    return [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (want_out, *want))]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES[:8], ids=str)
def test_gpu_bf16_error_at_most_twice_sdpa(shape):
    # flash-attention's criterion: the kernel's bf16 error against float64 is at most twice the error
    # torch's own bf16 SDPA makes (plus a small floor), for the output and every gradient.
    *dims, causal = shape
    q, k, v = _inputs(*dims, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    with engine.backend.record_backends() as ran:
        ours = _errors(lambda a, b, c: attention(a, b, c, causal=causal), q, k, v, causal, dout)
    testing.assert_ran(ran, CUDA_AUTO["attention"], "auto on CUDA")
    sdpa = _errors(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), q, k, v, causal, dout)
    for name, e, s in zip(("out", "dq", "dk", "dv"), ours, sdpa):
        assert e <= 2 * s + 1e-3, f"{name}: kfe error {e:.3g} vs sdpa {s:.3g}"


@pytest.mark.gpu
def test_gpu_compile_inductor_module():
    # The inductor-compiled bf16 module (forward and backward through kfe::attention on Triton) against
    # the same module in float64 on the reference path: output, input gradient and every parameter's.
    import copy

    layer = engine.nn.Attention(768, 12).cuda().to(torch.bfloat16)
    spec = copy.deepcopy(layer).double()
    x = torch.randn(4, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    with engine.backend.record_backends() as ran:
        out = compiled(x)
        got = torch.autograd.grad(out, [x, *layer.parameters()], dout)
    testing.assert_ran(ran, CUDA_AUTO["attention"], "compiled module on CUDA")
    x64 = x.detach().double().requires_grad_()
    with engine.use_backend("reference"):
        want_out = spec(x64)
        want = torch.autograd.grad(want_out, [x64, *spec.parameters()], dout.double())
    testing.assert_close(out, want_out, torch.bfloat16, name="compiled output")
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, w in zip(names, got, want):
        testing.assert_close(g, w, torch.bfloat16, name=f"compiled d{name}")
