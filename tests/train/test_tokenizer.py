"""Tokenizers for the text tower: word-level (vocabulary from captions) and byte-level."""
import pytest
import torch

from train.data import tokenizer as tok_mod
from train.data.shapes import Shapes
from train.data.tokenizer import ByteTokenizer, WordTokenizer, words

CAPTIONS = ["a large striped red triangle above a small blue circle", "a small red circle at the top left",
            "A Medium Blue Star, in the center!", "a small red circle at the top left"]


def test_word_vocabulary_is_deterministic_by_count_then_alphabet():
    tok = WordTokenizer.build(CAPTIONS)
    assert tok.vocab[:5] == ["a", "circle", "red", "small", "the"]  # counts 5, 3, 3, 3, 3 (ties alphabetical)
    assert tok.itos[:4] == ["<pad>", "<unk>", "<sot>", "<eot>"] and tok.vocab_size == 4 + len(tok.vocab)
    assert WordTokenizer.build(reversed(CAPTIONS)) == tok           # order of the captions does not matter
    assert WordTokenizer.build(CAPTIONS, min_count=2).vocab == ["a", "circle", "red", "small", "the", "at", "blue",
                                                                "left", "top"]
    assert WordTokenizer.build(CAPTIONS, max_size=3).vocab == ["a", "circle", "red"]


def test_word_round_trip_unknown_words_truncation_and_padding():
    tok = WordTokenizer.build(CAPTIONS)
    ids = tok.encode("A medium blue star, in the center!")
    assert ids[0] == tok.sot_token_id and ids[-1] == tok.eot_token_id and len(ids) == 9
    assert tok.decode(ids) == "a medium blue star in the center"  # lower-cased, punctuation dropped
    assert tok.decode(tok.encode("a purple hexagon")) == "a <unk> <unk>"
    cut = tok.encode(CAPTIONS[0], context_length=5)
    assert len(cut) == 5 and cut[-1] == tok.eot_token_id and tok.decode(cut) == "a large striped"
    batch = tok(CAPTIONS[:2], context_length=12)
    assert batch.shape == (2, 12) and batch.dtype == torch.long
    n = len(tok.encode(CAPTIONS[1]))
    assert batch[1, :n].tolist() == tok.encode(CAPTIONS[1]) and (batch[1, n:] == tok.pad_token_id).all()
    assert words("Don’t stop") == ["don't", "stop"]


@pytest.mark.parametrize("text", ["", "plain ascii", "naïve café — 東京 🚀", "e\u0301 combining", "tab\tnul\x00new\nline",
                                  "".join(map(chr, range(0x20, 0x7f)))])
def test_byte_round_trip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < tok.vocab_size and len(ids) == len(text.encode()) + 2
    assert tok(["", text], context_length=len(ids) + 3).shape == (2, len(ids) + 3)


def test_serialisation_and_errors(tmp_path):
    word, byte = WordTokenizer.build(CAPTIONS), ByteTokenizer()
    for tok in (word, byte):
        tok_mod.save(tok, str(tmp_path / "t.json"))
        assert tok_mod.load(str(tmp_path / "t.json")) == tok
    assert word != WordTokenizer.build(CAPTIONS[:1]) and word != byte
    with pytest.raises(ValueError, match="repeated"):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="single lower-case words"):
        WordTokenizer(["two words"])
    with pytest.raises(ValueError, match="no words"):
        WordTokenizer.build(["", "!!"])
    with pytest.raises(ValueError, match="not a tokenizer"):
        tok_mod.from_dict({"kind": "bpe"})
    with pytest.raises(TypeError, match="sequence of strings"):
        byte("abc", context_length=4)
    with pytest.raises(ValueError, match="context_length"):
        byte.encode("abc", context_length=1)


def test_shapes_caption_without_rendering_matches_the_sample():
    ds = Shapes("train", 50, 32)
    assert all(ds.caption(i) == ds[i]["caption"] for i in range(0, 50, 7))
    tok = WordTokenizer.build(ds.caption(i) for i in range(50))
    assert all(tok.unk_token_id not in tok.encode(ds.caption(i)) for i in range(50))
