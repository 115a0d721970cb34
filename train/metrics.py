"""What a run reports: a tqdm bar, metrics.jsonl, an optional TensorBoard log, a final summary line.

metrics.jsonl holds one JSON object per line, on rank 0 only:
  {"kind": "train", "step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "step_time_s",
   "data_time_s", "data_frac", "skipped": {...}, "skipped_total", "mem_gb", "tflops", "mfu", ...}
  {"kind": "eval", "step", <the recipe's held-out metrics>}
  {"kind": "summary", ...}
`loss`, `grad_norm`, times are means over the steps since the previous line (one step when
log_every = 1). On resume, lines past the checkpoint's step are dropped, so the file reads as if the
run had never stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import warnings

import torch

SKIPPED_KEYS = ("corrupt_image", "missing_caption", "missing_label", "missing_image", "corrupt_shard",
                "unreadable_file")


def memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_flops(device: torch.device) -> float | None:
    """Datasheet dense bf16 FLOP/s of the device, when known (engine.bench.machine.SPEC)."""
    if device.type != "cuda":
        return None
    from engine.bench import machine

    return machine.spec(device).get("bf16_flops")


def truncate_jsonl(path: str, step: int) -> None:
    """Keep only the lines of steps <= `step` (no summary lines): the state a checkpoint resumes."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if rec.get("kind") != "summary" and rec.get("step", math.inf) <= step:
                kept.append(json.dumps(rec))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_jsonl(path: str, kind: str | None = None) -> list[dict]:
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if kind is None or r.get("kind") == kind]


@contextlib.contextmanager
def naming(path: str):
    """I/O errors while writing `path` come out as an OSError that names it (torch.save wraps a full disk
    in a RuntimeError; a line-buffered write raises one without a file name)."""
    try:
        yield
    except OSError as err:
        if err.filename:
            raise
        raise OSError(err.errno, err.strerror or str(err), path) from None
    except RuntimeError as err:
        cause = err.__context__ or err.__cause__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), path) from None
        raise


class Reporter:
    """Rank-0 sink for progress, JSONL and TensorBoard; a no-op on other ranks."""

    def __init__(self, run_dir: str, main: bool, total: int, start: int, progress: bool, tensorboard: bool):
        self.main = main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.bar = self.tb = None
        if not main:
            return
        if start > 0:
            truncate_jsonl(self.path, start)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.file = open(self.path, "a", buffering=1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                warnings.warn("tensorboard = true but the tensorboard package is not installed; skipping it")

    def write(self, rec: dict) -> None:
        if not self.main:
            return
        with naming(self.path):
            self.file.write(json.dumps(rec) + "\n")
        if self.tb is not None and "step" in rec:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step" and not isinstance(v, bool):
                    self.tb.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])

    def advance(self, n: int, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def print(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        if not self.main:
            return
        self.close_bar()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
