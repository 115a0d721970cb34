"""CiT selection: scores against an explicit float64 loop, threshold, top-ratio fallback, buffer."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from engine.testing import expect_error
from train.curation import cit


def _brute_sims(text, meta):
    return [[float(t @ m / (t.norm() * m.norm())) for m in meta.double()] for t in text.double()]


@given(n=st.integers(0, 40), m=st.integers(1, 7), d=st.integers(1, 9), dtype=st.sampled_from(["float32", "float64",
                                                                                              "bfloat16"]))
def test_max_similarity_matches_loop(n, m, d, dtype):
    g = torch.Generator().manual_seed(n * 100 + m * 10 + d)
    text = torch.randn(n, d, generator=g).to(getattr(torch, dtype)) * 3
    meta = torch.randn(m, d, generator=g).to(getattr(torch, dtype))
    scores, entry = cit.max_similarity(text, meta)
    assert scores.shape == (n,) and entry.dtype == torch.long
    for s, e, sims in zip(scores.tolist(), entry.tolist(), _brute_sims(text, meta)):
        assert s == pytest.approx(max(sims), abs=1e-5)
        assert sims[e] == pytest.approx(max(sims), abs=1e-5)  # the argmax (up to ties)


def test_threshold_is_strict_and_no_fallback_when_enough_pass():
    meta = torch.tensor([[1.0, 0.0]])
    angles = torch.tensor([0.0, 0.5, 1.0, 1.5])  # cosines 1, 0.878, 0.540, 0.071
    text = torch.stack([angles.cos(), angles.sin()], 1)
    sel = cit.select(text, meta, threshold=0.54, min_ratio=0.5)
    assert sel.mask.tolist() == [True, True, True, False] and not sel.fallback
    exact = cit.select(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), meta, threshold=0.6, min_ratio=0.0)
    assert exact.mask.tolist() == [True, False]  # 0.6 is not above 0.6


def test_fallback_takes_the_top_min_ratio():
    g = torch.Generator().manual_seed(0)
    text, meta = torch.randn(1000, 16, generator=g), torch.randn(5, 16, generator=g)
    sel = cit.select(text, meta, threshold=0.99, min_ratio=0.01)
    assert sel.fallback and int(sel.mask.sum()) == 10
    assert sel.scores[sel.mask].min() >= sel.scores[~sel.mask].max()
    tiny = cit.select(text[:50], meta, threshold=0.99, min_ratio=0.003)  # floor(0.15) -> at least one
    assert tiny.fallback and int(tiny.mask.sum()) == 1 and tiny.indices.tolist() == [int(tiny.scores.argmax())]
    assert not cit.select(text, meta, threshold=0.99, min_ratio=0.0).mask.any()
    assert cit.select(text[:0], meta).mask.shape == (0,)


def test_metadata_embeddings_average_templates():
    emb = torch.tensor([[[2.0, 0.0], [0.0, 5.0]], [[0.0, 1.0], [0.0, 3.0]]])  # (C=2, T=2, D=2)
    out = cit.metadata_embeddings(emb)
    torch.testing.assert_close(out, torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5], [0.0, 1.0]]))
    torch.testing.assert_close(cit.metadata_embeddings(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))


def test_curated_buffer():
    buf = cit.CuratedBuffer(capacity=3)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    sel = cit.select(text, torch.tensor([[1.0, 0.0]]), threshold=0.5, min_ratio=0)
    assert buf.add(["a", "b", "c"], sel) == 2 and len(buf) == 2 and not buf.full
    assert buf.add(["d", "e"], torch.tensor([True, True])) == 2 and buf.full
    assert buf.ratio == pytest.approx(4 / 5)
    assert buf.take() == ["a", "c", "d"] and buf.items == ["e"] and buf.ratio == 0.0


@pytest.mark.parametrize("call, exc, words", [
    (lambda: cit.select(torch.randn(3, 4), torch.randn(2, 5)), ValueError, ["share D", "4", "5"]),
    (lambda: cit.select(torch.randn(3), torch.randn(2, 3)), ValueError, ["text_emb", "2-D"]),
    (lambda: cit.select(torch.randn(3, 4), torch.randn(0, 4)), ValueError, ["meta_emb is empty"]),
    (lambda: cit.select(torch.randint(0, 3, (3, 4)), torch.randn(2, 4)), ValueError, ["text_emb", "floating"]),
    (lambda: cit.select(torch.randn(3, 4), torch.randn(2, 4), threshold=2), ValueError, ["threshold"]),
    (lambda: cit.select(torch.randn(3, 4), torch.randn(2, 4), min_ratio=-0.1), ValueError, ["min_ratio"]),
    (lambda: cit.CuratedBuffer(0), ValueError, ["capacity"]),
    (lambda: cit.CuratedBuffer(2).add([1, 2], torch.tensor([True])), ValueError, ["selection", "(2,)"]),
    (lambda: cit.metadata_embeddings(torch.randn(2, 3, 4, 5)), ValueError, ["(C, T, D)"]),
])
def test_bad_inputs(call, exc, words):
    expect_error(exc, call, *words)
