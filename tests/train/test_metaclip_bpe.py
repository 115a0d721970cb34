"""`--tokenizer clip` (train/data/clip_bpe.py): exactly open_clip's ids (the real peer, test dependency
only) on a few thousand varied strings, truncation keeping <end_of_text>, no open_clip import at run time."""
import random
import subprocess
import sys

import pytest
import torch

from train.data import tokenizer as tok_mod
from train.data.clip_bpe import ClipBPETokenizer, default_vocab_path

open_clip = pytest.importorskip("open_clip")

WORDS = ("a photo of the dog cat bird airplane MetaCLIP curation CLIP's don't I'll we've you're it'd "
         "tench goldfish great-white-shark 1664 3.14 x86_64 e-mail U.S.A. naïve café façade Zürich "
         "résumé Ελληνικά русский 日本語 中文 한국어 العربية हिन्दी emoji 🙂 👍🏽 ✓ ™ © ½ ß ﬁ").split()
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…“”‘’«»—–·•")
ODD = ["&amp;", "&lt;b&gt;", "&amp;amp;", "<end_of_text>", "<start_of_text>", "\t", "\n", "  ", "\u00a0",
       "\u200b", "Ã©", "â€™", "\ufeff", "0123456789", "HTTP://EXAMPLE.COM/A_B?C=D", "ALL CAPS", "MiXeD"]


def varied_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "!", "a", "A" * 500, " ".join(["word"] * 120)]  # empty, padding-only, long truncated
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 40 if rng.random() < 0.8 else 150)):
            r = rng.random()
            if r < 0.55:
                parts.append(rng.choice(WORDS))
            elif r < 0.7:
                parts.append(rng.choice(PUNCT) * rng.randint(1, 3))
            elif r < 0.8:
                parts.append(rng.choice(ODD))
            elif r < 0.9:
                parts.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 6))))
            else:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
        out.append(rng.choice(["", " ", "\n"]).join(parts) if rng.random() < 0.3 else " ".join(parts))
    return out


@pytest.fixture(scope="module")
def tok():
    return ClipBPETokenizer()


@pytest.mark.slow  # ~12-17 s on the loaded 2-core machine (ftfy + open_clip on 2000 texts)
def test_ids_equal_open_clip_on_varied_texts(tok):
    texts = varied_texts(2000)
    ours, theirs = tok(texts, 77), open_clip.tokenize(texts)
    bad = (ours != theirs).any(-1).nonzero().flatten().tolist()
    assert not bad, f"{len(bad)} texts differ, e.g. {texts[bad[0]]!r}"
    # the set exercises what it should: truncation, many distinct ids, unicode bytes
    full = (theirs[:, -1] == tok.eot_token_id).sum()
    assert full > 100 and theirs.unique().numel() > 500


def test_truncation_keeps_end_of_text_and_specials(tok):
    ids = tok(["hello " * 200, "hi"], 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and (ids[0] != 0).all()
    assert ids[1, :3].tolist() == [49406, tok.encoder["hi</w>"], 49407] and (ids[1, 3:] == 0).all()
    assert tok.vocab_size == 49408 and (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok(["x"], 77).shape == (1, 77)
    assert ids.dtype == torch.long


def test_decode_and_round_trip_through_to_dict(tok):
    assert tok.decode(tok.encode("A photo of a Dog!", 77)) == "a photo of a dog !"
    assert tok_mod.from_dict(tok.to_dict()) == tok
    assert isinstance(tok_mod.from_dict({"kind": "clip"}), ClipBPETokenizer)


def test_user_vocab_path_and_bad_path(tmp_path):
    import gzip
    import shutil

    plain = tmp_path / "vocab.txt"
    with gzip.open(default_vocab_path(), "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    user = ClipBPETokenizer(str(plain))
    assert user(["a tench, swimming"], 77).tolist() == open_clip.tokenize(["a tench, swimming"]).tolist()
    with pytest.raises(FileNotFoundError, match="bpe_vocab"):
        ClipBPETokenizer(str(tmp_path / "missing.txt.gz"))
    bad = tmp_path / "bad.txt"
    bad.write_text("header\nonly one line\n")
    with pytest.raises(ValueError, match="not CLIP's BPE merges"):
        ClipBPETokenizer(str(bad))


def test_found_without_importing_open_clip():
    code = ("import sys; from train.data.clip_bpe import ClipBPETokenizer; t = ClipBPETokenizer(); "
            "assert t(['a dog'], 77)[0, :4].tolist() == [49406, 320, 1929, 49407], t(['a dog'], 77); "
            "assert 'open_clip' not in sys.modules; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
