"""`kfe bench grn`: ConvNeXt-V2-Base GRN shapes, reference vs torch.compile(reference) vs KFE vs timm.

Minimum bytes: forward reads x twice (statistics, then the output pass) and writes y once; backward
reads x and dy twice and writes dx once. Parameters and the (N, C) tables are negligible.
"""
from __future__ import annotations

import functools

import torch

from engine import testing
from engine.bench.core import Case
from engine.ops.grn import reference
from engine.ops.grn.op import BACKENDS, grn

# ConvNeXt-V2-Base at batch 64 (stage resolutions 56/28/14/7, dims 128..1024, GRN over 4x dims).
GPU_SIZES = [(64, 56, 56, 512), (64, 28, 28, 1024), (64, 14, 14, 2048), (64, 7, 7, 4096)]
CPU_SIZES = [(8, 56, 56, 512), (8, 28, 28, 1024), (8, 14, 14, 2048), (8, 7, 7, 4096)]


def count_size(size: tuple[int, ...]) -> tuple[int, ...]:
    """Shape `kfe bench` counts the Triton kernels at (engine/bench/counting.py): one sample, H and W cut
    to 16 (the interpreter runs the H200's many small programs slowly: a whole 56 x 56 sample took over
    10 minutes on a loaded 2-core machine). Bytes are scaled by the ideal's ratio (linear in N H W); the
    per-program reload of a sample's partial sums is a larger share at the small H W, so the scaled
    bytes overstate it (<= 1.1x the ideal at 16 x 16 for C >= 512)."""
    N, H, W, C = size
    return 1, min(H, 16), min(W, 16), C


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.grn, dynamic=False)


def _timm_grn(C: int, device: torch.device):
    try:
        from timm.layers import GlobalResponseNorm
    except Exception:  # noqa: BLE001 - timm is an optional peer
        return None
    layer = GlobalResponseNorm(C, channels_last=True).to(device)
    with torch.no_grad():
        layer.weight.normal_(0, 0.1)
        layer.bias.normal_(0, 0.1)
    return lambda x, gamma, beta: layer(x)


def _kfe_on(backend: str):
    from engine.backend import use_backend

    def run(x, gamma, beta):
        with use_backend(backend):
            return grn(x, gamma, beta)
    return run


def cases(device: torch.device, sizes=None, dtypes=None) -> list[Case]:
    sizes = sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32])
    out = []
    for shape in sizes:
        if len(shape) != 4:
            raise ValueError(f"grn sizes are NxHxWxC, got {'x'.join(map(str, shape))}")
        C = shape[-1]
        for dtype in dtypes:
            def make_inputs(shape=shape, dtype=dtype, C=C):
                gen = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
                gamma = torch.randn(C, generator=gen, device=device) * 0.1
                return x, gamma, torch.randn(C, generator=gen, device=device) * 0.1

            providers = {"reference": reference.grn, "compiled-reference": _compiled_reference(),
                         "kfe": lambda x, g, b: grn(x, g, b)}
            auto = BACKENDS.pick(make_inputs()[0])[0].backend
            for name in testing.backends("grn", device):
                if name not in (auto, "reference") and not (name == "triton" and device.type == "cpu"):
                    providers[f"kfe[{name}]"] = _kfe_on(name)  # the interpreter is no benchmark
            timm = _timm_grn(C, device)
            if timm is not None:
                providers["timm"] = timm
            numel = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out.append(Case("grn", "x".join(map(str, shape)), dtype, device, make_inputs, providers,
                            bytes={"fwd": 3 * numel, "bwd": 5 * numel, "fwd+bwd": 8 * numel},
                            grad_inputs=(0, 1, 2)))
    return out
