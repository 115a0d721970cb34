"""Sparse ConvNeXt V2 block forward+backward vs mask ratio, timed round-robin (robust on a shared CPU).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/sparse_interleaved.py \
        [--sizes 4x14x14x512,4x7x7x1024] [--rounds 15] [--providers kfe-sparse,kfe-dense,reference]

Uses the sparse_block cases of `kfe bench sparse` (engine/ops/sparse_conv/bench.py: FCMAE patch
masks, ConvNeXt-V2-Base stage shapes) but runs every (shape, ratio, provider) once per round, in an
order reversed on every other round, so load drift on a shared machine hits all cells alike. Besides
the median times it reports ratios taken *within* a round and then the median over rounds (paired):
time at each mask ratio relative to ratio 0 (the density curve) and kfe-dense / kfe-sparse (the
speedup); pairing cancels what a drift common to one round does to both terms.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.bench.core import step_of
from engine.bench.timing import interleaved
from engine.ops.sparse_conv import bench


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4x14x14x512,4x7x7x1024", help="comma-separated NxHxWxC")
    ap.add_argument("--ratios", default="0,0.4,0.6,0.75")
    ap.add_argument("--providers", default="kfe-sparse,kfe-dense,reference")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    ratios = tuple(float(r) for r in args.ratios.split(","))
    providers = args.providers.split(",")
    cells = []  # (shape, ratio, provider, step)
    for case in bench.cases(torch.device("cpu"), sizes=sizes, ratios=ratios):
        if case.op != "sparse_block":
            continue
        shape, ratio = case.shape.split(" mask ")
        for name in providers:
            step = step_of(case, case.providers[name], "fwd+bwd")
            step()  # warm-up
            cells.append((shape, float(ratio), name, step))
    t_start = time.perf_counter()
    times = interleaved({cell[:3]: cell[3] for cell in cells}, args.rounds)
    wall = time.perf_counter() - t_start

    def paired(a, b):  # median over rounds of a / b, both timed in the same round
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"sparse_block fwd+bwd, {args.rounds} interleaved rounds, {torch.get_num_threads()} thread(s), "
          f"{wall:.0f} s of rounds")
    print("\nmedian ms (p20-p80):\n")
    print("| shape | provider | " + " | ".join(f"mask {r:.2f}" for r in ratios) + " |")
    print("|---|---|" + "---:|" * len(ratios))
    for shape in dict.fromkeys(c[0] for c in cells):
        for name in providers:
            row = []
            for ratio in ratios:
                ts = sorted(times[(shape, ratio, name)])
                lo, hi = ts[int(0.2 * (len(ts) - 1))], ts[int(round(0.8 * (len(ts) - 1)))]
                row.append(f"{statistics.median(ts):.1f} ({lo:.0f}-{hi:.0f})")
            print(f"| {shape} | {name} | " + " | ".join(row) + " |")
    print("\nmin ms (the least-disturbed run; on a shared machine the distribution is often bimodal):\n")
    print("| shape | provider | " + " | ".join(f"mask {r:.2f}" for r in ratios) + " |")
    print("|---|---|" + "---:|" * len(ratios))
    for shape in dict.fromkeys(c[0] for c in cells):
        for name in providers:
            print(f"| {shape} | {name} | " + " | ".join(f"{min(times[(shape, r, name)]):.1f}" for r in ratios) + " |")
    print("\npaired ratios (median over rounds of the per-round ratio):\n")
    print("| shape | quantity | " + " | ".join(f"mask {r:.2f}" for r in ratios) + " |")
    print("|---|---|" + "---:|" * len(ratios))
    for shape in dict.fromkeys(c[0] for c in cells):
        for name in providers:
            row = [f"{paired((shape, r, name), (shape, ratios[0], name)):.2f}" for r in ratios]
            print(f"| {shape} | {name} time / time at mask {ratios[0]:.2f} | " + " | ".join(row) + " |")
        if {"kfe-sparse", "kfe-dense"} <= set(providers):
            row = [f"{paired((shape, r, 'kfe-dense'), (shape, r, 'kfe-sparse')):.2f}x" for r in ratios]
            print(f"| {shape} | kfe-dense / kfe-sparse | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
