"""MetaCLIP matching: every backend against the plain definition (match_reference)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.testing import expect_error
from train.curation import matching
from train.curation.matching import Matcher, OfficialMatcher, match_reference, spacing

BACKENDS = ["python"] + (["cpp"] if matching.cpp_available() else [])

# Pieces that stress the definition: words that are prefixes of each other, every wrapped
# punctuation mark, every whitespace the spacing touches (and ones it does not), unicode including
# a lone surrogate, repeated words via the small alphabet.
PIECES = ["a", "ab", "abc", "b", "A", "é", "日本", "ß", "\ud800", "🙂", ",", ".", ";", ":", "?", "!", "`",
          "-", "'", "\t", "\n", "\r", " ", "  ", "\u00a0", "\u2028", "\x00", "a.b", "ab,", "b!"]
piece_strings = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)


def test_spacing_is_the_official_chain():
    assert spacing("a,b.c;d:e?f!g`h\ti\nj\rk") == " a , b . c ; d : e ? f ! g ` h i j k "
    assert spacing("") == "  "


CASES = [  # (text, entries, expected indices), worked out by hand from the definition
    ("a a", ["a a", "a", "a a a"], [0, 1]),
    ("dog, cat", ["dog", "dog,", "dog ,", "cat", ", cat"], [0, 2, 3]),  # " dog ,  cat ": ", cat" needs one space
    ("Dog", ["dog", "Dog"], [1]),
    ("a\tb\nc\rd", ["a b", "b c d", "a\tb"], [0, 1]),
    ("new york city", ["new york", "york city", "new", "york city hall", "ew york"], [0, 1, 2]),
    ("", [""], [0]),
    ("a", ["", "a"], [1]),
    ("a  b", ["a  b", "a b", "", " b"], [0, 2, 3]),
    ("x", ["x", "x", "y"], [0, 1]),  # duplicated entries both match
    ("é.", ["é", "é."], [0]),
    ("日本語", ["日本"], []),
    ("e.g. this", ["e.g.", "e . g .", "e . g . this", "e . g .  this"], [1, 3]),  # " e . g .  this "
    ("a`b", ["a ` b", "`"], [0, 1]),
    ("!!!", ["!", "! !", "!  !"], [0, 2]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("text, entries, expected", CASES)
def test_hand_checked_cases(backend, text, entries, expected):
    assert match_reference(text, entries) == expected
    assert Matcher(entries, backend=backend).match(text) == expected


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150)
@given(entries=st.lists(piece_strings, min_size=1, max_size=12), texts=st.lists(piece_strings, max_size=10))
def test_matches_definition_on_random_pieces(backend, entries, texts):
    matcher = Matcher(entries, backend=backend)
    expected = [match_reference(t, entries) for t in texts]
    assert matcher.match_batch(texts) == expected
    assert [matcher.match(t) for t in texts] == expected


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60)
@given(entries=st.lists(st.text(alphabet="ab ,.\t", max_size=6), min_size=1, max_size=10),
       texts=st.lists(st.text(alphabet="ab ,.\t!", max_size=20), max_size=8))
def test_matches_definition_on_random_text(backend, entries, texts):
    assert Matcher(entries, backend=backend).match_batch(texts) == [match_reference(t, entries) for t in texts]


@settings(max_examples=40)
@given(entries=st.lists(piece_strings, min_size=1, max_size=10, unique=True), texts=st.lists(piece_strings, max_size=8))
def test_official_approach_agrees_on_unique_entries(entries, texts):
    pytest.importorskip("ahocorasick")
    official = OfficialMatcher(entries)
    assert [sorted(official.match(t)) for t in texts] == [match_reference(t, entries) for t in texts]


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_flat_layout(backend):
    matcher = Matcher(["a", "b", "a b"], backend=backend)
    flat, counts = matcher.match_flat(["a b", "c", "b"])
    assert flat.tolist() == [0, 1, 2, 1] and counts.tolist() == [3, 0, 1]
    assert matcher.match_batch([]) == [] and matcher.nbytes() > 0


def test_backends_agree_on_synthetic_pool():
    from train.curation import synthetic

    vocab = synthetic.vocabulary(300)
    entries = synthetic.entries(400, vocab)
    texts = synthetic.texts(300, vocab, entries[240:])
    expected = [match_reference(t, entries) for t in texts]
    assert sum(map(len, expected)) > 300  # the pool really exercises multi-word entries
    for backend in BACKENDS:
        assert Matcher(entries, backend=backend).match_batch(texts) == expected


@pytest.mark.parametrize("call, exc, match", [
    (lambda: Matcher([]), ValueError, "entries is empty"),
    (lambda: Matcher("dog"), TypeError, "entries must be a sequence of str"),
    (lambda: Matcher(["a", 3]), TypeError, "entries[1] must be str"),
    (lambda: Matcher(["a"], backend="gpu"), ValueError, "backend must be"),
    (lambda: Matcher(["a"]).match(b"a"), TypeError, "text must be str"),
    (lambda: Matcher(["a"]).match_batch("a"), TypeError, "texts must be a sequence of str"),
    (lambda: Matcher(["a"]).match_batch(["a", None]), TypeError, "texts[1] must be str"),
])
def test_bad_inputs(call, exc, match):
    expect_error(exc, call, match)


def test_cpp_backend_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(matching, "cpp_available", lambda: False)
    expect_error(ValueError, lambda: Matcher(["a"], backend="cpp"), "backend='cpp' needs engine._C")
    assert Matcher(["a"]).backend == "python"  # auto falls back


@pytest.mark.skipif("cpp" not in BACKENDS, reason="engine._C not built")
def test_cpp_class_checks_its_buffers():
    impl = torch.classes.kfe.MetaclipMatcher(torch.tensor([97], dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="uint8"):
        impl.match(torch.zeros(1), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="end at the byte count"):
        impl.match(torch.tensor([97], dtype=torch.uint8), torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        impl.match(torch.tensor([97, 98], dtype=torch.uint8), torch.tensor([0, 2, 1, 2]))
