"""FCMAE encoder forward+backward, sparse vs dense-masked, timed round-robin (robust on a shared CPU).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/fcmae_interleaved.py [--size 4x224] [--rounds 9]

Uses the cases of `kfe bench fcmae` (models/fcmae_bench.py) but alternates providers and mask ratios
within every round (engine.bench.timing.interleaved), so load drift on a shared machine hits all of them alike; prints the median
milliseconds per fwd+bwd (gradients for the image and every encoder parameter) and the speedups.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from engine.bench.core import step_of
from engine.bench.timing import interleaved
from models import fcmae_bench


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="4x224", help="BATCHxRESOLUTION")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    N, R = (int(v) for v in args.size.split("x"))
    cases = fcmae_bench.cases(torch.device("cpu"), sizes=[(N, R)])
    steps = {}
    for case in cases:
        for name, fn in case.providers.items():
            steps[(case.shape, name)] = step = step_of(case, fn, "fwd+bwd")
            step()  # warm-up
    times = interleaved(steps, args.rounds)
    print(f"fwd+bwd median ms over {args.rounds} interleaved rounds, {torch.get_num_threads()} thread(s)")
    print("| case | provider | median ms | vs reference | vs kfe-dense |")
    print("|---|---|---:|---:|---:|")
    med = {key: statistics.median(ms) for key, ms in times.items()}
    for (shape, name), ms in med.items():
        print(f"| {shape} | {name} | {ms:.1f} | {med[(shape, 'reference')] / ms:.2f}x | "
              f"{med[(shape, 'kfe-dense')] / ms:.2f}x |")


if __name__ == "__main__":
    main()
