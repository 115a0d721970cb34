"""`kfe bench contrastive`: time and peak memory of the CLIP / SigLIP loss, fwd and fwd+bwd.

Providers: `reference` = the materialised loss exactly as open_clip writes it (B x B logits in the input
dtype, both directions, F.cross_entropy / logsigmoid), `compiled-reference` = torch.compile of it (on a GPU
only at B = 16384, to keep the default run short),
`kfe` = engine.ops.contrastive_loss on the auto backend (Triton on a GPU, the chunked PyTorch path on
the CPU), `kfe[reference]` = the chunked path on a GPU, and open_clip's ClipLoss / SigLipLoss when
open_clip is installed. A materialised provider whose logits would not fit in half the free memory is
skipped (and said so), so the kfe path can be measured where the materialised one cannot run.

Peak memory: on a GPU, torch.cuda's peak allocation above what was allocated before the call. On the
CPU, the process's peak resident set (VmHWM from /proc/self/status) in a fresh subprocess per
(provider, mode, size): after a tiny warm-up call (to page in the BLAS code) the high-water mark is
reset (/proc/self/clear_refs), then one call runs; the table's "peak MB" is the growth over the RSS
before the call, and the extra table gives the total peak RSS of the process.

Sizes are BxD, optionally prefixed by the kind: `--sizes clip:32768x512` runs CLIP only. Useful FLOPs:
2 B^2 D forward (the similarities), 4 B^2 D backward (dimage and dtext); minimum bytes: read image and
text (forward), read them again and write their gradients (backward).

The issue's CPU check (B = 32768, D = 512, fp32 forward+backward under 1.5 GB peak RSS):
    kfe bench contrastive --device cpu --sizes clip:32768x512 --modes fwd+bwd --warmup 0 --repeats 1
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from engine.bench.core import Case

GPU_SIZES = [(B, D) for B in (4096, 16384, 65536) for D in (512, 768, 1024)]
CPU_SIZES = [(4096, 512), (8192, 512)]
KINDS = ("clip", "siglip")
MATERIALISED = ("reference", "compiled-reference", "open_clip")


def count_size(size: tuple[int, ...]) -> tuple[int, ...]:
    """Shape `kfe bench` counts the kernels at (engine/bench/counting.py): B capped at 512 (a multiple of
    the GPU tiles, so the counted/ideal ratio of 8 B^2 D executed vs 6 B^2 D useful carries over), D kept."""
    B, D = size
    return min(B, 512), D


def count_scale(size: tuple[int, ...], small: tuple[int, ...]) -> dict:
    """Scaling law from the count shape to the row: the score tiles (B^2 of them, each loading its A and
    K tiles and, in the backward, reading and writing its dI / dT partials) carry both the matrix FLOPs
    and nearly all the bytes, so both scale as (B / B_count)^2 (the O(B D) row statistics are scaled the
    same way: an overstatement below 1 / BLOCK_N of the bytes)."""
    f = (size[0] / small[0]) ** 2
    return {"flops": f, "bytes": f}


def materialised(image, text, logit_scale, logit_bias=None, kind="clip"):
    """open_clip's ClipLoss / SigLipLoss (world size 1), in the input dtype like open_clip."""
    B = image.shape[0]
    if kind == "clip":
        labels = torch.arange(B, device=image.device)
        per_image = logit_scale * image @ text.T
        per_text = logit_scale * text @ image.T
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2 * torch.eye(B, device=image.device, dtype=image.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / B


@functools.lru_cache(maxsize=None)
def _compiled_fn(kind: str):
    return torch.compile(functools.partial(materialised, kind=kind), dynamic=False)


def _compiled(kind: str):
    return lambda *inputs: _compiled_fn(kind)(*inputs)  # torch.compile set up on first use only


def _open_clip(kind: str):
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except Exception:  # noqa: BLE001 - open_clip is an optional peer
        return None
    if kind == "clip":
        loss = ClipLoss()
        return lambda i, t, s: loss(i, t, s)
    loss = SigLipLoss()
    return lambda i, t, s, b: loss(i, t, s, b)


def _kfe(kind: str, backend: str | None = None):
    from engine.backend import use_backend
    from engine.ops.contrastive.op import contrastive_loss

    def run(image, text, scale, bias=None):
        if backend is None:
            return contrastive_loss(image, text, scale, bias, kind=kind)
        with use_backend(backend):
            return contrastive_loss(image, text, scale, bias, kind=kind)
    return run


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def providers(kind: str, B: int, dtype: torch.dtype, device: torch.device) -> tuple[dict, list[str]]:
    """name -> fn, and notes on skipped providers."""
    out = {"reference": functools.partial(materialised, kind=kind), "compiled-reference": _compiled(kind),
           "kfe": _kfe(kind)}
    if device.type == "cuda":
        out["kfe[reference]"] = _kfe(kind, "reference")
        if B != 16384:  # every shape compiles anew; B = 16384 is where the issue sets the time target
            del out["compiled-reference"]
    peer = _open_clip(kind)
    if peer is not None:
        out["open_clip"] = peer
    # fwd+bwd of the materialised loss holds ~6 B x B matrices (logits, softmax, gradients; some fp32).
    need = 6 * B * B * max(4, torch.empty((), dtype=dtype).element_size())
    notes = []
    if need > _free_bytes(device) // 2:
        for name in MATERIALISED:
            if out.pop(name, None) is not None:
                notes.append(f"{name} skipped at B={B}: its logits need ~{need / 2**30:.0f} GiB")
    return out, notes


def make_inputs(kind, B, D, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(B, D, generator=gen, device=device), dim=-1).to(dtype)
    text = F.normalize(torch.randn(B, D, generator=gen, device=device) + image.float(), dim=-1).to(dtype)
    scale = torch.tensor(1 / 0.07 if kind == "clip" else 10.0, device=device)
    return (image, text, scale) if kind == "clip" else (image, text, scale, torch.tensor(-10.0, device=device))


def cases(device: torch.device, sizes=None, dtypes=None, kinds=KINDS) -> list[Case]:
    sizes = sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    dtypes = dtypes or ([torch.bfloat16] if device.type == "cuda" else [torch.float32])
    out = []
    for size in sizes:
        if len(size) != 2:
            raise ValueError(f"contrastive sizes are BxD, got {'x'.join(map(str, size))}")
        B, D = size
        for kind in kinds:
            for dtype in dtypes:
                fns, notes = providers(kind, B, dtype, device)
                for note in notes:
                    print(f"  note: {note}", file=sys.stderr)
                elem = torch.empty((), dtype=dtype).element_size()
                case = Case(f"contrastive-{kind}", f"{B}x{D}", dtype, device,
                            functools.partial(make_inputs, kind, B, D, dtype, device), fns,
                            bytes={"fwd": 2 * B * D * elem, "bwd": 4 * B * D * elem, "fwd+bwd": 6 * B * D * elem},
                            flops={"fwd": 2 * B * B * D, "bwd": 4 * B * B * D, "fwd+bwd": 6 * B * B * D},
                            grad_inputs=(0, 1, 2) if kind == "clip" else (0, 1, 2, 3))
                case.notes = notes
                out.append(case)
    return out


def _parse_sizes(text: str | None):
    """[(kinds, (B, D))] from 'BxD,clip:BxD'."""
    if not text:
        return None
    out = []
    for item in filter(None, text.split(",")):
        kind, _, shape = item.rpartition(":")
        if kind and kind not in KINDS:
            raise SystemExit(f"--sizes: unknown kind {kind!r} in {item!r}; use clip: or siglip:")
        try:
            out.append(((kind,) if kind else KINDS, tuple(int(v) for v in shape.lower().split("x"))))
        except ValueError:
            raise SystemExit(f"--sizes: expected BxD or kind:BxD, got {item!r}") from None
    return out


def _rss_step(case: Case, name: str, mode: str):
    fn = case.providers[name]
    inputs = case.make_inputs()
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*inputs)
        return step
    leaves = [t.requires_grad_() for i, t in enumerate(inputs) if i in case.grad_inputs]
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(*inputs), leaves)
    out = fn(*inputs)
    return lambda: torch.autograd.grad(out, leaves, retain_graph=True)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def measure_rss(kind: str, name: str, mode: str, B: int, D: int, dtype: str) -> dict:
    """Runs in a fresh process (python -m engine.ops.contrastive.bench --rss ...)."""
    dt = getattr(torch, dtype)
    cpu = torch.device("cpu")
    (warm,) = cases(cpu, [(64, D)], [dt], (kind,))
    _rss_step(warm, name, mode)()  # page in the kernels' code before measuring
    (case,) = cases(cpu, [(B, D)], [dt], (kind,))
    step = _rss_step(case, name, mode)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS:")
    step()
    peak = _status("VmHWM:")
    return {"peak_rss_mb": peak / 2**20, "peak_mem_mb": (peak - before) / 2**20}


