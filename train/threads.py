"""CPU threads: one rule for every recipe and benchmark, printed at start.

    --threads N > 0        N torch threads per process
    shapes data (0, auto)  1: the built-in presets train tiny models, and a second intra-op thread next to
                           the loader worker made steps ~10x slower on a loaded 2-core machine (`kfe
                           train dit --steps 40`: 22 img/s with torch's default, 106 with 1 thread)
    otherwise (0, auto)    the cores this process may use / the processes on this node (torchrun's
                           LOCAL_WORLD_SIZE), so the local processes do not oversubscribe the cores

Only torch's intra-op pool is set (torch.set_num_threads); OMP_NUM_THREADS, when set, is the user's
explicit choice for libraries that read it and is left alone.
"""
from __future__ import annotations

import os

import torch


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what a container / taskset allows, not the whole machine
    except AttributeError:  # (not on Linux)
        return os.cpu_count() or 1


def resolve(requested: int, shapes: bool) -> tuple[int, str]:
    """(threads, why) by the rule above."""
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0 = auto), got {requested}")
    if requested > 0:
        return requested, "--threads"
    if shapes:
        return 1, "shapes data: 1 per process"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    n = cores()
    return max(1, n // local), f"{n} cores / {local} local process(es)"


def apply(requested: int, shapes: bool) -> str:
    """Set torch's threads by the rule; returns the line to print ('threads 1 (shapes data: ...)')."""
    n, why = resolve(requested, shapes)
    torch.set_num_threads(n)
    return f"threads {n} ({why})"
