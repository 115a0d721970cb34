"""Tokenizers for the CLIP text tower (models/clip.py takes any tokenizer's ids).

Three tokenizers; each puts <sot> first and <eot> last (the text tower pools at `eot_token_id`), pads
after <eot>, and truncates to the context length keeping <eot>:

- `clip` (train/data/clip_bpe.py): CLIP's byte-level BPE (49408 ids, Radford et al. 2021, Sec. 2.4),
  exactly open_clip's ids, from the vocabulary file the open_clip_torch package ships (or a user copy).
  The tokenizer of OpenAI / open_clip / MetaCLIP checkpoints and of the papers' runs.

- `WordTokenizer`: lower-cased words (runs of letters/digits, inner apostrophes kept; punctuation is
  dropped), vocabulary built from the training captions: every word seen at least `min_count` times,
  most frequent first, ties broken alphabetically, capped at `max_size` (deterministic: the same
  captions give the same ids, whatever their order). Unknown words map to <unk>. Right for a closed
  vocabulary like `shapes` (about 40 words: a tiny embedding table, one token per word).
- `ByteTokenizer`: the UTF-8 bytes of the text (ids 0..255) plus <sot>/<eot>/<pad>: any text, no
  vocabulary to build or store, decode(encode(t)) == t; sequences are ~5x longer than words.

`to_dict()` / `from_dict()` (JSON-safe) store a tokenizer in the run directory and the checkpoint.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
KINDS = ("word", "byte", "clip")


def words(text: str) -> list[str]:
    """Lower-cased words of a text ("Don’t stop!" -> ["don't", "stop"])."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return [w.replace("’", "'") for w in _WORD.findall(text.lower())]


class Tokenizer(ABC):
    """Base: subclasses define `encode_ids(text) -> list[int]` (no specials) and `decode_ids`."""

    kind = ""
    sot_token_id: int
    eot_token_id: int
    pad_token_id: int
    vocab_size: int

    @abstractmethod
    def encode_ids(self, text: str) -> list[int]:
        """Token ids of text, without <sot>/<eot>."""

    @abstractmethod
    def decode_ids(self, ids: Sequence[int]) -> str:
        """Text of ids (no specials)."""

    def encode(self, text: str, context_length: int | None = None) -> list[int]:
        """<sot> ids <eot>, truncated to context_length (the last slot stays <eot>)."""
        ids = [self.sot_token_id, *self.encode_ids(text), self.eot_token_id]
        if context_length is not None and len(ids) > context_length:
            if context_length < 2:
                raise ValueError(f"context_length must be >= 2 (<sot> and <eot>), got {context_length}")
            ids = ids[:context_length - 1] + [self.eot_token_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of encode: drops <sot>, stops at <eot>, ignores padding."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot_token_id:
            ids = ids[1:]
        if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
        return self.decode_ids([i for i in ids if i != self.pad_token_id])

    def __call__(self, texts: Sequence[str], context_length: int) -> torch.Tensor:
        """(B,) texts -> (B, context_length) int64 ids, padded with <pad> after <eot>."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        out = torch.full((len(texts), context_length), self.pad_token_id, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t, context_length)
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    @abstractmethod
    def to_dict(self) -> dict:
        """JSON-able state; from_dict rebuilds the tokenizer (checkpoints keep it)."""

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class WordTokenizer(Tokenizer):
    """Word-level ids: 0 <pad>, 1 <unk>, 2 <sot>, 3 <eot>, then the vocabulary words."""

    kind = "word"
    SPECIALS = ("<pad>", "<unk>", "<sot>", "<eot>")

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has repeated words")
        if any(w in self.SPECIALS or words(w) != [w] for w in vocab):
            raise ValueError("vocab entries must be single lower-case words (as `words()` splits them), "
                             "not special tokens")
        self.vocab = vocab
        self.itos = list(self.SPECIALS) + vocab
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_token_id, self.unk_token_id, self.sot_token_id, self.eot_token_id = 0, 1, 2, 3
        self.vocab_size = len(self.itos)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: int = 0) -> WordTokenizer:
        """Vocabulary of the captions: count >= min_count, most frequent first (ties alphabetical),
        at most max_size words (0 = no cap)."""
        if min_count < 1 or max_size < 0:
            raise ValueError(f"min_count must be >= 1 and max_size >= 0, got {min_count}, {max_size}")
        counts = Counter()
        for c in captions:
            counts.update(words(c))
        vocab = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if not vocab:
            raise ValueError("no words to build a vocabulary from (are the captions empty?)")
        return cls(vocab[:max_size] if max_size else vocab)

    def encode_ids(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_token_id) for w in words(text)]

    def decode_ids(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "word", "vocab": list(self.vocab)}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then 256 <sot>, 257 <eot>, 258 <pad>."""

    kind = "byte"

    def __init__(self):
        self.sot_token_id, self.eot_token_id, self.pad_token_id = 256, 257, 258
        self.vocab_size = 259

    def encode_ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode_ids(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "byte"}


def from_dict(d: dict) -> Tokenizer:
    if not isinstance(d, dict) or d.get("kind") not in KINDS:
        raise ValueError(f"not a tokenizer description: {d!r:.80}")
    if d["kind"] == "clip":
        from train.data.clip_bpe import ClipBPETokenizer

        return ClipBPETokenizer(d.get("bpe_vocab", ""))
    return WordTokenizer(d["vocab"]) if d["kind"] == "word" else ByteTokenizer()


def save(tok: Tokenizer, path: str) -> None:
    with open(path, "w") as f:
        json.dump(tok.to_dict(), f, indent=0)


def load(path: str) -> Tokenizer:
    with open(path) as f:
        return from_dict(json.load(f))
