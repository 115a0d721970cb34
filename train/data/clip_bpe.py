"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, Sec. 2.4; Sennrich et al. 2016), as OpenAI's
and open_clip's `SimpleTokenizer` computes it: 49408 ids (256 bytes, 256 end-of-word bytes, 48894
merges, <start_of_text> 49406, <end_of_text> 49407), context 77, padding with 0 after <end_of_text>,
truncation keeping <end_of_text> in the last slot. Text is cleaned as open_clip's default `clean="lower"`:
ftfy.fix_text, HTML unescaped twice, whitespace runs collapsed, lower-cased; then split with the same
`regex` pattern (contractions, letter runs, single digits, punctuation runs).

The vocabulary is a file shipped inside a registry package, never a run-time download: open_clip's
`bpe_simple_vocab_16e6.txt.gz`, found with importlib's finder without importing open_clip (KFE never
imports it at run time), or any copy of that file given as `--bpe_vocab PATH` (.txt or .txt.gz).
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from collections.abc import Sequence

from train.data.tokenizer import Tokenizer

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary: the first 48894 merges of the file
SPECIALS = ("<start_of_text>", "<end_of_text>")


def default_vocab_path() -> str:
    """open_clip's shipped vocabulary file, located without importing open_clip (find_spec only finds)."""
    spec = importlib.util.find_spec("open_clip")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        path = os.path.join(d, VOCAB_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"CLIP's BPE vocabulary ({VOCAB_FILE}) ships with the open_clip_torch package, "
                            "which is not installed: `pip install open_clip_torch`, or give --bpe_vocab PATH "
                            "(a copy of the file)")


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable character table (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]  # whitespace / control bytes: shifted past 255
    # insertion order = the vocabulary's first 256 ids (the printable bytes, then the shifted ones)
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


@functools.lru_cache(maxsize=4)
def _load(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not CLIP's BPE merges file (expected {NUM_MERGES} 'a b' lines after a header)")
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIALS)
    return {tok: i for i, tok in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


class ClipBPETokenizer(Tokenizer):
    """open_clip's ids for any text; `path` = the merges file ('' = open_clip's shipped copy)."""

    kind = "clip"

    def __init__(self, path: str = ""):
        import ftfy  # noqa: F401  (fail here, not at the first caption, when a dependency is missing)
        import regex

        self.path = path
        file = path or default_vocab_path()
        if not os.path.isfile(file):
            raise FileNotFoundError(f"--bpe_vocab {file!r}: no such file")
        self.encoder, self.ranks = _load(os.path.abspath(file))
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_token_id, self.eot_token_id = self.encoder[SPECIALS[0]], self.encoder[SPECIALS[1]]
        self.pad_token_id = 0  # open_clip pads with zeros (the id of "!": only after <end_of_text>)
        self.vocab_size = len(self.encoder)
        self.pattern = regex.compile("|".join(SPECIALS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self.cache = {t: t for t in SPECIALS}

    @staticmethod
    def clean(text: str) -> str:
        """open_clip's `clean="lower"`: ftfy, HTML unescape (twice), collapse whitespace, lower-case."""
        import ftfy

        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def bpe(self, token: str) -> list[str]:
        """Merge the characters of one pre-token (the last one marked end-of-word) by merge rank."""
        if token in self.cache:
            return self.cache[token].split(" ")
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # every non-overlapping occurrence, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = " ".join(word)
        return word

    def encode_ids(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of encode up to cleaning: drops <start_of_text>, stops at <end_of_text> (id 0 is "!",
        so padding is cut at <end_of_text>, not by id)."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot_token_id:
            ids = ids[1:]
        if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
        return self.decode_ids(ids)

    def decode_ids(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[i] for i in ids if i not in (self.sot_token_id, self.eot_token_id))
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def to_dict(self) -> dict:
        return {"kind": "clip", "bpe_vocab": self.path}
