"""Bag-of-words captions: the transform, word balancing, pseudo-BoW captions."""
import collections
import math
import pickle
import random

import pytest
import torch

from engine.testing import expect_error
from train.curation import bow


def test_tokenize_and_bag():
    assert bow.tokenize("A Dog's ball, in THE park!! 3-D café_ok don’t") == [
        "a", "dog's", "ball", "in", "the", "park", "3", "d", "café", "ok", "don't"]
    assert bow.bag_of_words("The dog and THE dog; a cat... with a dog!") == ["dog", "cat"]
    assert bow.bag_of_words("?! ... ,") == []


def test_transform_is_seeded_shuffled_and_pure_with_a_key():
    caption = "red green blue yellow purple orange black white pink brown"
    words = bow.bag_of_words(caption)
    a, b = bow.BagOfWords(seed=1), bow.BagOfWords(seed=1)
    outs = [a(caption) for _ in range(5)]
    assert outs == [b(caption) for _ in range(5)]  # same seed, same stream
    assert all(sorted(o.split()) == sorted(words) for o in outs)
    assert len(set(outs)) > 1  # shuffled, differently each call
    assert a(caption, key=17) == b(caption, key=17) == pickle.loads(pickle.dumps(a))(caption, key=17)
    assert bow.BagOfWords(seed=1, shuffle=False)(caption) == " ".join(words)
    assert len(bow.BagOfWords(max_words=3)(caption).split()) == 3
    assert bow.BagOfWords()("the of and") == ""


def test_balancer_probabilities():
    captions = ["dog park"] * 80 + ["dog beach"] * 15 + ["cat"] * 5  # f(dog)=0.95, park 0.8, beach .15, cat .05
    bal = bow.WordBalancer.fit(captions, t=0.1)
    assert bal.num_captions == 100 and bal.doc_freq["dog"] == 95
    assert bal.keep_probability("dog") == pytest.approx(math.sqrt(0.1 / 0.95))
    assert bal.keep_probability("beach") == pytest.approx(math.sqrt(0.1 / 0.15))
    assert bal.keep_probability("cat") == 1.0 and bal.keep_probability("unseen") == 1.0
    lin = bow.WordBalancer.fit(captions, t=0.1, formula="linear")
    assert lin.keep_probability("park") == pytest.approx(0.1 / 0.8)


def test_balancer_statistics_and_never_empty():
    bal = bow.WordBalancer({"dog": 900, "cat": 100, "emu": 1}, 1000, t=0.01)
    rng = random.Random(0)
    kept = collections.Counter()
    n = 4000
    for _ in range(n):
        out = bal.sample(["dog", "cat", "emu"], rng)
        kept.update(out)
        assert out
    for word in ("dog", "cat"):
        p = bal.keep_probability(word)
        assert abs(kept[word] - n * p) < 5 * math.sqrt(n * p * (1 - p)), word
    assert kept["emu"] == n
    assert bal.sample(["dog"], random.Random(1)) == ["dog"]  # the only word survives a lost coin
    assert bal.sample([], rng) == []


def test_bow_with_balancer_drops_frequent_words():
    bal = bow.WordBalancer({"photo": 1000, "zebra": 1}, 1000, t=0.001)
    transform = bow.BagOfWords(seed=0, balancer=bal)
    outs = [transform("a photo of a zebra") for _ in range(200)]
    assert all("zebra" in o for o in outs)
    assert 0 < sum("photo" in o for o in outs) < 30  # p = sqrt(0.001) ~ 0.03


def test_pseudo_bow_matches_explicit_cosines():
    g = torch.Generator().manual_seed(0)
    images, words = torch.randn(9, 6, generator=g), torch.randn(20, 6, generator=g) * 4
    vocab = [f"w{i}" for i in range(20)]
    idx, scores, captions = bow.pseudo_bow(images, words, k=3, vocab=vocab, chunk=4)
    cos = torch.tensor([[float(a.double() @ b.double() / (a.double().norm() * b.double().norm())) for b in words]
                        for a in images], dtype=torch.float64)
    top = cos.topk(3, dim=1)
    assert idx.tolist() == top.indices.tolist()
    torch.testing.assert_close(scores.double(), top.values, atol=1e-6, rtol=0)
    assert captions[0] == " ".join(vocab[j] for j in top.indices[0].tolist())
    assert bow.pseudo_bow(images[:0], words, k=2)[0].shape == (0, 2)


@pytest.mark.parametrize("call, exc, words", [
    (lambda: bow.pseudo_bow(torch.randn(2, 3), torch.randn(4, 5)), ValueError, ["share D"]),
    (lambda: bow.pseudo_bow(torch.randn(2, 3), torch.randn(4, 3), k=5), ValueError, ["k must be in [1, V=4]"]),
    (lambda: bow.pseudo_bow(torch.randn(3), torch.randn(4, 3)), ValueError, ["image_emb", "2-D"]),
    (lambda: bow.pseudo_bow(torch.randn(2, 3), torch.randn(4, 3), k=1, vocab=["a"]), ValueError, ["vocab", "V=4"]),
    (lambda: bow.WordBalancer({}, 10, t=0), ValueError, ["t must be in (0, 1]"]),
    (lambda: bow.WordBalancer({}, 10, formula="log"), ValueError, ["formula"]),
    (lambda: bow.WordBalancer({}, 0), ValueError, ["num_captions"]),
    (lambda: bow.BagOfWords(max_words=0), ValueError, ["max_words"]),
    (lambda: bow.tokenize(None), TypeError, ["caption must be str"]),
])
def test_bad_inputs(call, exc, words):
    expect_error(exc, call, *words)
