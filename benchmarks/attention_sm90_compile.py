"""Compile kfe::attention's Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

    python benchmarks/attention_sm90_compile.py [--dims 64,80] [--dtypes bfloat16] > OUT.md

Triton compiles to a cubin without a device; ptxas -v then reports registers and spills. This checks
the GPU tile table of engine/ops/attention/triton.py before any GPU is at hand: every kernel compiles
at the tiles `configs` picks, and its shared memory fits the 227 KiB an sm_90 block may use. It says
nothing about speed (that is `kfe bench attention` on the GPU).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not interpreter stand-ins
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from engine.ops.attention import triton as at  # noqa: E402

SM90_SHARED = 232448  # bytes of shared memory one block may opt into on sm_90
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _compile(kernel, dtype, consts: dict, num_warps: int, num_stages: int):
    """What the JIT builds for contiguous (B, 16, 4096, D) tensors: Triton specializes integer
    arguments equal to 1 (the head-dim strides) as constants and marks pointers and integers divisible
    by 16 as such, which is what lets loads vectorize and the loops pipeline."""
    params = list(inspect.signature(kernel.fn).parameters)
    sig, attrs, consts = {}, {}, dict(consts)
    for name in params:
        if name in consts:
            sig[name] = "constexpr"
        elif re.fullmatch(r"s[qkvd]d", name):
            sig[name], consts[name] = "constexpr", 1
        elif name in ("lse_ptr", "delta_ptr"):
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = PTR[dtype]
        elif name in ("qk_scale2", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name] != "constexpr" and sig[name] != "fp32":
            attrs[(params.index(name),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _ptxas(ptx: str, name: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return f"{regs.group(1) if regs else '?'} | {spill.group(1) if spill else '?'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="64,80,128,256", help="head dims, comma-separated")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="bfloat16, float16, float32")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    kernels = {"fwd": at._attn_fwd_kernel, "dkdv": at._attn_bwd_dkdv_kernel, "dq": at._attn_bwd_dq_kernel}
    print(f"triton {triton.__version__}, target sm_90; N = M = 4096 tiles; causal = False\n")
    print("| kernel | D | dtype | BLOCK_M x BLOCK_N | warps | stages | shared KiB | registers | spill bytes |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    status = 0
    for D in dims:
        for dtype in dtypes:
            cfgs = at.configs(4096, 4096, D, dtype, torch.device("cuda"))
            for name, kernel in kernels.items():
                cfg = cfgs[name]
                consts = dict(D=D, PAD_D=at.block_d(D) != D, CAUSAL=False, **at._numerics(dtype),
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=at.block_d(D))
                k = _compile(kernel, dtype, consts, cfg.num_warps, cfg.num_stages)
                shared = k.metadata.shared
                status |= shared > SM90_SHARED
                print(f"| {name} | {D} | {str(dtype).removeprefix('torch.')} | {cfg.block_m} x {cfg.block_n} | "
                      f"{cfg.num_warps} | {cfg.num_stages} | {shared / 1024:.0f}{' (too big)' if shared > SM90_SHARED else ''} | "
                      f"{_ptxas(k.asm['ptx'], name)} |", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
