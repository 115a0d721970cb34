"""`kfe bench hog`: MaskFeat HOG targets, images/s and GB/s, KFE vs the eager reference, torch.compile(reference)
and, on the CPU, scikit-image's `skimage.feature.hog` as a peer.

Minimum bytes: one read of the image and one write of the targets (B, L, C * nbins * (patch/cell)^2) fp32;
with a mask, the masked fraction of both. Only the forward exists (the targets are constants), so the
suite runs itself in mode fwd whatever --modes says. The peer skimage.feature.hog runs image by image
(HWC float32, 9 orientations, 8x8 cells, 1x1 blocks): it does the same gradient and histogram work but
keeps, per pixel, only the channel with the largest gradient and normalises with L2-Hys, so it is a peer
for speed, not for values.
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch

from engine import testing
from engine.bench.core import Case
from engine.ops.hog import reference
from engine.ops.hog.op import BACKENDS, hog_targets

GPU_SIZES = [(256, 3, 224, 224)]  # MaskFeat's ImageNet batch; pass e.g. --sizes 32x3x8x224x224 for video
CPU_SIZES = [(32, 3, 224, 224)]
MASK_RATIO = 0.4  # MaskFeat masks 40% of the tokens


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.hog_targets, dynamic=False)


def _skimage(shape: tuple, dtype: torch.dtype):
    try:
        from skimage.feature import hog as sk_hog
    except Exception:  # noqa: BLE001 - an optional peer
        return None
    if len(shape) != 4 or dtype != torch.float32:
        return None

    def run(images, mask=None):
        return [sk_hog(img, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1), channel_axis=-1)
                for img in images.permute(0, 2, 3, 1).cpu().numpy()]
    return run


def _kfe_on(backend: str):
    from engine.backend import use_backend

    def run(images, mask=None):
        with use_backend(backend):
            return hog_targets(images, mask=mask)
    return run


def _auto_backend(device: torch.device, shape: tuple, dtype: torch.dtype) -> str:
    return BACKENDS.pick(torch.zeros(shape, dtype=dtype, device=device))[0].backend


def cases(device: torch.device, sizes=None, dtypes=None) -> list[Case]:
    sizes = sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    dtypes = dtypes or ([torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32])
    out = []
    for shape in sizes:
        if len(shape) not in (4, 5) or shape[-1] % 16 or shape[-2] % 16:
            raise ValueError(f"hog sizes are BxCxHxW or BxCxTxHxW with H, W multiples of 16, got {shape}")
        T = shape[2] if len(shape) == 5 else 1
        L, D = T * (shape[-2] // 16) * (shape[-1] // 16), shape[1] * 9 * 4
        for dtype in dtypes:
            for masked in (False, True):
                def make_inputs(shape=shape, dtype=dtype, masked=masked, L=L):
                    gen = torch.Generator(device=device).manual_seed(0)
                    x = torch.rand(shape, generator=gen, device=device).to(dtype)
                    mask = torch.rand(shape[0], L, generator=gen, device=device) < MASK_RATIO if masked else None
                    return x, mask

                providers = {"reference": lambda x, m: reference.hog_targets(x, mask=m)}
                # torch.compile(reference) unmasked only (x[mask] graph-breaks anyway) and for the first
                # dtype only: each (shape, dtype) is a fresh compile of tens of seconds, which on a GPU would
                # dominate a suite whose kernels take milliseconds (the default GPU run stays ~40 s).
                if not masked and dtype == dtypes[0]:
                    providers["compiled-reference"] = lambda x, m: _compiled_reference()(x, mask=m)
                providers["kfe"] = lambda x, m: hog_targets(x, mask=m)
                auto = _auto_backend(device, shape, dtype)
                for name in testing.backends("hog", device):
                    if name not in (auto, "reference") and not (name == "triton" and device.type == "cpu"):
                        providers[f"kfe[{name}]"] = _kfe_on(name)  # the interpreter is no benchmark
                peer = _skimage(shape, dtype) if device.type == "cpu" else None  # a CPU peer: CPU runs only
                if peer is not None and not masked:
                    providers["skimage"] = peer
                fraction = MASK_RATIO if masked else 1.0
                image = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                bytes_ = fraction * (image + shape[0] * L * D * 4)
                label = "x".join(map(str, shape)) + (f" mask{MASK_RATIO:g}" if masked else "")
                out.append(Case("hog_targets", label, dtype, device, make_inputs, providers,
                                bytes={"fwd": bytes_}, grad_inputs=()))
    return out


def _cpu_time_per_image(case_list: list[Case], providers, repeats: int = 3) -> list[dict]:
    """CPU seconds per image on one thread (process time, min of repeats): the work each provider does,
    which a busy shared machine distorts far less than wall-clock time."""
    import time

    threads, out = torch.get_num_threads(), []
    print("\nCPU time per image, one thread (process time, min of %d):\n\n| shape | provider | CPU ms per image |"
          "\n|---|---|---:|" % repeats)
    torch.set_num_threads(1)
    try:
        for case in case_list:
            inputs = case.make_inputs()
            for name, fn in case.providers.items():
                if name == "compiled-reference" or (providers and name not in providers and name != "reference"):
                    continue
                fn(*inputs)
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.process_time()
                    fn(*inputs)
                    best = min(best, time.process_time() - t0)
                ms = 1e3 * best / inputs[0].shape[0]
                print(f"| {case.shape} | {name} | {ms:.3f} |")
                out.append({"op": case.op, "provider": name, "mode": "cpu_time_1_thread", "shape": case.shape,
                            "dtype": "float32", "cpu_ms_per_image": ms})
    finally:
        torch.set_num_threads(threads)
    return out


def run(args: argparse.Namespace, device: torch.device) -> int:
    """Time the forward of every provider; print the usual table plus images/s per provider."""
    from engine.bench import Reporter, run as run_cases, write_json
    from engine.cli import _parse_dtypes, _parse_sizes

    if args.modes and set(args.modes.split(",")) - {"fwd"}:
        print("hog: targets have no backward; timing mode fwd only", file=sys.stderr)
    cpu = device.type == "cpu"
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 10)
    repeats = args.repeats if args.repeats is not None else (5 if cpu else 50)
    providers = args.providers.split(",") if args.providers else None
    report = Reporter(args.json)  # rows and JSON as each shape is timed: a timed-out run keeps them

    def with_images_per_s(group: list[dict]) -> None:
        for r in group:
            if "ms" in r:
                r["images_per_s"] = int(r["shape"].split("x")[0]) / (r["ms"]["p50"] * 1e-3)
        report(group)

    records = run_cases(cases(device, _parse_sizes(args.sizes), _parse_dtypes(args.dtype)), ["fwd"], warmup,
                        repeats, providers, on_group=with_images_per_s,
                        progress=lambda m: print(f"  timing {m}", file=sys.stderr, flush=True))
    print("\n| shape | dtype | provider | images/s | ms per image |\n|---|---|---|---:|---:|")
    for r in records:
        if "images_per_s" in r:
            print(f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['images_per_s']:.0f} | "
                  f"{1e3 / r['images_per_s']:.3f} |")
    if cpu:
        records += _cpu_time_per_image(cases(device, _parse_sizes(args.sizes), [torch.float32]), providers)
    if args.json:
        write_json(records, args.json)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 1 if any("error" in r for r in records) else 0
