"""`kfe bench attention`: ViT / MAE / DiT / CLIP attention shapes, KFE vs torch SDPA's backends and peers.

Providers: the eager reference (math in fp32), torch SDPA restricted to each of its backends that runs
these inputs on this device (flash, efficient, cudnn, math), KFE, and flash-attn / xformers when
importable. torch.compile(reference) too on the CPU; on a GPU, SDPA's backends are the fused peers and
an inductor compile per shape and mode would take most of the GPU check's few minutes.

Useful FLOPs: 4*B*H*pairs*D forward (pairs = N*M, or the unmasked pairs when causal: about half),
2.5x that backward, 3.5x fwd+bwd; nothing is counted for padding. Minimum bytes: the forward reads
q, k, v and writes out once; the backward reads q, k, v, out, dout and writes dq, dk, dv once; fwd+bwd
is their sum (the log-sum-exp rows are negligible).
--sizes takes BxHxNxD (self-attention, M = N) or BxHxNxMxD; custom sizes are non-causal.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from engine.bench.core import Case
from engine.ops.attention import reference
from engine.ops.attention.op import attention, flop_count

# (label, (B, H, N, M, D), causal): the table of issue 3, plus the causal CLIP text tower (77 tokens).
GPU_SHAPES = [
    ("ViT-B/16 224", (256, 12, 197, 197, 64), False),
    ("MAE ViT-L enc 75% masked", (256, 16, 50, 50, 64), False),
    ("MAE decoder", (256, 16, 197, 197, 32), False),
    ("ViT-H/14", (128, 16, 257, 257, 80), False),
    ("DiT-XL/2 256", (256, 16, 256, 256, 72), False),
    ("long-seq MAE 448/16", (64, 12, 784, 784, 64), False),
    ("long", (8, 16, 4096, 4096, 64), False),
    ("CLIP text (causal)", (256, 8, 77, 77, 64), True),
]
# The same shapes at a batch (and for the long one a length) a 2-core CPU times in seconds.
CPU_SHAPES = [
    ("ViT-B/16 224", (2, 12, 197, 197, 64), False),
    ("MAE ViT-L enc 75% masked", (4, 16, 50, 50, 64), False),
    ("MAE decoder", (2, 16, 197, 197, 32), False),
    ("ViT-H/14", (1, 16, 257, 257, 80), False),
    ("DiT-XL/2 256", (1, 16, 256, 256, 72), False),
    ("long-seq MAE 448/16", (1, 12, 784, 784, 64), False),
    ("CLIP text (causal)", (4, 8, 77, 77, 64), True),
]


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.attention, dynamic=False)


def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def _sdpa(backend, causal: bool):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _runs(fn, device, dtype, D: int, causal: bool) -> bool:
    """Whether fn runs (forward and backward) on small inputs of this kind: SDPA backends and peers
    refuse some dtypes, head dims and devices."""
    q = torch.randn(1, 2, 40, D, device=device, dtype=dtype, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(q, q, q).sum().backward()
        return True
    except Exception:  # noqa: BLE001 - "cannot run here" is all we need to know
        return False


def _peers(causal: bool) -> dict[str, object]:
    """flash-attn and xformers take (B, N, H, D): transposed views of SDPA's layout, no copies."""
    out = {}
    try:
        from flash_attn import flash_attn_func

        out["flash-attn"] = lambda q, k, v: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    except Exception:  # noqa: BLE001 - optional peer
        pass
    try:
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None
        out["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias).transpose(1, 2)
    except Exception:  # noqa: BLE001 - optional peer
        pass
    return out


def _shapes(device: torch.device, sizes) -> list[tuple[str, tuple[int, ...], bool]]:
    if not sizes:
        return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    out = []
    for s in sizes:
        if len(s) not in (4, 5):
            raise ValueError(f"attention sizes are BxHxNxD or BxHxNxMxD, got {'x'.join(map(str, s))}")
        B, H, N, *M, D = s
        out.append(("custom", (B, H, N, M[0] if M else N, D), False))
    return out


def case_for(device: torch.device, shape: tuple[int, ...], causal: bool, dtype: torch.dtype) -> Case:
    B, H, N, M, D = shape

    def make_inputs():
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, H, N, D, generator=gen, device=device, dtype=dtype)
        k = torch.randn(B, H, M, D, generator=gen, device=device, dtype=dtype)
        return q, k, torch.randn(B, H, M, D, generator=gen, device=device, dtype=dtype)

    providers = {"reference": lambda q, k, v: reference.attention(q, k, v, causal)}
    if device.type == "cpu":
        compiled = _compiled_reference()
        providers["compiled-reference"] = lambda q, k, v: compiled(q, k, v, causal)
    for name, backend in _sdpa_backends().items():
        fn = _sdpa(backend, causal)
        if _runs(fn, device, dtype, D, causal):
            providers[f"sdpa-{name}"] = fn
    providers["kfe"] = lambda q, k, v: attention(q, k, v, causal=causal)
    if N == M:  # flash-attn aligns the causal mask bottom-right: only N == M means the same thing
        providers.update({n: fn for n, fn in _peers(causal).items() if _runs(fn, device, dtype, D, causal)})
    fwd = flop_count((B, H, N, D), (B, H, M, D), causal)
    elem = torch.empty((), dtype=dtype).element_size()
    io = elem * B * H * D  # bytes of one (N or M) row per batch*head
    label = "x".join(map(str, (B, H, N, D) if N == M else (B, H, N, M, D))) + ("-causal" if causal else "")
    return Case("attention", label, dtype, device, make_inputs, providers,
                bytes={"fwd": io * (2 * N + 2 * M), "bwd": io * (4 * N + 4 * M), "fwd+bwd": io * (6 * N + 6 * M)},
                flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}, grad_inputs=(0, 1, 2))


def cases(device: torch.device, sizes=None, dtypes=None) -> list[Case]:
    dtypes = dtypes or ([torch.bfloat16] if device.type == "cuda" else [torch.float32])
    return [case_for(device, shape, causal, dtype) for _, shape, causal in _shapes(device, sizes)
            for dtype in dtypes]
