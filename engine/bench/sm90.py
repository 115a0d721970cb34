"""Static sm_90 (H100 / H200) report of every KFE Triton kernel, on a machine without a GPU.

    PYTHONPATH=. python -m engine.bench.sm90 [--ops attention,grn] [--dtypes bfloat16] [--out FILE.md] [--check]

Triton compiles to a cubin without a device; only loading and launching need one. This installs a
stand-in Triton driver (for this process only) that reports an H200 (GPUTarget("cuda", 90, 32), 132 SMs,
232448 bytes of opt-in shared memory per block) and launches nothing, tells the config functions of
engine/ops/*/triton.py to pick tiles for that GPU (engine.ops._target.assume_gpu), and then calls each
op's real Triton forward/backward on CPU tensors at the shapes of the GPU benchmarks (`kfe bench`).
Every kernel that launch path compiles is disassembled with the cuobjdump shipped inside Triton's
package: registers, stack (local memory: spilled registers), spill stores/loads (STL/LDL in the SASS),
shared memory, and Hopper matrix instructions (HGMMA = wgmma; HMMA = the older mma.sync).

Limits (--check makes them the exit status): shared memory <= 227 KiB per block on sm_90, and no
spill (stack or STL) in any kernel compiled for 16-bit inputs. It says nothing about speed.
Batch sizes are cut where they only enter the launch grid or the split of a reduction (never a tile).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one sm_90 block may opt into (232448)
SPILL_FREE_DTYPES = ("bfloat16", "float16")  # configs that must not spill
DTYPES = ("bfloat16", "float16", "float32")
OPS = ("attention", "contrastive", "grn", "sparse_conv", "hog")


# ------------------------------------------------------------------------------- the stand-in driver
@dataclass
class Compiled:
    """One kernel binary the launch path built (one Triton specialization)."""

    name: str
    cubin: bytes
    shared: int
    num_warps: int
    num_stages: int
    consts: dict
    cases: list = field(default_factory=list)  # (op, label, dtype) of every case that launched it
    stats: dict = field(default_factory=dict)


class StandInUtils:
    """CudaUtils' surface that compiling and launching touch, answering for an H200."""

    def __init__(self, driver: "StandInDriver"):
        self._driver = driver

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "max_num_regs": 65536, "multiprocessor_count": 132, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}

    def load_binary(self, name, kernel, shared, device):
        src, metadata = self._driver.pending
        consts = {}
        for key, value in getattr(src, "constants", {}).items():
            index = key[0] if isinstance(key, tuple) and len(key) == 1 else None
            if index is not None and src.fn.params[index].is_constexpr:
                consts[src.fn.arg_names[index]] = value
        self._driver.compiled.append(Compiled(name, bytes(kernel), shared, metadata.num_warps,
                                              metadata.num_stages, consts))
        handle = len(self._driver.compiled) - 1
        return handle, handle, 0, 0, 1024  # module, function, registers, spills, max threads per block

    def unload_module(self, module):
        pass

    def set_printf_fifo_size(self, size):
        pass


class StandInDriver:
    """A Triton driver for an H200 that is not there: compiles for sm_90, launches nothing."""

    def __init__(self):
        self.utils = StandInUtils(self)
        self.compiled: list[Compiled] = []
        self.case: tuple = ("", "", "")
        self.pending = None
        self.launches = 0

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return (9, 0)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_interface(self):
        raise RuntimeError("the sm_90 stand-in driver cannot benchmark (no device)")

    def get_benchmarker(self):
        raise RuntimeError("the sm_90 stand-in driver cannot benchmark (no device)")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError("the sm_90 stand-in driver builds no launcher")

    def launcher_cls(self, src, metadata):
        self.pending = (src, metadata)

        def launch(gridX, gridY, gridZ, stream, function, *rest):
            self.launches += 1
            record = self.compiled[function]
            if self.case not in record.cases:
                record.cases.append(self.case)

        return launch


@contextlib.contextmanager
def stand_in_driver():
    """Triton compiles for an H200 and launches nothing inside the block; config functions pick H200 tiles."""
    from triton.runtime.driver import driver

    from engine.ops._target import H200, assume_gpu

    stand_in = StandInDriver()
    previous = driver._active
    driver.set_active(stand_in)
    try:
        with assume_gpu(H200):
            yield stand_in
    finally:
        driver._active = previous


