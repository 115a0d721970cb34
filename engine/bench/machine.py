"""What a benchmark ran on: the machine, versions, git revision, and its measured roofline."""
from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess

import torch

from engine.backend import triton_interpreting, triton_version

# Datasheet peaks (dense): memory bandwidth in bytes/s and bf16 tensor-core FLOP/s.
SPEC = {
    "H200": {"bandwidth": 4.8e12, "bf16_flops": 989e12},
    "H100": {"bandwidth": 3.35e12, "bf16_flops": 989e12},
    "A100": {"bandwidth": 2.0e12, "bf16_flops": 312e12},
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def spec(device: torch.device) -> dict[str, float]:
    name = device_name(device)
    return next((v for k, v in SPEC.items() if k in name), {})


@functools.lru_cache(maxsize=None)
def _git_sha() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=None)
def measured_bandwidth(device_str: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write): the roofline the % columns use."""
    from engine.bench.timing import time_fn

    device = torch.device(device_str)
    numel = (1 << 28 if device.type == "cuda" else 1 << 25)  # 1 GiB on a GPU, 128 MiB on the CPU
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=10 if device.type == "cuda" else 5)
    return 2 * src.numel() * src.element_size() / (t["p50"] * 1e-3)


@functools.lru_cache(maxsize=None)
def measured_matmul_rate(device_str: str, n: int | None = None) -> float:
    """FLOP/s of a large square matmul (bf16 on a GPU: its tensor cores; float32 on the CPU): the
    compute roofline the "% MM" columns use. n defaults to 8192 on a GPU, 1024 on the CPU."""
    from engine.bench.timing import time_fn

    device = torch.device(device_str)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=3, repeats=10 if cuda else 3)
    return 2 * n ** 3 / (t["p50"] * 1e-3)


def info(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "triton_interpret": triton_interpreting(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
