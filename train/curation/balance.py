"""MetaCLIP balancing (Demystifying CLIP Data, arXiv 2309.16671, Sec. 3.3 / Alg. 1, line 13-19).

An entry matched by c pairs over the whole pool keeps each of its pairs with probability
    p(c) = 1 if c < t else t / c,
and a pair is kept when at least one of its matched entries keeps it, so
    P(pair kept) = 1 - prod_{e in entries(pair)} (1 - p(c_e)).
Head entries are flattened to ~t pairs each, tail entries keep everything.

The coin of (pair, entry) is a pure function of (seed, pair id, entry index) -- a splitmix64 hash,
not a draw from a shared random stream -- so the selection does not depend on the number of
workers or ranks, on shard order, or on resuming.
"""
from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (numpy array arithmetic wraps modulo 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def id_hash(id_json: str) -> int:
    """64-bit hash of a pair's id, given as its canonical JSON text."""
    digest = hashlib.blake2b(id_json.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def id_hashes(ids_json: list[str]) -> np.ndarray:
    return np.fromiter((id_hash(s) for s in ids_json), dtype=np.uint64, count=len(ids_json))


def uniforms(seed: int, pair_hash: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """U[0, 1) for each (pair, entry): pair_hash (K,) uint64 and entries (K,) int, aligned."""
    s = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    x = _mix(pair_hash.astype(np.uint64) ^ s)
    x = _mix(x + (entries.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keep_probability(counts: np.ndarray, t: float) -> np.ndarray:
    """p(c) per entry: 1 when c < t, else t / c."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.where(counts < t, 1.0, t / np.maximum(counts, 1.0))


def coins(entries: np.ndarray, per_pair: np.ndarray, pair_hash: np.ndarray, counts: np.ndarray, t: float,
          seed: int) -> np.ndarray:
    """Each (pair, matched entry)'s own decision, (K,) bool: U(seed, pair, entry) < p(c_entry).

    entries (K,) int: the matched entry indices of every pair, back to back; per_pair (P,) int >= 1:
    how many belong to each pair; pair_hash (P,) uint64: id hashes; counts (E,): each entry's match
    count over the whole pool."""
    if np.any(np.asarray(per_pair) < 1):
        raise ValueError("per_pair: every pair must have at least one matched entry")
    entries = np.asarray(entries, dtype=np.int64)
    owner_hash = np.repeat(np.asarray(pair_hash, dtype=np.uint64), per_pair)
    return uniforms(seed, owner_hash, entries) < keep_probability(counts, t)[entries]


def balance(entries: np.ndarray, per_pair: np.ndarray, pair_hash: np.ndarray, counts: np.ndarray, t: float,
            seed: int, entry_coins: np.ndarray | None = None) -> np.ndarray:
    """Which matched pairs are kept, (P,) bool: those with at least one entry coin up (see `coins`,
    whose result may be passed as entry_coins)."""
    if len(per_pair) == 0:
        return np.zeros(0, dtype=bool)
    if entry_coins is None:
        entry_coins = coins(entries, per_pair, pair_hash, counts, t, seed)
    starts = np.concatenate([[0], np.cumsum(per_pair)[:-1]])
    return np.logical_or.reduceat(entry_coins, starts)


def expected_kept(entries_per_pair: list[list[int]], counts: np.ndarray, t: float) -> float:
    """E[number of kept pairs] = sum over pairs of 1 - prod (1 - p(c_e)) (for tests and reports)."""
    p = keep_probability(counts, t)
    return float(sum(1.0 - np.prod(1.0 - p[np.asarray(e, dtype=np.int64)]) for e in entries_per_pair))
