"""Counted work: what the Triton kernels execute (matrix FLOPs, bytes, launches), next to the ideal.

Two layers:

1. `count_triton()` wraps the Triton interpreter's builder (TRITON_INTERPRET=1: the object every `tl.*`
   call lowers to) for the duration of a `with` block and records
   - every `tl.dot`: matrix FLOPs 2*M*N*K (batch dims multiplied in), its operand dtypes and its input
     precision (the interpreter computes bf16 dots through fp32, so numerics alone cannot show which
     dtype a kernel fed its dots: the recorded dtypes can);
   - every load and store: bytes over the full tile (lanes x element size), and apart from that the
     bytes of the masked-out lanes, so tile padding shows instead of hiding in the total;
   - launches (one `set_grid_dim` per Triton launch; torch ops between launches are not counted).
   The tests' budgets (tests/counting.py re-exports this) and `kfe bench` both use it.

2. `kfe bench` rows. Counting needs the interpreter, and triton.jit picks interpreter or compiler when a
   kernel is decorated, so `counted_work` runs `python -m engine.bench.counting` in a child process with
   TRITON_INTERPRET=1 and no GPU. The child rebuilds each row's case from the suite at a count shape,
   runs the KFE providers ("kfe", "kfe-*") on the Triton backend with the H200's tiles
   (`assume_gpu(H200)`: the configs a GPU would launch, not the interpreter's few large programs) in
   each mode, and returns the counts with the case's ideal (Case.flops / Case.bytes) at that shape.

   Count shape and scaling law: a suite may define `count_size(size) -> size` (contrastive caps B at
   512); otherwise the batch (first) dimension is cut to 1 (GRN, sparse conv, attention, HOG: their
   work is per sample). Counted FLOPs and bytes are then scaled to the row's shape by the suite's
   `count_scale(size, count_size) -> {"flops": f, "bytes": b}` (contrastive: (B / B_count)^2 for both,
   the score tiles' work), else by the ratio of the ideals of each quantity (work that is linear in
   the batch); launches are not scaled. tests/engine/bench/test_counting_bench.py checks the laws
   against a direct count at the row shape. `moved` bytes = bytes over unmasked
   lanes (what a GPU transfers); masked lanes are reported apart.

On a GPU, the timed row's p50 turns the scaled counts into achieved rates: executed matrix FLOP/s as %
of the measured matmul rate and moved bytes/s as % of the measured copy bandwidth (engine/bench/machine.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from typing import Sequence

import numpy as np

COUNT_TIMEOUT_S = 600  # the child process's whole budget; rows it did not reach say so


@dataclasses.dataclass
class Counts:
    dot_flops: int = 0
    dots: Counter = dataclasses.field(default_factory=Counter)  # (a dtype, b dtype, precision) -> flops
    load_bytes: int = 0
    load_masked_bytes: int = 0   # part of load_bytes whose lanes were masked off
    store_bytes: int = 0
    store_masked_bytes: int = 0
    launches: int = 0

    def dot_dtypes(self) -> set:
        return {(a, b) for a, b, _ in self.dots}

    def precisions(self) -> set:
        return {p for _, _, p in self.dots}

    @property
    def moved_bytes(self) -> int:
        """Bytes over unmasked lanes: what a GPU would transfer."""
        return self.load_bytes - self.load_masked_bytes + self.store_bytes - self.store_masked_bytes

    @property
    def masked_bytes(self) -> int:
        return self.load_masked_bytes + self.store_masked_bytes


def _elsize(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def count_triton():
    """Count the Triton kernels launched inside the block (needs TRITON_INTERPRET=1)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    counts = Counts()
    cls = type(builder)  # looked up per call: engine.ops._interpret may patch the class meanwhile

    def counted_dot(a, b, d, input_precision, max_num_imprecise_acc):
        *batch, m, k = a.data.shape
        n = b.data.shape[-1]
        flops = 2 * int(np.prod(batch, dtype=np.int64)) * m * n * k
        counts.dot_flops += flops
        precision = getattr(input_precision, "name", str(input_precision))
        counts.dots[(str(a.dtype), str(b.dtype), precision)] += flops
        return cls.create_dot(builder, a, b, d, input_precision, max_num_imprecise_acc)

    def counted_load(ptrs, mask, other, *args):
        size = _elsize(ptrs)
        counts.load_bytes += ptrs.data.size * size
        counts.load_masked_bytes += int((~np.broadcast_to(mask.data, ptrs.data.shape)).sum()) * size
        return cls.create_masked_load(builder, ptrs, mask, other, *args)

    def counted_store(ptrs, value, mask, *args):
        size = _elsize(ptrs)
        counts.store_bytes += ptrs.data.size * size
        counts.store_masked_bytes += int((~np.broadcast_to(mask.data, ptrs.data.shape)).sum()) * size
        return cls.create_masked_store(builder, ptrs, value, mask, *args)

    def counted_grid(*args, **kwargs):
        counts.launches += 1
        return cls.set_grid_dim(builder, *args, **kwargs)

    builder.create_dot, builder.create_masked_load = counted_dot, counted_load
    builder.create_masked_store, builder.set_grid_dim = counted_store, counted_grid
    try:
        yield counts
    finally:  # instance attributes shadow the class methods; deleting them restores the originals
        for name in ("create_dot", "create_masked_load", "create_masked_store", "set_grid_dim"):
            builder.__dict__.pop(name, None)


