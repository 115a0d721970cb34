"""MetaCLIP substring matching (Demystifying CLIP Data, arXiv 2309.16671, Sec. 3.2).

The definition (the spec, `match_reference`): the text becomes " " + text + " " with each of
, . ; : ? ! ` surrounded by spaces and \\t \\n \\r turned into spaces; entry e matches when
" " + e + " " occurs in it (case-sensitive, plain `in`).

Fast path: both sides of that `in` start and end with a space, so an occurrence always covers whole
space-separated pieces. Splitting the spaced text on " " gives ["", *T, ""]; " e " occurs exactly when
e.split(" ") is a contiguous run of T (empty pieces from double spaces included). `Matcher` therefore
walks a trie over words from each piece of T instead of an automaton over characters. Backends:
  cpp     csrc/cpu/metaclip_match.cpp (engine._C), hash-interned words, ~1 look-up per piece
  python  single-word entries in a dict (one set intersection per text), the rest in a word trie of
          nested dicts: the fallback when the extension is not built
`OfficialMatcher` is the official repository's approach (pyahocorasick over " e " keys), kept for the
benchmark and tests. Note it keeps one value per key, so a duplicated entry matches only once there;
the definition (and `Matcher`) reports every index.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate

import numpy as np

PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")
_END = None  # trie key of a node's entry list; words are str, so it cannot collide


def _wrap(text: str) -> str:
    # The official chain of str.replace calls (5x faster than str.translate with a dict on CPython).
    for c in PUNCTS_TO_WRAP:
        text = text.replace(c, f" {c} ")
    for c in CHARS_TO_SPACE:
        text = text.replace(c, " ")
    return text


def spacing(text: str) -> str:
    """The text as MetaCLIP matches against it: " " + text + " ", punctuation wrapped, \\t\\n\\r -> " "."""
    return _wrap(f" {text} ")


def match_reference(text: str, entries: Sequence[str]) -> list[int]:
    """The definition, literally: every index i with " " + entries[i] + " " in spacing(text)."""
    spaced = spacing(text)
    return [i for i, entry in enumerate(entries) if f" {entry} " in spaced]


def _check_entries(entries) -> list[str]:
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
        raise TypeError(f"entries must be a sequence of str, got {type(entries).__name__}")
    entries = list(entries)
    bad = next((i for i, e in enumerate(entries) if not isinstance(e, str)), None)
    if bad is not None:
        raise TypeError(f"entries[{bad}] must be str, got {type(entries[bad]).__name__}")
    if not entries:
        raise ValueError("entries is empty: the metadata needs at least one entry")
    return entries


def _check_texts(texts) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
    texts = texts if isinstance(texts, list) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
    return texts


def _pack(strings: list[str]):
    """UTF-8 (surrogatepass: injective on every str) bytes back to back + (n + 1,) int64 offsets."""
    import torch

    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.fromiter(accumulate(map(len, encoded), initial=0), dtype=np.int64, count=len(encoded) + 1)
    data = b"".join(encoded)
    data_t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return data_t, torch.from_numpy(offsets)


def cpp_available() -> bool:
    from engine import _ext

    if not _ext.loaded():
        return False
    import torch

    try:
        torch.classes.kfe.MetaclipMatcher  # noqa: B018 - raises when the class is not registered
    except (RuntimeError, AttributeError):
        return False
    return True


class _CppTrie:
    def __init__(self, entries: list[str]):
        import torch

        self._impl = torch.classes.kfe.MetaclipMatcher(*_pack(entries))

    def match_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        entries, counts = self._impl.match(*_pack(texts))
        return entries.numpy(), counts.numpy()

    def nbytes(self) -> int:
        return int(self._impl.nbytes())


class _PyTrie:
    """Single-word entries in a dict (matched by one set intersection per text); multi-word entries
    in a trie of nested dicts keyed by word, node[_END] listing the entries ending there."""

    def __init__(self, entries: list[str]):
        self._words: dict[str, list[int]] = {}
        self._root: dict = {}
        for i, entry in enumerate(entries):
            words = entry.split(" ")
            if len(words) == 1:
                self._words.setdefault(entry, []).append(i)
                continue
            node = self._root
            for word in words:
                node = node.setdefault(word, {})
            node.setdefault(_END, []).append(i)

    def match_one(self, text: str) -> list[int]:
        words = _wrap(text).split(" ")  # T: the spaced text's pieces between its outer spaces
        found = set()
        for word in self._words.keys() & set(words):
            found.update(self._words[word])
        root, n = self._root, len(words)
        for i in range(n):
            node, j = root.get(words[i]), i + 1
            while node is not None and j < n:
                node, j = node.get(words[j]), j + 1
                if node is not None and _END in node:
                    found.update(node[_END])
        return sorted(found)

    def match_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        lists = [self.match_one(t) for t in texts]
        counts = np.fromiter(map(len, lists), dtype=np.int32, count=len(lists))
        flat = np.fromiter((i for m in lists for i in m), dtype=np.int32, count=int(counts.sum()))
        return flat, counts

    def nbytes(self) -> int:
        import sys

        total, stack = sys.getsizeof(self._words) + sum(map(sys.getsizeof, self._words.values())), [self._root]
        while stack:
            node = stack.pop()
            total += sys.getsizeof(node)
            for key, child in node.items():
                if key is _END:
                    total += sys.getsizeof(child)
                else:
                    stack.append(child)
        return total


class Matcher:
    """Matches texts against MetaCLIP metadata entries; `match(text)` is the sorted list of indices i
    with " " + entries[i] + " " in spacing(text), exactly as `match_reference` computes it.

    backend: "auto" (C++ when engine._C is built, else Python), "cpp" or "python".
    """

    def __init__(self, entries: Sequence[str], backend: str = "auto"):
        entries = _check_entries(entries)
        if backend not in ("auto", "cpp", "python"):
            raise ValueError(f"backend must be 'auto', 'cpp' or 'python', got {backend!r}")
        if backend == "cpp" and not cpp_available():
            from engine import _ext

            raise ValueError("backend='cpp' needs engine._C with kfe::MetaclipMatcher: "
                             + (_ext.load_error() or "the class is not registered; rebuild the extension"))
        self.backend = "cpp" if backend == "cpp" or (backend == "auto" and cpp_available()) else "python"
        self.num_entries = len(entries)
        self._impl = _CppTrie(entries) if self.backend == "cpp" else _PyTrie(entries)

    def match(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if self.backend == "python":
            return self._impl.match_one(text)
        return self._impl.match_flat([text])[0].tolist()

    def match_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All matches of a batch: (entries int32, counts int32); text i's sorted indices are
        entries[offsets[i]:offsets[i + 1]] with offsets = [0, *cumsum(counts)]."""
        return self._impl.match_flat(_check_texts(texts))

    def match_batch(self, texts: Sequence[str]) -> list[list[int]]:
        flat, counts = self.match_flat(texts)
        flat = flat.tolist()
        bounds = list(accumulate(counts.tolist(), initial=0))
        return [flat[a:b] for a, b in zip(bounds, bounds[1:])]

    def nbytes(self) -> int:
        """Memory held by the matcher's tables (C++: exact capacities; Python: sys.getsizeof sum,
        excluding the word strings)."""
        return self._impl.nbytes()


class OfficialMatcher:
    """The official MetaCLIP matcher's approach (metaclip/substr_matching.py): a pyahocorasick
    automaton over " " + e + " " keys, iterated over the spaced text. For benchmarks and tests."""

    def __init__(self, entries: Sequence[str]):
        import ahocorasick

        self._automaton = ahocorasick.Automaton()
        for idx, entry in enumerate(_check_entries(entries)):
            self._automaton.add_word(f" {entry} ", idx)
        self._automaton.make_automaton()

    def match(self, text: str) -> list[int]:
        """Unsorted, as the official function returns it."""
        matched = set()
        for _, idx in self._automaton.iter(spacing(text)):
            matched.add(idx)
        return list(matched)

    def nbytes(self) -> int:
        return int(self._automaton.get_stats()["total_size"])
