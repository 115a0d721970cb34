"""The fp32 contrastive backward fits its registers on sm_90 (issue 16): compiled for an H200 without a GPU
by engine.bench.sm90, its binaries have no stack (was 2736-2832 B of spills per thread with 64-wide D chunks)."""
import os
import subprocess
import sys

import pytest
import torch

from engine.ops import _target
from engine.ops.contrastive import triton as con

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
triton = pytest.importorskip("triton")
HAS_TOOLS = os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))


def test_fp32_backward_walks_d_in_32_wide_chunks_on_a_gpu_only():
    cpu = torch.device("cpu")
    a32, a16 = torch.empty(4096, 512), torch.empty(4096, 512, dtype=torch.bfloat16)
    with _target.assume_gpu(_target.H200):
        cfg = con._blocks(4096, 4096, 512, cpu)
        assert con._backward_blocks(cfg, a32)["BLOCK_K"] == 32
        assert con._backward_blocks(cfg, a16) == cfg  # 16-bit: 64-wide chunks, no spill (sm90-static.md)
    interp = con._blocks(4096, 4096, 512, cpu)
    assert con._backward_blocks(interp, a32) == interp  # the interpreter keeps its few large programs


@pytest.mark.slow  # ~40 s: compiles the clip and siglip fp32 kernels for sm_90
@pytest.mark.skipif(not HAS_TOOLS, reason="this triton has no NVIDIA tools (cuobjdump)")
def test_fp32_backward_does_not_spill_on_sm90(tmp_path):
    out = tmp_path / "sm90.md"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "engine.bench.sm90", "--quiet", "--ops", "contrastive", "--dtypes",
                          "float32", "--cases", "B=4096 D=512", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|") for line in out.read_text().splitlines() if "| _bwd_kernel | float32 |" in line]
    assert len(rows) >= 3, out.read_text()  # clip, clip over a group's rows, siglip
    for cells in rows:
        stack, spills = cells[10].strip(), cells[11].strip()
        assert stack == "0" and spills == "0/0", (cells[4], stack, spills)