# ---------------------------------------------------------------------------------------------------
# kfe bench rows


_SIZE = re.compile(r"^(\d+(?:x\d+)*)(.*)$")


def split_label(label: str) -> tuple[tuple[int, ...], str] | None:
    """A case label "8x56x56x512 mask 0.60" -> ((8, 56, 56, 512), " mask 0.60"); None without a size."""
    m = _SIZE.match(label)
    return (tuple(int(v) for v in m.group(1).split("x")), m.group(2)) if m else None


def count_size_of(suite, size: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a row is counted at: the suite's `count_size`, else the batch (first dim) cut to 1."""
    fn = getattr(suite, "count_size", None)
    return tuple(fn(size)) if fn else (1, *size[1:])


def counted_providers(case) -> list[str]:
    """The KFE providers whose Triton work is counted: "kfe" and "kfe-*" (not "kfe[backend]")."""
    return [n for n in case.providers if n == "kfe" or n.startswith("kfe-")]


def count_case(case, modes: Sequence[str]) -> list[dict]:
    """Count every KFE provider of `case` in every mode, in this (interpreting) process, with the tiles
    the H200 would get. One dict per (provider, mode): counts, or an error."""
    from engine.backend import use_backend
    from engine.bench.core import step_of
    from engine.ops._target import H200, assume_gpu

    out = []
    for name in counted_providers(case):
        for mode in modes:
            rec = {"provider": name, "mode": mode, "ideal_flops": case.flops.get(mode),
                   "ideal_bytes": case.bytes.get(mode)}
            try:
                with use_backend("triton"), assume_gpu(H200):
                    step = step_of(case, case.providers[name], mode)  # bwd: the forward runs here, uncounted
                    with count_triton() as c:
                        step()
            except Exception as err:  # noqa: BLE001 - a provider that fails to count is reported, not fatal
                out.append({**rec, "error": repr(err)[:200]})
                continue
            out.append({**rec, "flops": c.dot_flops, "moved_bytes": c.moved_bytes, "masked_bytes": c.masked_bytes,
                        "launches": c.launches, "dots": sorted({f"{a}x{b}:{p}" for a, b, p in c.dots})})
    return out


def _child(suite_name: str, requests: list[dict], modes: Sequence[str]) -> None:
    """Child process: count each request {size, dtype, op, suffix} and print one JSON line per result."""
    import torch

    suite = importlib.import_module(suite_name)
    cpu = torch.device("cpu")
    built: dict = {}
    for i, req in enumerate(requests):
        key = (tuple(req["size"]), req["dtype"])
        if key not in built:
            try:
                built[key] = suite.cases(cpu, [key[0]], [getattr(torch, key[1])])
            except Exception as err:  # noqa: BLE001 - e.g. a size the suite rejects
                built[key] = repr(err)[:200]
        cases = built[key]
        if isinstance(cases, str):
            print(json.dumps({"index": i, "error": cases}), flush=True)
            continue
        match = [c for c in cases if c.op == req["op"] and (split_label(c.shape) or ((), c.shape))[1] == req["suffix"]]
        if not match:
            print(json.dumps({"index": i, "error": "no case of this kind at the count shape"}), flush=True)
            continue
        for rec in count_case(match[0], modes):
            print(json.dumps({"index": i, **rec}), flush=True)


def _scale(value, row_ideal, count_ideal):
    if value is None or not row_ideal or not count_ideal:
        return None
    return value * row_ideal / count_ideal


class CountJob:
    """Counts the cases' KFE providers in child processes (see the module docstring), one per suite,
    started at construction; `result()` waits and returns {(op, shape, dtype, provider, mode): entry}
    whose entries carry the row-scaled `flops` / `moved_bytes`, the row's ideals, the count shape and
    the measured ratios. Never raises: a failure becomes an entry with "error"."""

    def __init__(self, cases: Sequence, modes: Sequence[str], timeout: float = COUNT_TIMEOUT_S):
        self.modes, self.timeout = list(modes), timeout
        self.requests, self.owners, self.laws, self.procs = [], [], [], []
        by_suite: dict[str, list[int]] = {}
        for case in cases:
            parsed = split_label(case.shape)
            if (not counted_providers(case) or not getattr(case, "suite", "").startswith("engine.ops.")
                    or parsed is None):  # op suites only: a model's "kfe" provider is a whole network
                continue
            size, suffix = parsed
            suite = importlib.import_module(case.suite)
            dtype = str(case.dtype).removeprefix("torch.")
            by_suite.setdefault(case.suite, []).append(len(self.requests))
            small = count_size_of(suite, size)
            self.requests.append({"size": list(small), "dtype": dtype, "op": case.op, "suffix": suffix})
            self.owners.append(case)
            law = getattr(suite, "count_scale", None)
            self.laws.append(law(size, small) if law else None)
        env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        env.pop("KFE_BACKEND", None)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        for suite_name, idx in by_suite.items():
            child = "import sys; from engine.bench.counting import main; sys.exit(main(sys.argv[1:]))"
            cmd = [sys.executable, "-c", child,
                   "--suite", suite_name, "--modes",
                   ",".join(self.modes), "--requests", json.dumps([self.requests[i] for i in idx])]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.procs.append((proc, idx))

    def _keys(self, j: int):
        case = self.owners[j]
        head = (case.op, case.shape, str(case.dtype).removeprefix("torch."))
        return [head + (name, mode) for name in counted_providers(case) for mode in self.modes]

    def result(self, timeout: float | None = None) -> dict:
        """Wait (at most `timeout` s in all, default the job's) and collect; rows not counted by then
        say so."""
        import time

        result: dict = {}
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        for proc, idx in self.procs:
            failure = None
            try:
                out, err = proc.communicate(timeout=max(0.1, end - time.monotonic()))
                if proc.returncode:
                    failure = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                failure = "counting ran out of time"
            for line in out.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                j = idx[rec.pop("index")]
                case, size = self.owners[j], self.requests[j]["size"]
                if "provider" not in rec:  # the request failed as a whole: every provider and mode
                    for key in self._keys(j):
                        result[key] = {"error": rec["error"], "count_shape": "x".join(map(str, size))}
                    continue
                key = (case.op, case.shape, str(case.dtype).removeprefix("torch."), rec["provider"], rec["mode"])
                result[key] = _row_entry(rec, case, size, self.laws[j])
            for j in idx:  # rows the child never reached
                for key in self._keys(j):
                    result.setdefault(key, {"error": failure or "not counted",
                                            "count_shape": "x".join(map(str, self.requests[j]["size"]))})
        return result


def _row_entry(rec: dict, case, count_shape, law) -> dict:
    """The row's entry: counts at the count shape, scaled by the suite's `count_scale` law when it has one,
    else by the ratio of the ideals (row / count shape) of each quantity."""
    mode = rec["mode"]
    entry = {"count_shape": "x".join(map(str, count_shape)), "ideal_flops": case.flops.get(mode),
             "ideal_bytes": case.bytes.get(mode)}
    if "error" in rec:
        return {**entry, "error": rec["error"]}
    if law is not None:
        f_scale, b_scale = law["flops"], law["bytes"]
    else:
        f_scale = _scale(1.0, case.flops.get(mode), rec["ideal_flops"])
        b_scale = _scale(1.0, case.bytes.get(mode), rec["ideal_bytes"])
    flops = 0 if rec["flops"] == 0 else None if f_scale is None else rec["flops"] * f_scale
    moved = None if b_scale is None else rec["moved_bytes"] * b_scale
    masked = None if b_scale is None else rec["masked_bytes"] * b_scale
    entry.update(flops=flops, moved_bytes=moved, masked_bytes=masked, launches=rec["launches"], dots=rec["dots"],
                 counted_flops=rec["flops"], counted_moved_bytes=rec["moved_bytes"])
    if flops and case.flops.get(mode):  # no dots (GRN, depthwise conv, HOG): their FLOPs are not matrix work
        entry["flops_vs_ideal"] = flops / case.flops[mode]
    if moved is not None and case.bytes.get(mode):
        entry["bytes_vs_ideal"] = moved / case.bytes[mode]
    return entry


def attach(records: list[dict], counts: dict, bandwidth: float | None = None, matmul_rate: float | None = None) -> None:
    """Put each record's counted entry under rec["counted"]; with a time (a GPU row) also the achieved
    executed FLOP/s and moved bytes/s as % of the measured ceilings."""
    for rec in records:
        entry = counts.get((rec["op"], rec["shape"], rec["dtype"], rec["provider"], rec["mode"]))
        if entry is None:
            continue
        entry = dict(entry)
        if "ms" in rec and "error" not in entry and rec.get("device_type") == "cuda":
            seconds = rec["ms"]["p50"] * 1e-3
            if entry.get("flops") and matmul_rate:
                entry["pct_matmul_executed"] = 100 * entry["flops"] / seconds / matmul_rate
            if entry.get("moved_bytes") and bandwidth:
                entry["pct_bandwidth_moved"] = 100 * entry["moved_bytes"] / seconds / bandwidth
        rec["counted"] = entry


def _num(v, unit: str = "") -> str:
    if v is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}{unit}"
    return f"{v:.3g}{unit}"