# ------------------------------------------------------------------------------------ the cases
# Each case calls one op's Triton module (forward and backward) as the op's dispatcher does on a GPU.
# Shapes are the GPU benchmark shapes of engine/ops/*/bench.py; dtypes those the benchmarks time
# (bfloat16, and float32 where they do) plus float16 for the ops with tensor-core dots.
@dataclass
class Case:
    op: str
    label: str
    dtype: str
    run: Callable[[], None]


def _randn(*shape, dtype):
    import torch

    return torch.randn(*shape, dtype=torch.float32).to(getattr(torch, dtype))


def attention_cases(dtypes) -> list[Case]:
    import torch

    from engine.ops.attention import bench
    from engine.ops.attention import triton as kernels

    # The bench's shapes (one batch element: B * H only enters the grid) and the table's wider heads.
    shapes = [(label, (H, N, M, D), causal) for label, (_, H, N, M, D), causal in bench.GPU_SHAPES]
    shapes += [(f"head {D}", (16, 4096, 4096, D), False) for D in (96, 128, 256)]
    out = []
    for dtype in dtypes:
        for label, (H, N, M, D), causal in shapes:
            def run(H=H, N=N, M=M, D=D, causal=causal, dtype=dtype):
                q, k, v = (_randn(1, H, L, D, dtype=dtype) for L in (N, M, M))
                o, lse = kernels.forward(q, k, v, causal, D ** -0.5)
                kernels.backward(torch.ones_like(o), q, k, v, o, lse, causal, D ** -0.5)
            out.append(Case("attention", f"{label} N={N} D={D}{' causal' if causal else ''}", dtype, run))
    return out


def contrastive_cases(dtypes) -> list[Case]:
    import torch

    from engine.ops.contrastive import bench
    from engine.ops.contrastive import triton as kernels

    # B enters the grid and the key split only: the bench's widths at B = 4096 and 16384, plus a
    # data-parallel shard (the local rows 2048..4095 of a 2-rank gather take other kernel flags).
    cases = [(B, D, 0, B) for B, D in sorted(set(bench.GPU_SIZES)) if B <= 16384] + [(4096, 512, 2048, 2048)]
    out = []
    for dtype in dtypes:
        for kind in bench.KINDS:
            for B, D, start, rows in cases:
                def run(B=B, D=D, start=start, rows=rows, kind=kind, dtype=dtype):
                    image, text = _randn(B, D, dtype=dtype), _randn(B, D, dtype=dtype)
                    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
                    _, stats = kernels.forward(image, text, scale, bias, kind, start, rows)
                    kernels.backward(torch.tensor(1.0), image, text, scale, bias, stats, kind, start, rows)
                shard = f" rows {start}..{start + rows - 1}" if rows != B else ""
                out.append(Case("contrastive", f"{kind} B={B} D={D}{shard}", dtype, run))
    return out


def grn_cases(dtypes) -> list[Case]:
    import torch

    from engine.ops.grn import bench
    from engine.ops.grn import triton as kernels

    out = []
    for dtype in dtypes:
        for _, H, W, C in bench.GPU_SIZES:
            for masked in (False, True):
                def run(H=H, W=W, C=C, masked=masked, dtype=dtype, N=4):
                    x = _randn(N, H, W, C, dtype=dtype)
                    gamma, beta = torch.zeros(C), torch.zeros(C)
                    mask = torch.rand(N, H, W) < 0.4 if masked else None
                    y = kernels.forward(x, gamma, beta, mask, 1e-6)
                    kernels.backward(torch.ones_like(y), x, gamma, mask, 1e-6)
                out.append(Case("grn", f"N=4 {H}x{W}x{C}{' masked' if masked else ''}", dtype, run))
    return out


def sparse_conv_cases(dtypes) -> list[Case]:
    import torch

    from engine.ops.sparse_conv import bench
    from engine.ops.sparse_conv import triton as kernels
    from engine.sparse import SparseStage

    out = []
    for dtype in dtypes:
        for _, H, W, C in bench.GPU_SIZES:
            def run(H=H, W=W, C=C, dtype=dtype, N=2):
                x = _randn(N, H, W, C, dtype=dtype)
                w, b = _randn(C, 1, 7, 7, dtype=dtype), _randn(C, dtype=dtype)
                mask = bench.fcmae_mask(N, H, W, 0.6)
                y = kernels.forward(x, w, b, mask)  # dense-masked layout
                kernels.backward(torch.ones_like(y), x, w, mask)
                stage = SparseStage.from_mask(mask)  # visible rows only
                feats = _randn(stage.num_rows, C, dtype=dtype)
                y = kernels.rows_forward(feats, stage.neighbours, w, b)
                kernels.rows_backward(torch.ones_like(y), feats, stage.neighbours, w)
            out.append(Case("sparse_conv", f"N=2 {H}x{W}x{C} mask 0.6, dense and rows", dtype, run))
    return out


