"""Bag-of-words captions (A Fistful of Words, Tejankar et al., arXiv 2112.13884).

The paper trains CLIP-style models on captions reduced to bags of words and shows most of the
signal survives. Here:
  * `BagOfWords`: the caption transform (a picklable callable, the `--captions bow` option of the
    clip recipe): tokenise, lower-case, drop stop-words and punctuation, keep unique words, shuffle
    with a seeded RNG, optionally balance word frequencies, join with spaces.
  * `WordBalancer`: sub-samples frequent words. The paper's exact formula is not public; we use
    word2vec's sub-sampling (Mikolov et al. 2013, Eq. 5) on document frequencies:
        p_keep(w) = min(1, sqrt(t / f(w))),   f(w) = (captions containing w) / (captions),
    so a word in a fraction f > t of the captions survives with probability sqrt(t / f), and words
    rarer than t are always kept. formula="linear" gives MetaCLIP's p = min(1, t / f) instead.
    A caption never loses all its words: when every coin says drop, its rarest word is kept.
  * `pseudo_bow`: captions for uncaptioned images: each image gets the top-k vocabulary words by
    cosine similarity of its image embedding to the words' text embeddings (from a trained model).
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

# English stop-words (NLTK's list, lower-case; apostrophes stripped forms included).
STOP_WORDS = frozenset("""
a about above after again against ain all am an and any are aren aren't as at be because been before being
below between both but by can couldn couldn't d did didn didn't do does doesn doesn't doing don don't down
during each few for from further had hadn hadn't has hasn hasn't have haven haven't having he her here hers
herself him himself his how i if in into is isn isn't it it's its itself just ll m ma me mightn mightn't more
most mustn mustn't my myself needn needn't no nor not now o of off on once only or other our ours ourselves
out over own re s same shan shan't she she's should should've shouldn shouldn't so some such t than that
that'll the their theirs them themselves then there these they this those through to too under until up ve
very was wasn wasn't we were weren weren't what when where which while who whom why will with won won't
wouldn wouldn't y you you'd you'll you're you've your yours yourself yourselves
""".split())

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # runs of letters/digits, inner apostrophes kept


def tokenize(caption: str) -> list[str]:
    """Lower-cased words; punctuation and symbols are separators ("don’t" -> "don't")."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be str, got {type(caption).__name__}")
    return [w.replace("’", "'") for w in _WORD.findall(caption.lower())]


def bag_of_words(caption: str, stop_words: frozenset[str] = STOP_WORDS) -> list[str]:
    """The caption's unique non-stop-words, in order of first appearance."""
    return list(dict.fromkeys(w for w in tokenize(caption) if w not in stop_words))


class WordBalancer:
    """Word-frequency balancing; see the module doc for the formula. Fit it on the training captions."""

    def __init__(self, doc_freq: dict[str, int], num_captions: int, t: float = 1e-3, formula: str = "sqrt"):
        if not 0 < t <= 1:
            raise ValueError(f"t must be in (0, 1] (a fraction of captions), got {t}")
        if formula not in ("sqrt", "linear"):
            raise ValueError(f"formula must be 'sqrt' or 'linear', got {formula!r}")
        if num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {num_captions}")
        self.doc_freq, self.num_captions, self.t, self.formula = dict(doc_freq), num_captions, t, formula

    @classmethod
    def fit(cls, captions: Iterable[str], t: float = 1e-3, formula: str = "sqrt",
            stop_words: frozenset[str] = STOP_WORDS) -> WordBalancer:
        counts, n = Counter(), 0
        for caption in captions:
            counts.update(bag_of_words(caption, stop_words))
            n += 1
        return cls(counts, n, t, formula)

    def keep_probability(self, word: str) -> float:
        f = self.doc_freq.get(word, 0) / self.num_captions
        if f <= self.t:
            return 1.0
        return math.sqrt(self.t / f) if self.formula == "sqrt" else self.t / f

    def sample(self, words: Sequence[str], rng: random.Random) -> list[str]:
        """The words that survive their coin (order kept); the rarest one if none does."""
        probs = [self.keep_probability(w) for w in words]
        kept = [w for w, p in zip(words, probs) if rng.random() < p]
        if not kept and words:  # the rarest word: highest keep probability, first on ties
            kept = [words[max(range(len(words)), key=lambda j: (probs[j], -j))]]
        return kept


class BagOfWords:
    """Caption -> bag-of-words caption. `bow(caption)` draws from the instance's RNG stream (seeded);
    `bow(caption, key=sample_index)` is a pure function of (seed, key, caption), the form to use in
    DataLoader workers (every worker holds a copy of the same stream)."""

    def __init__(self, seed: int = 0, shuffle: bool = True, balancer: WordBalancer | None = None,
                 max_words: int | None = None, stop_words: frozenset[str] = STOP_WORDS):
        if max_words is not None and max_words < 1:
            raise ValueError(f"max_words must be >= 1 or None, got {max_words}")
        self.seed, self.shuffle, self.balancer, self.max_words = seed, shuffle, balancer, max_words
        self.stop_words = frozenset(stop_words)
        self._rng = random.Random(seed)

    def __call__(self, caption: str, key=None) -> str:
        words = bag_of_words(caption, self.stop_words)
        rng = self._rng if key is None else random.Random(f"{self.seed}:{key}")
        if self.balancer is not None:
            words = self.balancer.sample(words, rng)
        if self.shuffle:
            rng.shuffle(words)
        if self.max_words is not None:
            words = words[:self.max_words]
        return " ".join(words)


def pseudo_bow(image_emb: torch.Tensor, word_emb: torch.Tensor, k: int = 5, vocab: Sequence[str] | None = None,
               chunk: int = 4096):
    """Top-k vocabulary words per image by cosine similarity.

    image_emb (M, D), word_emb (V, D): embeddings of the images and of the vocabulary words (any
    scale: both are L2-normalised here, in float32 or float64). Returns (indices (M, k) int64,
    scores (M, k)) sorted by decreasing similarity, plus the captions (words joined by spaces) when
    `vocab` (V words) is given. Rows are processed `chunk` at a time: memory O(chunk * V)."""
    for name, t in (("image_emb", image_emb), ("word_emb", word_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating tensor (rows, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if image_emb.shape[1] != word_emb.shape[1]:
        raise ValueError(f"image_emb and word_emb must share D, got {image_emb.shape[1]} and {word_emb.shape[1]}")
    if not 1 <= k <= word_emb.shape[0]:
        raise ValueError(f"k must be in [1, V={word_emb.shape[0]}], got {k}")
    if vocab is not None and len(vocab) != word_emb.shape[0]:
        raise ValueError(f"vocab must have V={word_emb.shape[0]} words, got {len(vocab)}")
    dtype = torch.float64 if torch.float64 in (image_emb.dtype, word_emb.dtype) else torch.float32
    words = torch.nn.functional.normalize(word_emb.to(dtype), dim=1)
    scores, indices = [], []
    for start in range(0, image_emb.shape[0], chunk):
        img = torch.nn.functional.normalize(image_emb[start:start + chunk].to(dtype), dim=1)
        s, i = (img @ words.T).topk(k, dim=1)  # (chunk, V) -> (chunk, k)
        scores.append(s)
        indices.append(i)
    scores = torch.cat(scores) if scores else word_emb.new_zeros((0, k), dtype=dtype)
    indices = torch.cat(indices) if indices else torch.zeros((0, k), dtype=torch.long, device=word_emb.device)
    if vocab is None:
        return indices, scores
    return indices, scores, [" ".join(vocab[j] for j in row) for row in indices.tolist()]