def markdown(records: list[dict]) -> str:
    """The counted-work table of the records that carry one."""
    rows = [r for r in records if "counted" in r]
    if not rows:
        return ""
    lines = ["counted work (Triton kernels under the interpreter with the H200's tiles, at the count shape, "
             "scaled to the row by the ideal's ratio; engine/bench/counting.py): executed matrix FLOPs and moved "
             "bytes (unmasked lanes; masked lanes apart) vs the ideal, launches; on a GPU the achieved % of the "
             "measured matmul rate / copy bandwidth", "",
             "| op | shape | dtype | mode | provider | count shape | matrix FLOPs | ideal | x ideal | bytes moved | "
             "ideal | x ideal | masked | launches | % MM exec | % BW moved |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["counted"]
        head = f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | {c.get('count_shape')} | "
        if "error" in c:
            lines.append(head + f"not counted: {c['error'][:80]} |||||||||")
            continue
        ratio = lambda k: "-" if k not in c else f"{c[k]:.2f}"  # noqa: E731
        pct = lambda k: "" if k not in c else f"{c[k]:.0f}"  # noqa: E731
        lines.append(head + f"{_num(c['flops'])} | {_num(c['ideal_flops'])} | {ratio('flops_vs_ideal')} | "
                     f"{_num(c['moved_bytes'], 'B')} | {_num(c['ideal_bytes'], 'B')} | {ratio('bytes_vs_ideal')} | "
                     f"{_num(c['masked_bytes'], 'B')} | {c['launches']} | {pct('pct_matmul_executed')} | "
                     f"{pct('pct_bandwidth_moved')} |")
    return "\n".join(lines)


# Set by `kfe bench` (engine/cli.py): whether engine.bench.run counts, and the suite module of cases
# built by suites that run themselves (their cases carry no suite name).
_state = {"enabled": False, "suite": ""}


def configure(enabled: bool | None = None, suite: str | None = None) -> None:
    if enabled is not None:
        _state["enabled"] = enabled
    if suite is not None:
        _state["suite"] = suite


def enabled() -> bool:
    return _state["enabled"]


def current_suite() -> str:
    return _state["suite"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Count the KFE Triton kernels of a bench suite's cases "
                                            "(run by `kfe bench` with TRITON_INTERPRET=1; one JSON line per result)")
    p.add_argument("--suite", required=True, help="suite module, e.g. engine.ops.grn.bench")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--requests", required=True, help="JSON list of {size, dtype, op, suffix}")
    args = p.parse_args(argv)
    from engine.backend import triton_interpreting

    if not triton_interpreting():
        raise SystemExit("engine.bench.counting: set TRITON_INTERPRET=1 (counting runs the Triton interpreter)")
    _child(args.suite, json.loads(args.requests), args.modes.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
