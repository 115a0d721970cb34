"""Timing one callable: warm-up, then quantiles over repeats.

On the CPU: wall time per call (perf_counter). On a GPU, what triton.testing.do_bench does and more:
  - every timed call is preceded by a write of a buffer larger than the L2 cache (the flush), so no call
    finds its inputs in L2 left there by the one before (an H200 has ~60 MB of it);
  - the calls rotate over several input sets that together fill twice the L2 (`rotation_sets`);
  - start/end CUDA events around each call, read after one synchronise at the end; median of at least
    GPU_MIN_REPEATS calls after the warm-up (which covers compilation and autotuning), fewer only for
    rows whose 50 calls would exceed ROW_BUDGET_S (`repeats` in the result says how many);
  - the same step captured once in a CUDA graph and replayed the same way: its median is the GPU time
    without host launch gaps, and `launch_ms` = eager median - graph median is the launch overhead
    (it matters where an op launches several kernels: attention's backward, the sparse block), for
    calls under GRAPH_MAX_MS (KFE_BENCH_GRAPHS=0 turns the capture off).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable, Sequence

import torch

GPU_MIN_REPEATS = 50
DEFAULT_L2_BYTES = 64 << 20  # when the device does not say (an H200 has 60 MiB, an H100 50 MiB)
MAX_SETS = 8
WARMUP_BUDGET_S = 0.5  # warm-up calls after the first ones, at most this long
ROW_BUDGET_S = 2.0  # timed calls of one row at most this long (slow rows get fewer than 50 calls)
MIN_SLOW_REPEATS = 10
GRAPH_MAX_MS = 20.0  # launch overhead is measured where it can matter: calls shorter than this


def _quantiles(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    if len(ms) == 1:
        return {"p20": ms[0], "p50": ms[0], "p80": ms[0]}
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return {"p20": q[1], "p50": statistics.median(ms), "p80": q[7]}


def input_bytes(inputs: Sequence) -> int:
    """Bytes held by the tensors among one call's inputs."""
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES


def rotation_sets(set_bytes: int, cache_bytes: int, free_bytes: int, max_sets: int = MAX_SETS) -> int:
    """How many input sets to rotate over: enough to fill twice the cache (so a call never finds the
    inputs of the previous calls there), at most max_sets, within a quarter of the free memory, >= 1."""
    if cache_bytes <= 0 or set_bytes <= 0:
        return 1
    want = math.ceil(2 * cache_bytes / set_bytes)
    fits = free_bytes // (4 * set_bytes)
    return max(1, min(want, max_sets, fits))


def time_fn(fn: Callable[[], object] | Sequence[Callable[[], object]], device: torch.device, warmup: int,
            repeats: int, graph: bool = False) -> dict[str, float]:
    """Milliseconds per call: p20, p50 (median), p80, over repeats after warm-up. `fn` may be a list of
    steps over different input sets, called in rotation. On a GPU (see the module docstring): at least
    GPU_MIN_REPEATS calls, L2 flushed before each; with graph=True also `graph_ms` (median replay of a
    CUDA graph of one call) and `launch_ms`, or `graph_error` when the step cannot be captured."""
    steps = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    if device.type == "cuda":
        return _time_cuda(steps, device, warmup, repeats, graph)
    for i in range(warmup):  # the CPU: wall time of each call
        steps[i % len(steps)]()
    ms = []
    for i in range(repeats):
        t0 = time.perf_counter()
        steps[i % len(steps)]()
        ms.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(ms)


def _time_cuda(steps: list[Callable[[], object]], device: torch.device, warmup: int, repeats: int,
               graph: bool) -> dict[str, float]:
    flush = torch.empty(max(l2_bytes(device), DEFAULT_L2_BYTES) * 2 // 4, dtype=torch.int32, device=device)
    for step in steps:  # first calls: compilation, autotuning, allocator growth
        step()
    est_ms = statistics.median(_cuda_event_ms(steps, 3, flush, device))
    for i in range(min(max(warmup - 3, 0), int(WARMUP_BUDGET_S * 1e3 / max(est_ms, 1e-3)))):
        steps[i % len(steps)]()
    repeats = gpu_repeats(repeats, est_ms)
    out = {**_quantiles(_cuda_event_ms(steps, repeats, flush, device)), "repeats": repeats}
    if graph and est_ms <= GRAPH_MAX_MS and os.environ.get("KFE_BENCH_GRAPHS", "1") != "0":
        try:
            replay = _captured(steps[0], device)
            out["graph_ms"] = statistics.median(_cuda_event_ms([replay], repeats, flush, device))
            out["launch_ms"] = max(0.0, out["p50"] - out["graph_ms"])
        except Exception as err:  # noqa: BLE001 - not every op captures (host syncs, CPU-side work)
            out["graph_error"] = repr(err)[:200]
    del flush
    return out


def gpu_repeats(asked: int, est_ms: float) -> int:
    """Timed calls on a GPU: at least GPU_MIN_REPEATS, unless they would take longer than ROW_BUDGET_S
    (a 300 ms row of a borrowed GPU's few minutes); then as many as fit, at least MIN_SLOW_REPEATS."""
    want = max(asked, GPU_MIN_REPEATS)
    fit = int(ROW_BUDGET_S * 1e3 / max(est_ms, 1e-3))
    return max(MIN_SLOW_REPEATS, min(want, fit))


def _cuda_event_ms(steps: Sequence[Callable[[], object]], repeats: int, flush: torch.Tensor,
                   device: torch.device) -> list[float]:
    """GPU milliseconds of each call (events around it, the L2 flushed before it); one sync at the end,
    so the host runs ahead and only the GPU's own time (plus launch gaps inside a call) is measured."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for i in range(repeats):
        flush.zero_()
        starts[i].record()
        steps[i % len(steps)]()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _captured(step: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """A CUDA graph of one call of step (warmed up on a side stream, as torch.cuda.graph requires)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g.replay


def interleaved(steps: dict, rounds: int) -> dict[object, list[float]]:
    """CPU milliseconds of every step, one call each per round, in an order reversed on every other
    round: load drift on a shared machine then hits all steps alike (benchmarks/*_interleaved.py).
    Call each step once beforehand to warm it up."""
    ms = {key: [] for key in steps}
    items = list(steps.items())
    for r in range(rounds):
        for key, step in (items if r % 2 == 0 else items[::-1]):
            t0 = time.perf_counter()
            step()
            ms[key].append(1e3 * (time.perf_counter() - t0))
    return ms


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Extra device memory one call allocates at its peak, above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
