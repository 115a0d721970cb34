"""The counting fixture for the tests: engine/bench/counting.py's `count_triton` (engine must not import
tests, so the code lives there and `kfe bench` uses the same counter)."""
from engine.bench.counting import Counts, count_triton

__all__ = ["Counts", "count_triton"]