def _rss_in_subprocess(rec: dict) -> dict:
    B, D = map(int, rec["shape"].split("x"))
    kind = rec["op"].split("-", 1)[1]
    cmd = [sys.executable, "-m", "engine.ops.contrastive.bench", "--rss", kind, rec["provider"], rec["mode"],
           str(B), str(D), rec["dtype"]]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        return {"rss_error": out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def executed_flops(kind: str, B: int, D: int, mode: str, device: torch.device) -> float:
    """Matmul FLOPs the Triton kernels execute (recomputation included), single process."""
    from engine.ops.contrastive.triton import _blocks

    slices = -(-D // _blocks(B, B, D, device)["BLOCK_D"])
    fwd = (2 if kind == "clip" else 1) * 2 * B * B * D
    bwd = 2 * (2 * B * B * D * slices + 2 * B * B * D)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _matmul_rates(records: list[dict], cases_: list[Case]) -> None:
    """GPU: the measured rate of one (B, D) @ (D, B) matmul, and the kfe kernels' share of it."""
    from engine.bench.timing import time_fn

    rates = {}
    for case in cases_:
        image, text = case.make_inputs()[:2]
        B, D = image.shape
        t = time_fn(lambda: torch.mm(image, text.T), case.device, warmup=3, repeats=10)
        rates[(case.shape, str(case.dtype).removeprefix("torch."))] = 2 * B * B * D / (t["p50"] * 1e-3)
    for rec in records:
        rate = rates.get((rec["shape"], rec["dtype"]))
        if rate is None or "ms" not in rec:
            continue
        rec["matmul_tflops"] = rate / 1e12
        if rec["provider"] == "kfe":
            B, D = map(int, rec["shape"].split("x"))
            work = executed_flops(rec["op"].split("-", 1)[1], B, D, rec["mode"], torch.device(rec["device_type"]))
            rec["executed_tflops"] = work / (rec["ms"]["p50"] * 1e-3) / 1e12
            rec["pct_matmul_rate"] = 100 * rec["executed_tflops"] / rec["matmul_tflops"]


def run(args, device: torch.device) -> int:
    from engine.bench import Reporter, run as run_cases, write_json
    from engine.cli import _parse_dtypes

    modes = args.modes.split(",")
    dtypes = _parse_dtypes(args.dtype)
    parsed = _parse_sizes(args.sizes)
    all_cases = []
    if parsed is None:
        all_cases = cases(device, None, dtypes)
    for kinds, size in parsed or []:
        all_cases += cases(device, [size], dtypes, kinds)
    cpu = device.type == "cpu"
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    repeats = args.repeats if args.repeats is not None else (3 if cpu else 10)
    wanted = args.providers.split(",") if args.providers else None
    report = Reporter(args.json)  # streams the timings; the JSON is rewritten below with RSS / mm rates
    records = run_cases(all_cases, modes, warmup, repeats, wanted, on_group=report,
                        progress=lambda msg: print(f"  timing {msg}", file=sys.stderr, flush=True))
    if cpu:  # peak RSS per record, each in a fresh process; compiling again per process is not worth it
        for rec in records:
            if "error" not in rec and rec["provider"] != "compiled-reference":
                print(f"  peak RSS {rec['op']} {rec['shape']} {rec['mode']} {rec['provider']}", file=sys.stderr,
                      flush=True)
                rec.update(_rss_in_subprocess(rec))
    if not cpu:
        _matmul_rates(records, all_cases)
    if not cpu:
        print("\nkfe matmul work vs the measured rate of one (B, D) @ (D, B) torch.mm:\n")
        print("| op | shape | dtype | mode | mm TFLOP/s | kfe executed TFLOP/s | % of mm rate |\n|---|---|---|---|---:|---:|---:|")
        for r in records:
            if "pct_matmul_rate" in r:
                print(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['matmul_tflops']:.0f} | "
                      f"{r['executed_tflops']:.0f} | {r['pct_matmul_rate']:.0f} |")
    if cpu:
        print("\npeak RSS of the whole process (CPU; compiled-reference not measured):\n")
        print("| op | shape | mode | provider | peak RSS MB | growth during the call MB |\n|---|---|---|---|---:|---:|")
        for r in records:
            if "peak_rss_mb" in r:
                print(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} | {r['peak_rss_mb']:.0f} | "
                      f"{r['peak_mem_mb']:.0f} |")
    for case in all_cases:
        for note in getattr(case, "notes", []):
            print(f"\nnote: {case.op} {case.shape}: {note}")
    if args.json:
        write_json(records, args.json)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 1 if any("error" in r or "rss_error" in r for r in records) else 0


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "--rss":
    _, _, kind_, name_, mode_, B_, D_, dtype_ = sys.argv
    print(json.dumps(measure_rss(kind_, name_, mode_, int(B_), int(D_), dtype_)))
