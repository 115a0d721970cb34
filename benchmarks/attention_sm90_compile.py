"""Compile kfe::attention's Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

    python benchmarks/attention_sm90_compile.py [--dims 64,80] [--dtypes bfloat16] [--padding-only] > OUT.md

Triton compiles to a cubin without a device; ptxas -v then reports registers and spills. This checks
the GPU tile table of engine/ops/attention/triton.py before any GPU is at hand: every kernel compiles
at the tiles `configs` picks, and its shared memory fits the 227 KiB an sm_90 block may use. It says
nothing about speed (that is `kfe bench attention` on the GPU). It ends with the padded-work ratios of
the issue's shapes: MMA work on the padded tiles over the useful work, arithmetic from the tile sizes.
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


# ------------------------------------------------------------------------------ padded work (arithmetic)
ISSUE_SHAPES = [("ViT-B/16 224", 197, 64), ("MAE ViT-L enc", 50, 64), ("MAE decoder", 197, 32),
                ("ViT-H/14", 257, 80), ("DiT-XL/2 256", 256, 72), ("long-seq MAE", 784, 64), ("long", 4096, 64)]


def _before_configs(N: int, M: int, D: int) -> dict:
    """The tiles of git ae320f0 (before the head split): the table row of next_pow2(D), clamped to the
    sequence only, with next_pow2(D) columns."""
    width = max(16, triton.next_power_of_2(D))
    return {name: (min(c.block_m, at._pow2(N, 16, 128)), min(c.block_n, at._pow2(M, 16, 128)))
            for name, c in at._GPU[max(64, width)].items()}, width


def _after_configs(N: int, M: int, D: int) -> dict:
    cfgs = at.configs(N, M, D, torch.bfloat16, torch.device("cuda"))
    return {name: (c.block_m, c.block_n) for name, c in cfgs.items()}, sum(at.head_split(D))


def padded_work(N: int, M: int, D: int, tiles: dict, width: int) -> tuple[float, float]:
    """(forward, backward) MMA work on the padded tiles over the useful work (non-causal; per batch*head).
    Every query block visits every key block: rows and keys round up to their tiles, D to `width`.
    Forward: 2 products (QK^T, PV). Backward: dK/dV runs 4 (QK^T, dV, dP, dK), dQ 3 (QK^T, dP, dQ),
    against FlashAttention-2's useful 5 (2.5x the forward), so the backward is >= 7/5 even unpadded."""
    up = lambda n, b: triton.cdiv(n, b) * b  # noqa: E731
    useful = N * M * D
    fwd = up(N, tiles["fwd"][0]) * up(M, tiles["fwd"][1]) * width * 2
    dkdv = up(N, tiles["dkdv"][0]) * up(M, tiles["dkdv"][1]) * width * 4
    dq = up(N, tiles["dq"][0]) * up(M, tiles["dq"][1]) * width * 3
    return fwd / (2 * useful), (dkdv + dq) / (5 * useful)


def print_padded_work() -> None:
    print("\nPadded MMA work / useful work, bf16 GPU tiles, non-causal. ARITHMETIC from the tile sizes, not a "
          "measurement.\n")
    print("| shape | N | D | before: D cols, fwd tile | before fwd | before bwd | after: D cols, fwd tile | "
          "after fwd | after bwd |")
    print("|---|---:|---:|---|---:|---:|---|---:|---:|")
    for label, N, D in ISSUE_SHAPES:
        row = f"| {label} | {N} | {D} |"
        for tiles, width in (_before_configs(N, N, D), _after_configs(N, N, D)):
            fwd, bwd = padded_work(N, N, D, tiles, width)
            row += f" {width}, {tiles['fwd'][0]} x {tiles['fwd'][1]} | {fwd:.2f} | {bwd:.2f} |"
        print(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="64,72,80,96,128,256", help="head dims, comma-separated")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="bfloat16, float16, float32")
    parser.add_argument("--padding-only", action="store_true", help="only the padded-work table (no compile)")
    args = parser.parse_args()
    if args.padding_only:
        print_padded_work()
        return 0
    dims = [int(d) for d in args.dims.split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    kernels = {"fwd": at._attn_fwd_kernel, "dkdv": at._attn_bwd_dkdv_kernel, "dq": at._attn_bwd_dq_kernel}
    print(f"triton {triton.__version__}, target sm_90; N = M = 4096 tiles; causal = False\n")
    print("| kernel | D | D pieces | dtype | BLOCK_M x BLOCK_N | warps | stages | shared KiB | registers | spill bytes |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|")
    status = 0
    for D in dims:
        for dtype in dtypes:
            cfgs = at.configs(4096, 4096, D, dtype, torch.device("cuda"))
            for name, kernel in kernels.items():
                cfg = cfgs[name]
                consts = dict(**at.head_consts(D), CAUSAL=False, **at._numerics(dtype),
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
                k = _compile(kernel, dtype, consts, cfg.num_warps, cfg.num_stages)
                shared = k.metadata.shared
                status |= shared > SM90_SHARED
                pieces = "+".join(str(w) for w in at.head_split(D) if w)
                print(f"| {name} | {D} | {pieces} | {str(dtype).removeprefix('torch.')} | {cfg.block_m} x {cfg.block_n} | "
                      f"{cfg.num_warps} | {cfg.num_stages} | {shared / 1024:.0f}{' (too big)' if shared > SM90_SHARED else ''} | "
                      f"{_ptxas(k.asm['ptx'], name)} |", flush=True)
    print_padded_work()
    return status


if __name__ == "__main__":
    sys.exit(main())
