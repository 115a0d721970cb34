"""Timing one callable: warm-up, then quantiles over repeats (CUDA events on a GPU)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _quantiles(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    if len(ms) == 1:
        return {"p20": ms[0], "p50": ms[0], "p80": ms[0]}
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return {"p20": q[1], "p50": statistics.median(ms), "p80": q[7]}


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Milliseconds per call: p20, p50 (median), p80. Warm-up covers compilation and autotuning."""
    for _ in range(warmup):
        fn()
    ms = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(ms)


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
