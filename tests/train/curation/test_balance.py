"""MetaCLIP balancing: the keep probability, its statistics, and order/worker independence."""
import numpy as np
import pytest

from engine.testing import expect_error
from train.curation import balance


def _single_entry_pool(counts):
    """Pairs that each match exactly one entry: entry e has counts[e] pairs."""
    entries = np.repeat(np.arange(len(counts)), counts)
    per_pair = np.ones(len(entries), dtype=np.int64)
    hashes = balance.id_hashes([f"pair-{k}" for k in range(len(entries))])
    return entries, per_pair, hashes


def test_keep_probability():
    p = balance.keep_probability(np.array([0, 1, 99, 100, 200, 1000]), t=100)
    np.testing.assert_allclose(p, [1, 1, 1, 1, 0.5, 0.1])  # c < t keeps all; c = t keeps t / c = 1


def test_uniforms_are_uniform_and_pure():
    hashes = balance.id_hashes([str(k) for k in range(20000)])
    u = balance.uniforms(7, hashes, np.zeros(20000, dtype=np.int64))
    assert 0 <= u.min() and u.max() < 1
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.all(np.abs(hist - 2000) < 5 * np.sqrt(2000))  # 5 sigma per bin
    assert np.array_equal(u, balance.uniforms(7, hashes, np.zeros(20000, dtype=np.int64)))
    assert not np.array_equal(u, balance.uniforms(8, hashes, np.zeros(20000, dtype=np.int64)))
    assert not np.array_equal(u, balance.uniforms(7, hashes, np.ones(20000, dtype=np.int64)))
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.05


def test_kept_per_entry_matches_expectation():
    t = 200
    counts = np.array([5, 150, 200, 800, 3000, 10000])
    entries, per_pair, hashes = _single_entry_pool(counts)
    keep = balance.balance(entries, per_pair, hashes, counts, t, seed=0)
    kept = np.bincount(entries[keep], minlength=len(counts))
    assert kept[:3].tolist() == [5, 150, 200]  # c <= t: p = 1, every pair kept (exactly)
    for c, k in zip(counts[3:], kept[3:]):
        sd = np.sqrt(t * (1 - t / c))  # Binomial(c, t / c)
        assert abs(k - t) < 5 * sd, (c, k)


def test_multi_entry_pairs_kept_when_any_entry_keeps():
    rng = np.random.default_rng(0)
    n_entries, n_pairs, t = 50, 6000, 100
    weights = 1.0 / np.arange(1, n_entries + 1)
    lists = [sorted(set(rng.choice(n_entries, size=rng.integers(1, 4), p=weights / weights.sum()).tolist()))
             for _ in range(n_pairs)]
    counts = np.bincount(np.concatenate(lists), minlength=n_entries)
    entries = np.concatenate(lists)
    per_pair = np.array([len(x) for x in lists])
    hashes = balance.id_hashes([f"p{k}" for k in range(n_pairs)])
    keep = balance.balance(entries, per_pair, hashes, counts, t, seed=3)
    p = balance.keep_probability(counts, t)
    q = np.array([1 - np.prod(1 - p[x]) for x in lists])  # P(pair kept)
    assert abs(keep.sum() - q.sum()) < 5 * np.sqrt((q * (1 - q)).sum())
    assert balance.expected_kept(lists, counts, t) == pytest.approx(q.sum())
    # a pair whose entries are all in the tail (c < t) is always kept
    tail = np.array([all(counts[e] < t for e in x) for x in lists])
    assert tail.any() and keep[tail].all()
    # the decision is exactly "any entry's coin < p": recompute it independently
    u = balance.uniforms(3, np.repeat(hashes, per_pair), entries)
    assert np.array_equal(balance.coins(entries, per_pair, hashes, counts, t, 3), u < p[entries])
    coins = np.split(u < p[entries], np.cumsum(per_pair)[:-1])
    assert keep.tolist() == [bool(c.any()) for c in coins]


def test_decisions_do_not_depend_on_order_or_chunking():
    counts = np.array([40, 4000, 900])
    entries, per_pair, hashes = _single_entry_pool(counts)
    whole = balance.balance(entries, per_pair, hashes, counts, 100, seed=5)
    perm = np.random.default_rng(1).permutation(len(entries))
    shuffled = balance.balance(entries[perm], per_pair[perm], hashes[perm], counts, 100, seed=5)
    assert np.array_equal(shuffled, whole[perm])
    chunks = [balance.balance(entries[a:a + 777], per_pair[a:a + 777], hashes[a:a + 777], counts, 100, seed=5)
              for a in range(0, len(entries), 777)]
    assert np.array_equal(np.concatenate(chunks), whole)
    assert not np.array_equal(balance.balance(entries, per_pair, hashes, counts, 100, seed=6), whole)


def test_id_hash_is_stable():
    # pinned: a change of hash silently changes every curated pool (and resumes would mix two)
    assert balance.id_hash('"a"') == balance.id_hash('"a"') != balance.id_hash('"b"')
    assert balance.id_hash('"pool/0.jsonl:0"') == 0xE0D20C15506BF3FA


def test_bad_per_pair():
    expect_error(ValueError, lambda: balance.balance(np.array([0]), np.array([0, 1]), np.zeros(2, np.uint64),
                                                     np.array([1]), 1, 0), "per_pair")
    assert balance.balance(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.uint64), np.array([1]), 1, 0).size == 0


def test_uniforms_golden_values():
    """Pinned: a change of the hash or the coin function changes every curation made with a seed."""
    hashes = balance.id_hashes(['"pair-0"', '"pair-1"', "17"])  # ids as their canonical JSON text
    assert hashes.tolist() == [0x14F36DDE6FBDD358, 0x612B8924E001855D, 0xB47B4D8E138D3920]
    entries = np.array([0, 5, 499999])
    assert balance.uniforms(0, hashes, entries).tolist() == [0.32109337787770253, 0.294919664909703,
                                                             0.8193935802595774]
    assert balance.uniforms(12345, hashes, entries).tolist() == [0.9203409336506645, 0.7592574841456375,
                                                                 0.9781665439588251]
    # the same numbers from the documented definition (splitmix64's finaliser), in plain integers
    mask = (1 << 64) - 1

    def mix(x):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    def uniform(seed, h, e):
        x = mix(h ^ mix(seed & mask))
        return (mix((x + (e + 1) * 0x9E3779B97F4A7C15) & mask) >> 11) / 2**53

    for seed in (0, 12345):
        assert balance.uniforms(seed, hashes, entries).tolist() == [
            uniform(seed, h, e) for h, e in zip(hashes.tolist(), entries.tolist())]


def test_kept_set_is_pinned():
    """Exact with a fixed seed: the kept pairs of a tiny pool (entry counts 4, 10, 30; t = 5)."""
    pairs = [[0], [1], [2], [0, 2], [1, 2], [2], [1], [2], [0, 1], [2], [1, 2], [2]]
    entries = np.concatenate([np.array(p) for p in pairs])
    per_pair = np.array([len(p) for p in pairs])
    hashes = balance.id_hashes([f'"pair-{k}"' for k in range(len(pairs))])
    counts = np.array([4, 10, 30])
    kept = {seed: np.flatnonzero(balance.balance(entries, per_pair, hashes, counts, 5, seed)).tolist()
            for seed in (0, 1)}
    assert kept == {0: [0, 1, 3, 4, 5, 8, 10], 1: [0, 2, 3, 5, 6, 8, 10]}
    assert {0, 3, 8} <= set(kept[0]) & set(kept[1])  # entry 0 (c = 4 < t) keeps all of its pairs
