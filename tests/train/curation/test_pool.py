"""Pool shard lists and readers: formats, brace patterns, errors."""
import os

import pytest

from engine.testing import expect_error
from tests.train.curation import pools
from train.curation import pool
from train.curation.pool import DataError

RECORDS = [{"text": "a dog, running", "id": 7}, {"text": None, "id": 8}, {"text": "é 日本\ud800x"}]


def _read(path, **kw):
    return [(o, i, t) for b in pool.read_shard(path, batch_size=2, **kw) for o, i, t in zip(b.offsets, b.ids, b.texts)]


def test_braceexpand():
    assert pool.braceexpand("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert pool.braceexpand("{a,b}{8..10}") == ["a8", "a9", "a10", "b8", "b9", "b10"]
    assert pool.braceexpand("x{2..0}") == ["x2", "x1", "x0"]
    assert pool.braceexpand("plain.tar") == ["plain.tar"]


def test_expand_pool_forms(tmp_path):
    d = tmp_path / "pool"
    d.mkdir()
    for name in ["00000.tar", "00001.tar", "00002.parquet", "notes.md"]:
        (d / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# shards\npool/00000.tar\n\npool/{00001..00001}.tar\n")
    assert pool.expand_pool([str(d)]) == [str(d / "00000.tar"), str(d / "00001.tar"), str(d / "00002.parquet")]
    assert pool.expand_pool([str(tmp_path / "list.txt")]) == [str(tmp_path / "pool/00000.tar"),
                                                            str(tmp_path / "pool/00001.tar")]
    assert pool.expand_pool(str(d / "*.tar")) == [str(d / "00000.tar"), str(d / "00001.tar")]
    assert pool.expand_pool([str(d / "{00000..00003}.tar")])[-1] == str(d / "00003.tar")  # missing: read reports


@pytest.mark.parametrize("specs, words", [
    ([], ["names no shards"]),
    (["nothing/*.tar"], ["names no shards"]),
    (["a.tar", "a.tar"], ["listed twice"]),
    (["data.csv"], ["unsupported shard", ".parquet"]),
    (["missing-list.txt"], ["shard list", "does not exist"]),
])
def test_expand_pool_errors(specs, words):
    expect_error(ValueError, lambda: pool.expand_pool(specs), *words)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet"])
def test_readers_give_offsets_ids_texts(tmp_path, fmt):
    path = str(tmp_path / f"s.{fmt}")
    records = [dict(r) for r in RECORDS]
    if fmt == "parquet":  # Arrow strings are valid UTF-8: no lone surrogate there
        records[2]["text"] = "é 日本x"
        pools.write_parquet(path, [{"text": r["text"], "id": r.get("id")} for r in records])
    else:
        pools.write_jsonl(path, records, gz=fmt.endswith("gz"))
    assert _read(path) == [(0, 7, "a dog, running"), (1, 8, None), (2, None, records[2]["text"])]
    assert [i for _, i, _ in _read(path, id_field=None)] == [None] * 3


@pytest.mark.parametrize("member", ["txt", "json"])
def test_tar_reader(tmp_path, member):
    recs = [{"text": "a dog", "id": "x1"}, {"text": "b, c"}]
    path = pools.write_tar(tmp_path / "s.tar", recs, member=member, text_field="caption")
    assert _read(path, text_field="caption") == [(0, "x1", "a dog"), (1, None, "b, c")]


@pytest.mark.parametrize("fmt, words", [
    ("jsonl", ["line 1", "no text field 'caption'", "--text-field"]),
    ("parquet", ["no text column 'caption'", "--text-field"]),
    ("tar", ["sample '000000' has no text", "'caption'"]),
])
def test_missing_text_field_is_a_data_error(tmp_path, fmt, words):
    path = str(tmp_path / f"s.{fmt}")
    {"jsonl": pools.write_jsonl, "parquet": pools.write_parquet,
     "tar": lambda p, r: pools.write_tar(p, r, member="json")}[fmt](path, [{"text": "a"}])
    expect_error(DataError, lambda: _read(path, text_field="caption"), *words)


def test_non_string_text_and_non_object_lines(tmp_path):
    path = pools.write_jsonl(tmp_path / "s.jsonl", [{"text": 3}])
    expect_error(DataError, lambda: _read(path), "must be a string", "int")
    (tmp_path / "t.jsonl").write_text('["a"]\n')
    expect_error(DataError, lambda: _read(str(tmp_path / "t.jsonl")), "expected a JSON object")


def test_corrupt_shards_raise_unreadable(tmp_path):
    bad = {"trunc.jsonl.gz": gzip_prefix(), "garbage.tar": os.urandom(3000), "x.parquet": b"PAR1 nope",
           "badjson.jsonl": b'{"text": "ok"}\n{"text": \n'}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(pool.UNREADABLE) as info:
            _read(str(tmp_path / name))
        assert not isinstance(info.value, DataError), name
    with pytest.raises(pool.UNREADABLE):
        _read(str(tmp_path / "missing.jsonl"))


def gzip_prefix():
    import gzip

    data = gzip.compress(b"".join(b'{"text": "%s"}\n' % os.urandom(8).hex().encode() for _ in range(200)))
    return data[:len(data) // 2]
