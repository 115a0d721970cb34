"""`kfe train ... --profile N` and `kfe bench ... --profile`: a torch.profiler trace and a top-ops table.

Training: after one warm-up step (its first-call costs are not the steady state) N steps are recorded;
the trace goes to `<run dir>/trace-rank<r>.json` (Chrome trace format: open it in ui.perfetto.dev or
chrome://tracing; CPU op events, plus CUDA kernels on a GPU) and rank 0 prints the ops by self time,
then the KFE custom ops (`kfe::...`) on their own lines so they are found at once. Training continues
after the profiled steps.
"""
from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile, schedule

TOP = 15


def activities(device: torch.device) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def table(prof, device: torch.device, top: int = TOP) -> str:
    """The top ops by self time (device time on a GPU), then every kfe:: op's line."""
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    text = events.table(sort_by=key, row_limit=top, max_name_column_width=60)
    kfe = sorted((e for e in events if e.key.startswith("kfe::")), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) or 1.0
    lines = [f"  {e.key:<40} self {getattr(e, key) / 1e3:9.3f} ms ({100 * getattr(e, key) / total:5.1f}%)"
             f"  calls {e.count}" for e in kfe]
    return text + "KFE ops (self time):\n" + ("\n".join(lines) if lines else "  none ran in the profiled steps")


class StepProfiler:
    """prof.step() after every training step; writes and prints once the N steps are recorded."""

    def __init__(self, steps: int, run_dir: str, rank: int, main: bool, device: torch.device, emit=print):
        self.path = os.path.join(run_dir, f"trace-rank{rank}.json")
        self.main, self.device, self.emit, self.done = main, device, emit, False
        self.prof = profile(activities=activities(device), schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                            on_trace_ready=self._ready)
        self.prof.start()

    def _ready(self, prof) -> None:
        prof.export_chrome_trace(self.path)
        if self.main:
            self.emit(f"profile: trace {self.path} (open in ui.perfetto.dev)\n{table(prof, self.device)}")
        self.done = True

    def step(self) -> None:
        if not self.done:
            self.prof.step()
            if self.done:
                self.prof.stop()

    def close(self) -> None:
        """The run ended before the N steps: write what was recorded."""
        if not self.done:
            self.prof.stop()
            if not self.done:  # (stop() flushes through on_trace_ready when steps were recorded)
                self.done = True
