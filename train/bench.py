"""`kfe bench recipe NAME`: a recipe's training images/s and its data loader's images/s, separately.

Three timings per setting, each after warm-up:
  loader   the rank's Loader alone (decode/generate + transform + collate, `num_workers` processes)
  train    optimizer steps on one batch held on the device (no data loading at all)
  e2e      optimizer steps fed by the loader; `data %` is the share of step time spent waiting for data
           (the loader keeps up when it is small: the issue asks < 5% at the benchmark settings)
Settings: --sizes RESxBATCH[,...] (default per device), --dtype float32|bfloat16, --repeats N steps,
--warmup N steps, --json PATH. Data: the built-in shapes (generated on the fly).

train and e2e are timed interleaved, in up to ROUNDS alternating blocks of repeats / ROUNDS steps each,
and each reports the median block: load from other processes on a shared machine then hits both alike
(timed back to back, a burst of it once made train img/s come out below e2e img/s).
"""
from __future__ import annotations

import itertools
import statistics
import sys
import tempfile
import time

import torch

from engine.bench import machine

# Settings are (model, resolution, global batch, loader workers); model None = the recipe's own model:
# its `shapes` preset's on the CPU, its paper default on a GPU. Each recipe names its settings
# (Recipe.bench); one that does not gets DEFAULTS, with its own model (a fixed model name here would
# hand one recipe's model to another recipe's config: a ConvNeXt to DiT or MAE, which crashed).
DEFAULTS = {
    "cpu": [(None, 32, 32, 1)],
    "cuda": [(None, 224, 256, 12)],
}


def settings_for(name: str, kind: str) -> list[tuple]:
    """The benchmark settings of recipe `name` on device type `kind` ("cpu" | "cuda")."""
    from train.recipes.base import get

    return (get(name).bench or DEFAULTS)[kind]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _settings(args, device: torch.device, name: str = "supervised") -> list[tuple]:
    base = settings_for(name, "cuda" if device.type == "cuda" else "cpu")
    if not args.sizes:
        return base
    out = []
    for item in args.sizes.split(","):
        res, batch = (int(v) for v in item.lower().split("x"))
        out += [(m, res, batch, w) for m, _, _, w in base[:1]]
    return out


def _trainer(name: str, model: str, res: int, batch: int, workers: int, device: torch.device, dtype, out: str):
    from train.recipes.base import get
    from train.run import resolve_config
    from train.trainer import Trainer

    data = (get(name).bench or {}).get("data", "shapes")  # a recipe whose built-in data is not shapes names its own
    over = ["--data", data, "--resolution", str(res), "--batch_size", str(batch),
            "--num_workers", str(workers), "--device", device.type, "--steps", "1000", "--out", out,
            "--progress", "false", "--ema", "false"]
    if model is not None:
        over += ["--model", model, "--model_kwargs", "{}"]
    if dtype is not None:
        over += ["--precision", "bf16" if dtype == torch.bfloat16 else "fp32"]
    preset = "paper" if model is None and device.type == "cuda" else "auto"
    cfg, _ = resolve_config(name, preset=preset, overrides=over)
    t = Trainer(get(name), cfg)
    t.setup(checkpoints=False)
    return t


