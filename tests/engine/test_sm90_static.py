"""The sm_90 guard: each Triton kernel's GPU config, compiled for an H200 by the stand-in driver of
engine/bench/sm90.py (no GPU needed), fits sm_90 shared memory and does not spill in 16-bit configs.

It recompiles (never reads benchmarks/results/sm90-static.md) in a fresh process: the kernels must be
defined with TRITON_INTERPRET unset, which this test process (conftest) sets.
"""
import os
import subprocess
import sys

import pytest
import torch

from engine.bench import sm90
from engine.ops import _target

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
triton = pytest.importorskip("triton")
HAS_TOOLS = os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))


def _record(shared=0, stack=0, stores=0, dtype="bfloat16"):
    r = sm90.Compiled("k", b"", shared, 4, 2, {}, cases=[("op", "case", dtype)])
    r.stats = {"registers": 128, "stack": stack, "local": 0, "spill_stores": stores, "spill_loads": stores,
               "hgmma": 0, "hmma": 0}
    return r


def test_limits_rule():
    assert sm90.problems(_record(shared=227 * 1024)) == []
    assert "shared memory" in sm90.problems(_record(shared=227 * 1024 + 1))[0]
    assert "spills" in sm90.problems(_record(stack=16))[0]
    assert "spills" in sm90.problems(_record(stores=1, dtype="float16"))[0]
    assert sm90.problems(_record(stack=1024, stores=8, dtype="float32")) == []  # fp32: reported, not failed
    assert "shared memory" in sm90.problems(_record(shared=300 * 1024, dtype="float32"))[0]


def test_assume_gpu_seam():
    """Config functions answer for the assumed GPU on CPU tensors, and as before without it."""
    from engine.ops.attention import triton as attn
    from engine.ops.contrastive import triton as con
    from engine.ops.grn import triton as grn
    from engine.ops.sparse_conv import triton as sc

    cpu = torch.device("cpu")
    assert _target.gpu(cpu) is None
    interp = attn.configs(4096, 4096, 64, torch.bfloat16, cpu)["fwd"]
    assert (interp.block_m, interp.num_warps) == (256, 1)
    with _target.assume_gpu(_target.H200):
        assert _target.gpu(cpu) == _target.H200
        fwd = attn.configs(4096, 4096, 64, torch.bfloat16, cpu)["fwd"]
        assert (fwd.block_m, fwd.block_n, fwd.num_warps, fwd.num_stages) == (128, 64, 4, 3)
        assert sc._blocks(171, 128, cpu) == (128, 32, 0, 8) and grn._blocks(64, 3136, 512, cpu)[:2] == (32, 128)
        # The split aims at 2 programs per SM: 132 SMs, 64 row blocks x 4 column blocks -> split 2.
        assert con._blocks(4096, 4096, 1024, cpu)["split"] == 2
    assert _target.gpu(cpu) is None
    with pytest.raises(TypeError, match="GpuTarget"):
        with _target.assume_gpu("H200"):
            pass


def _run(*args, timeout=1500):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "engine.bench.sm90", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not HAS_TOOLS, reason="this triton has no NVIDIA tools (cuobjdump)")
def test_sm90_kernels_fit_and_16bit_configs_do_not_spill(tmp_path):
    """Every op's bfloat16 configs at the GPU benchmark shapes (float16 takes the same tiles; the 16-bit
    tiles are the largest), and a sample of float32 (attention's widest head, its own tile table) for
    shared memory. Every binary compiled: a cold Triton cache costs minutes, hence slow."""
    out = tmp_path / "sm90.md"
    run = _run("--check", "--quiet", "--dtypes", "bfloat16", "--out", str(out))
    assert run.returncode == 0, run.stderr[-4000:]
    report = out.read_text()
    for op, name in (("attention", "_attn_fwd_kernel"), ("attention", "_attn_bwd_dkdv_kernel"),
                     ("contrastive", "_fwd_kernel"), ("contrastive", "_bwd_kernel"),
                     ("sparse_conv", "_dwconv_fwd_kernel"), ("sparse_conv", "_dwconv_bwd_kernel"),
                     ("grn", "_grn_reduce_kernel"), ("grn", "_grn_apply_kernel"), ("hog", "_hog_kernel")):
        assert f"| {op} | {name} |" in report, (op, name)
    assert " 0 over a limit" in report
    run = _run("--check", "--quiet", "--ops", "attention", "--dtypes", "float32", "--cases", "head 256",
               "--out", str(out))
    assert run.returncode == 0, run.stderr[-4000:]