def hog_cases(dtypes) -> list[Case]:
    from engine.ops.hog import bench
    from engine.ops.hog import triton as kernels

    out = []
    for dtype in dtypes:
        for _, Cin, H, W in bench.GPU_SIZES:
            for window in (0, 16):  # the op's default; MaskFeat's Gaussian-weighted cells
                def run(Cin=Cin, H=H, W=W, window=window, dtype=dtype, B=2):
                    import torch

                    x = _randn(B, Cin, 1, H, W, dtype=dtype)  # the op's canonical (B, C, T, H, W)
                    kernels.hog_op(x, 9, 8, window)
                    kernels.hog_targets_op(x, None, 16, 9, 8, window)
                    kernels.hog_targets_op(x, torch.rand(B, (H // 16) * (W // 16)) < 0.4, 16, 9, 8, window)
                out.append(Case("hog", f"B=2 {Cin}x{H}x{W} window {window}, image and targets", dtype, run))
    return out


CASES = {"attention": attention_cases, "contrastive": contrastive_cases, "grn": grn_cases,
         "sparse_conv": sparse_conv_cases, "hog": hog_cases}
# The dtypes each op's kernels take; float16 only where tensor-core dots make it a different kernel.
OP_DTYPES = {"attention": DTYPES, "contrastive": DTYPES, "grn": ("bfloat16", "float32"),
             "sparse_conv": ("bfloat16", "float32"), "hog": ("bfloat16", "float32")}


# ------------------------------------------------------------------------------------ the analysis
def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise SystemExit(f"{name} not found at {path}: this triton has no NVIDIA tools")
    return path


def analyse(record: Compiled) -> dict:
    """Registers, stack, spill stores/loads, HGMMA/HMMA counts from the cubin (cuobjdump)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(record.cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True)
    usage = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", res.stdout))
    code = sass.stdout
    return {"registers": int(usage.get("REG", -1)), "stack": int(usage.get("STACK", -1)),
            "local": int(usage.get("LOCAL", 0)),
            "spill_stores": len(re.findall(r"\bSTL(\.\S+)?\s", code)),
            "spill_loads": len(re.findall(r"\bLDL(\.\S+)?\s", code)),
            "hgmma": len(re.findall(r"\bHGMMA\.", code)), "hmma": len(re.findall(r"\bHMMA\.", code))}


def problems(record: Compiled) -> list[str]:
    """Why this binary breaks a limit (empty when it does not)."""
    why = []
    if record.shared > SM90_SHARED_LIMIT:
        why.append(f"shared memory {record.shared} B > {SM90_SHARED_LIMIT} B")
    s = record.stats
    if any(dtype in SPILL_FREE_DTYPES for _, _, dtype in record.cases) and (s["stack"] > 0 or s["spill_stores"] > 0):
        why.append(f"16-bit config spills ({s['stack']} B stack, {s['spill_stores']} spill stores)")
    return why


def compile_all(ops, dtypes, progress=print, only: str = "") -> tuple[list[Compiled], int]:
    """Run every case of `ops` under the stand-in driver; (the compiled binaries, the number of cases)."""
    os.environ.pop("TRITON_INTERPRET", None)  # kernels are defined at import: they must be real ones
    import torch
    from triton.runtime.jit import JITFunction

    from engine.ops.attention import triton as probe
    if not isinstance(probe._attn_fwd_kernel, JITFunction):
        raise SystemExit("the kernels were defined under TRITON_INTERPRET=1; run this in a fresh process")
    cases = [case for op in ops for case in CASES[op]([d for d in dtypes if d in OP_DTYPES[op]])
             if only in case.label]
    if not cases:
        raise SystemExit(f"no case of {', '.join(ops)} matches --cases {only!r}")
    with stand_in_driver() as drv, torch.no_grad():
        for i, case in enumerate(cases):
            drv.case = (case.op, case.label, case.dtype)
            before = len(drv.compiled)
            case.run()
            progress(f"[{i + 1}/{len(cases)}] {case.op} {case.dtype} {case.label}: "
                     f"{len(drv.compiled) - before} new binaries")
    for record in drv.compiled:
        record.stats = analyse(record)
    return drv.compiled, len(cases)


# ------------------------------------------------------------------------------------ the report
def _tiles(consts: dict) -> str:
    return " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in consts.items() if k.startswith("BLOCK_") and v)


def _flags(consts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in consts.items()
                    if not k.startswith("BLOCK_") and k not in ("D",) and v not in (None, False, 0))


def render(records: list[Compiled], n_cases: int, command: str) -> str:
    import torch
    import triton

    lines = [
        "# sm_90 static report: every KFE Triton kernel compiled for an H200 without a GPU",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; triton {triton.__version__}, "
        f"torch {torch.__version__}, python {platform.python_version()}",
        "- target: GPUTarget(\"cuda\", 90, 32), 132 SMs, 232448 B shared per block (the stand-in driver of "
        "engine/bench/sm90.py); configs from engine/ops/*/triton.py under `assume_gpu(H200)`",
        "- columns: registers, stack (local memory per thread: spilled registers and local arrays) and spill "
        "stores/loads (STL/LDL in the SASS) from `cuobjdump -res-usage` / `-sass`; shared memory from Triton's "
        "metadata (dynamic); HGMMA = Hopper wgmma, HMMA = mma.sync",
        f"- limits: shared <= {SM90_SHARED_LIMIT} B; no stack or spill store in a kernel launched for "
        f"{'/'.join(SPILL_FREE_DTYPES)} inputs (fp32 is the exact path, its spills are reported, not failed)",
        "",
    ]
    bad = [(r, problems(r)) for r in records if problems(r)]
    names = sorted({r.name for r in records})
    dots16 = sorted({r.name for r in records if r.stats["hgmma"] and any(c[2] in SPILL_FREE_DTYPES for c in r.cases)})
    lines += [
        f"**{len(names)} kernels, {len(records)} binaries from {n_cases} cases; max shared "
        f"{max(r.shared for r in records) / 1024:.0f} KiB; max registers {max(r.stats['registers'] for r in records)}; "
        f"{len(bad)} over a limit.**",
        "",
        f"16-bit kernels with HGMMA: {', '.join(dots16) or 'none'}.",
        "",
    ]
    if bad:
        lines += ["Over a limit:", ""] + [f"- {r.name} {_tiles(r.consts)} ({', '.join(c[2] for c in r.cases[:1])}, "
                                           f"{r.cases[0][1]}): {'; '.join(why)}" for r, why in bad] + [""]
    # One row per distinct result: binaries that differ only in how integer arguments specialize
    # (divisibility by 16, == 1) and compile to the same resources share a row ("bins").
    rows: dict[tuple, list] = {}
    for r in sorted(records, key=lambda r: (OPS.index(r.cases[0][0]), r.name, DTYPES.index(r.cases[0][2]))):
        s = r.stats
        dtypes = "/".join(sorted({c[2] for c in r.cases}, key=DTYPES.index))
        key = (r.cases[0][0], r.name + (" **!**" if problems(r) else ""), dtypes, _tiles(r.consts), _flags(r.consts),
               r.num_warps, r.num_stages, f"{r.shared / 1024:.1f}", s["registers"], s["stack"],
               f"{s['spill_stores']}/{s['spill_loads']}", s["hgmma"], s["hmma"])
        rows.setdefault(key, []).append(r)
    lines += ["| op | kernel | dtypes | tiles | flags | warps | stages | shared KiB | regs | stack B | "
              "spill st/ld | HGMMA | HMMA | bins | cases |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, group in rows.items():
        labels = list(dict.fromkeys(c[1] for r in group for c in r.cases))
        shown = "; ".join(labels[:2]) + (f" (+{len(labels) - 2})" if len(labels) > 2 else "")
        lines.append("| " + " | ".join(str(v) for v in key) + f" | {len(group)} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of " + ", ".join(DTYPES))
    parser.add_argument("--cases", default="", help="only the cases whose label contains this text")
    parser.add_argument("--out", help="write the markdown report here (default: stdout)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a kernel breaks a limit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name, values, allowed in (("--ops", ops, OPS), ("--dtypes", dtypes, DTYPES)):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            parser.error(f"{name} takes {', '.join(allowed)}; got {', '.join(unknown) or 'nothing'}")
    progress = (lambda _: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    records, n_cases = compile_all(ops, dtypes, progress, args.cases)
    command = "PYTHONPATH=. python -m engine.bench.sm90 " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = render(records, n_cases, command.strip())
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(report, end="")
    bad = [r for r in records if problems(r)]
    for r in bad:
        print(f"LIMIT: {r.name} ({r.cases[0][2]}, {r.cases[0][1]}): {'; '.join(problems(r))}", file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
