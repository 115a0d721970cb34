"""The engine's subcommands of `kfe`: `doctor` and `bench`."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

import torch

from engine import _ext, backend


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return "not installed"


def doctor(args: argparse.Namespace) -> int:
    import engine.ops  # noqa: F401  (registers every op's backends)

    cuda = torch.cuda.is_available()
    print("KFE doctor")
    print(f"  python {platform.python_version()} | torch {torch.__version__} | triton "
          f"{backend.triton_version() or 'not installed'} | numpy {_version('numpy')} | cupy {_version('cupy')}")
    if cuda:
        cap = torch.cuda.get_device_capability()
        print(f"  device: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}")
    else:
        print(f"  device: CPU only ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); "
              "no CUDA device")
    interp = backend.triton_interpreting()
    print(f"  triton mode: {'interpreter (TRITON_INTERPRET=1)' if interp else 'compiled'}")
    if _ext.loaded():
        print(f"  extension engine._C: built ({_ext.path()})")
    else:
        print(f"  extension engine._C: NOT built: {_ext.load_error()}")
        print("    -> ops fall back to Triton and the PyTorch references")
    print(f"  KFE_BACKEND: {backend.requested()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    print()
    print("| op | backend | " + " | ".join(f"on {d.type}" for d in devices) + " |")
    print("|---|---|" + "---|" * len(devices))
    for op, table in sorted(backend.REGISTRY.items()):
        examples = {d: table.example(d)[0] for d in devices}
        for name in backend.BACKENDS:
            impl = table.impls.get(name)
            if impl is None:
                continue
            cells = []
            for d in devices:
                why = impl.reasons(examples[d], forced=True)
                cells.append("ok" if not why else "no: " + "; ".join(why))
            print(f"| {op} | {name} | " + " | ".join(cells) + " |")
        picks = [f"{table.pick(examples[d])[0].backend} on {d.type}" for d in devices]
        print(f"| {op} | **auto picks** | " + " | ".join(picks) + " |")
    print()
    print("Why auto picks what it picks (it takes the first backend, in the order "
          f"{' > '.join(backend.BACKENDS)}, that can run the inputs):")
    for op, table in sorted(backend.REGISTRY.items()):
        for d in devices:
            print(f"  {op} on {d.type}: {explain_pick(table, table.example(d)[0])}")
    return 0


def explain_pick(table: backend.OpBackends, x: torch.Tensor, device: torch.device | None = None) -> str:
    """One line: the backend `auto` takes for x (as if on `device`), why, and why the ones before it
    were passed over."""
    impl, skipped = table.pick(x, device=device)
    if impl is None:
        return "nothing can run it: " + " | ".join(f"{n}: {'; '.join(w)}" for n, w in skipped.items())
    line = f"{impl.backend} ({impl.why or backend.WHY[impl.backend]})"
    if skipped:
        line += "; passed over " + "; ".join(f"{n}: {', '.join(w)}" for n, w in skipped.items())
    return line


def _parse_sizes(text: str | None) -> list[tuple[int, ...]] | None:
    if not text:
        return None
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"--sizes: expected comma-separated shapes like 8x56x56x512, got {text!r}") from None


def _parse_dtypes(text: str | None) -> list[torch.dtype] | None:
    if not text:
        return None
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    try:
        return [names[t.strip()] for t in text.split(",")]
    except KeyError as err:
        raise SystemExit(f"--dtype: unknown dtype {err.args[0]!r}; use {', '.join(names)}") from None


def bench(args: argparse.Namespace) -> int:
    from engine.bench import MODES, SUITES, counting

    if args.list or not args.suites:
        print("suites: " + ", ".join(sorted(SUITES)))
        return 0
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; available: {', '.join(sorted(SUITES))}")
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: {bad} not in {MODES}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    counting.configure(enabled=not getattr(args, "no_count", False))
    try:
        return _bench(args, device, modes)
    finally:
        counting.configure(enabled=False, suite="")


def _bench(args: argparse.Namespace, device: torch.device, modes: list[str]) -> int:
    from engine.bench import SUITES, Reporter, counting, run

    cases, status = [], 0
    for name in args.suites:
        suite = importlib.import_module(SUITES[name])
        counting.configure(suite=SUITES[name])
        try:
            if hasattr(suite, "run"):  # suites that are not op timings (e.g. texts/s) run themselves
                status |= suite.run(args, device)
                continue
            new = suite.cases(device, _parse_sizes(args.sizes), _parse_dtypes(args.dtype))
            for case in new:
                case.suite = SUITES[name]
            cases += new
        except ValueError as err:  # a bad --sizes / --dtype for this suite: its message says what it expects
            raise SystemExit(f"kfe bench {name}: error: {err}") from None
    if not cases:
        return status
    cpu = device.type == "cpu"
    warmup = args.warmup if args.warmup is not None else (2 if cpu else 10)
    repeats = args.repeats if args.repeats is not None else (10 if cpu else 50)
    providers = args.providers.split(",") if args.providers else None
    report = Reporter(args.json)
    records = run(cases, modes, warmup, repeats, providers, on_group=report,
                  progress=lambda msg: print(f"  timing {msg}", file=sys.stderr, flush=True))
    report.finish()
    return 1 if status or any("error" in r for r in records) else 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="versions, device, extension, and each op's backends")
    p.set_defaults(func=doctor)

    p = sub.add_parser("bench", help="benchmark ops (kfe bench grn)",
                       description="Time fwd / bwd / fwd+bwd of an op's providers; report GB/s, TFLOP/s, "
                                   "% of the measured roofline and speedups. Markdown on stdout, row by row.")
    p.add_argument("suites", nargs="*", help="what to benchmark (see --list)")
    p.add_argument("--list", action="store_true", help="list the suites")
    p.add_argument("--sizes", help="comma-separated shapes, e.g. 8x56x56x512,8x7x7x4096 (default: per device)")
    p.add_argument("--dtype", help="comma-separated dtypes: float32, bfloat16, float16 (default: per device)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, bwd, fwd+bwd")
    p.add_argument("--providers", help="only these providers (the reference always runs)")
    p.add_argument("--warmup", type=int, help="warm-up calls (default per suite: op suites 2 on CPU and 10 on GPU, hog 1 and 10, "
                                                 "contrastive 1 and 3)")
    p.add_argument("--repeats", type=int, help="timed calls (default per suite: op suites 10 on CPU and 50 on GPU, hog 5 and 50, "
                                                  "contrastive 3 and 10)")
    p.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    p.add_argument("--no-count", action="store_true",
                   help="skip counting the KFE kernels' executed FLOPs / bytes / launches (counted under the Triton "
                        "interpreter in a child process; see engine/bench/counting.py)")
    p.set_defaults(func=bench)