def _time_loader(t, n: int, warmup: int) -> float:
    it = iter(t.loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    images = sum(next(it)["image"].shape[0] for _ in range(n))
    return images / (time.perf_counter() - t0)


ROUNDS = 5


def _block(t, batches, steps: range) -> tuple[int, float, float]:
    """(images, data wait s, wall s) of optimizer steps `steps` drawn from `batches`."""
    _sync(t.device)
    t0, images, data = time.perf_counter(), 0, 0.0
    for s in steps:
        out = t.step(batches, s)
        images += out["images"]
        data += out["data_time"]
    _sync(t.device)
    return images, data, time.perf_counter() - t0


def _time_steps(t, held, fed, n: int, warmup: int) -> tuple[float, float, float]:
    """(train img/s, e2e img/s, data fraction): steps on the `held` batch and steps `fed` by the loader,
    in alternating blocks (see the module doc); the medians of the blocks' rates."""
    _block(t, held, range(warmup))
    _block(t, fed, range(warmup, 2 * warmup))
    rounds = max(1, min(ROUNDS, n))
    train, e2e, data, wall, step = [], [], 0.0, 0.0, 2 * warmup
    for r in range(rounds):
        k = n // rounds + (r < n % rounds)
        images, _, w = _block(t, held, range(step, step + k))
        train.append(images / w)
        images, d, w = _block(t, fed, range(step + k, step + 2 * k))
        e2e.append(images / w)
        data, wall, step = data + d, wall + w, step + 2 * k
    return statistics.median(train), statistics.median(e2e), data / wall


def measure(name: str, setting: tuple, device: torch.device, dtype, warmup: int, repeats: int) -> dict:
    model, res, batch, workers = setting
    with tempfile.TemporaryDirectory() as out:
        t = _trainer(name, model, res, batch, workers, device, dtype, out)
        model = t.cfg.model
        loader_ips = _time_loader(t, max(repeats, 5), warmup)
        held = itertools.repeat(next(iter(t.loader)))  # one batch, reused: no loading in the timing
        train_ips, e2e_ips, data_frac = _time_steps(t, held, iter(t.loader), repeats, warmup)
        flops, peak = t.flops()
    rec = {"recipe": name, "model": model, "resolution": res, "batch": batch, "workers": workers,
           "precision": "bf16" if t.bf16 else "fp32", "loader_images_per_s": loader_ips,
           "train_images_per_s": train_ips, "e2e_images_per_s": e2e_ips, "data_frac": data_frac,
           "train_flops_per_image": flops}
    if flops:
        rec["tflops"] = flops * train_ips / 1e12
        if peak:
            rec["mfu"] = flops * train_ips / peak
    return rec


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"device: {meta['device']} | torch {meta['torch']} | git {meta['git']} | {meta['date']}", "",
             "| recipe | model | res | batch | workers | precision | loader img/s | train img/s | e2e img/s | "
             "data % | TFLOP/s | MFU |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        lines.append(f"| {r['recipe']} | {r['model']} | {r['resolution']} | {r['batch']} | {r['workers']} | "
                     f"{r['precision']} | {r['loader_images_per_s']:.0f} | {r['train_images_per_s']:.0f} | "
                     f"{r['e2e_images_per_s']:.0f} | {100 * r['data_frac']:.1f} | {r.get('tflops', 0):.3f} | {mfu} |")
    return "\n".join(lines)


def run(args, device: torch.device) -> int:
    from engine.cli import _parse_dtypes

    names = getattr(args, "recipes", None) or ["supervised"]
    dtypes = _parse_dtypes(args.dtype) or [None]
    cpu = device.type == "cpu"
    warmup = args.warmup if args.warmup is not None else (2 if cpu else 10)
    repeats = args.repeats if args.repeats is not None else (10 if cpu else 30)
    records = []
    for name in names:
        for setting, dtype in itertools.product(_settings(args, device, name), dtypes):
            print(f"  timing recipe {name} {setting}", flush=True, file=sys.stderr)
            records.append(measure(name, setting, device, dtype, warmup, repeats))
    meta = machine.info(device)
    print(markdown(records, meta))
    rounds = max(1, min(ROUNDS, repeats))
    print(f"\ntrain / e2e img/s: medians of {rounds} interleaved blocks of ~{repeats // rounds} step(s) each. "
          "Other processes' load on this machine lowers every column: compare columns within a "
          "run, and rerun (or raise --repeats) when train img/s comes out below e2e img/s.")
    if args.json:
        from engine.bench.report import write_json

        write_json([{**meta, **r} for r in records], args.json)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0
