"""Synthetic MetaCLIP-like metadata and alt-texts, for the matching benchmark and the tests.

Shaped after the paper's metadata (Sec. 3.1: 500k entries = WordNet synsets + Wikipedia unigrams,
bigrams and article titles, i.e. mostly single words, some 2-5 word phrases) and web alt-texts
(a dozen Zipf-distributed words with punctuation, capitals, the odd tab or newline, and now and then
a multi-word phrase that is also an entry). Deterministic for a seed.
"""
from __future__ import annotations

import numpy as np

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
_UNICODE = ["é", "ü", "ß", "ø", "ñ", "ç", "日", "本", "д", "ж"]
_SUFFIXES = ["", "", "", "", "", "", "", "", ",", ".", "!", ":", "?", ";"]
_JOINS = [" "] * 30 + ["  ", "\t", "\n", " - "]


def vocabulary(size: int, seed: int = 0) -> list[str]:
    """`size` distinct words of 2-10 letters (1 in 50 with a non-ASCII letter), in Zipf rank order."""
    rng = np.random.default_rng(seed)
    words, seen = [], set()
    while len(words) < size:
        n = size - len(words)
        lengths = rng.integers(2, 11, n)
        letters = _LETTERS[rng.integers(0, 26, int(lengths.sum()))]
        cut = np.cumsum(lengths)[:-1]
        for chars in np.split(letters, cut):
            word = "".join(chars)
            if rng.random() < 0.02:
                word += _UNICODE[rng.integers(len(_UNICODE))]
            if word not in seen:
                seen.add(word)
                words.append(word)
    return words


def _zipf(rng: np.random.Generator, size: int, n: int, a: float = 1.05) -> np.ndarray:
    cdf = np.cumsum(1.0 / np.arange(1, size + 1) ** a)
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), size - 1)


def entries(n: int, vocab: list[str], seed: int = 0) -> list[str]:
    """`n` distinct entries: 60% single words (in rank order), 25% bigrams, 15% 3-5 word titles
    (capitalised), the phrases drawn Zipf-weighted from `vocab`."""
    rng = np.random.default_rng(seed + 1)
    n_uni = min(int(0.6 * n), len(vocab))
    out = list(vocab[:n_uni])
    seen = set(out)
    while len(out) < n:
        k = n - len(out)
        lengths = np.where(rng.random(k) < 0.62, 2, rng.integers(3, 6, k))
        idx = _zipf(rng, len(vocab), int(lengths.sum()))
        pos = 0
        for length in lengths:
            words = [vocab[i] for i in idx[pos:pos + length]]
            pos += length
            phrase = " ".join(w.capitalize() for w in words) if length > 2 else " ".join(words)
            if phrase not in seen:
                seen.add(phrase)
                out.append(phrase)
    return out[:n]


def texts(n: int, vocab: list[str], phrases: list[str], seed: int = 0, mean_words: int = 12) -> list[str]:
    """`n` alt-texts of ~mean_words Zipf words with punctuation; 30% embed one of `phrases`."""
    rng = np.random.default_rng(seed + 2)
    lengths = np.clip(rng.poisson(mean_words, n), 1, 60)
    total = int(lengths.sum())
    words = np.array(vocab, dtype=object)[_zipf(rng, len(vocab), total)]
    suffix = np.array(_SUFFIXES, dtype=object)[rng.integers(0, len(_SUFFIXES), total)]
    joins = np.array(_JOINS, dtype=object)[rng.integers(0, len(_JOINS), total)]
    capital = rng.random(n) < 0.3
    inject = rng.random(n) < 0.3
    picks = rng.integers(0, max(len(phrases), 1), n)
    tokens = (words + suffix + joins).tolist()
    out, pos = [], 0
    for i, length in enumerate(lengths.tolist()):
        parts = tokens[pos:pos + length]
        pos += length
        if inject[i] and phrases:
            parts.insert(length // 2, phrases[picks[i]] + " ")
        text = "".join(parts).rstrip()
        out.append(text[:1].upper() + text[1:] if capital[i] else text)
    return out
