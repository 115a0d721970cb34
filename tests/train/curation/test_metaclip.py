"""`curate` end to end: outputs against the definition, worker independence, resume, bad input."""
import json
import os

import numpy as np
import pytest

from engine.testing import expect_error
from tests.train.curation import pools
from train.cli import main
from train.curation import balance, metaclip
from train.curation.matching import match_reference
from train.curation.metaclip import DataError, curate

ENTRIES, TEXTS = pools.corpus()


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    shards = pools.jsonl_pool(str(folder / "shards"), TEXTS, n_shards=6)
    meta = folder / "meta.json"
    meta.write_text(json.dumps(ENTRIES))
    return folder, shards, str(meta)


@pytest.fixture(scope="module")
def baseline(pool_dir, tmp_path_factory):
    _, shards, meta = pool_dir
    out = str(tmp_path_factory.mktemp("base") / "out")
    curate(meta, shards, out, t=15, seed=1, workers=1)
    return (*pools.read_out(out), out)


def test_outputs_follow_the_definition(pool_dir, baseline):
    _, shards, _ = pool_dir
    curated, counts, summary, baseline_dir = baseline
    per_text = [match_reference(t, ENTRIES) for t in TEXTS]
    expected_counts = np.bincount(np.concatenate([m for m in per_text if m]), minlength=len(ENTRIES))
    assert counts == expected_counts.tolist()
    ids, k = {}, 0  # default ids: "<shard>:<line>"
    for shard, recs in zip(shards, pools.shard_records(TEXTS, 6, with_ids=False)):
        for offset in range(len(recs)):
            ids[f"{shard}:{offset}"] = per_text[k]
            k += 1
    lines = [json.loads(x) for x in curated.splitlines()]
    assert lines and all(line["entries"] == ids[line["id"]] for line in lines)
    matched = sum(1 for m in per_text if m)
    assert summary["pool_size"] == len(TEXTS) and summary["matched"] == matched
    assert summary["kept"] == len(lines) < matched  # t = 15 is below the head counts: balancing drops pairs
    assert summary["shards"] == {"total": 6, "read": 6, "unreadable": 0}
    # kept = exactly the pairs whose coins say so (recomputed from the balance module)
    keep_ids = set()
    for pid, ents in ids.items():
        if ents and balance.balance(np.array(ents), np.array([len(ents)]),
                                    balance.id_hashes([json.dumps(pid)]), expected_counts, 15, 1)[0]:
            keep_ids.add(pid)
    assert [line["id"] for line in lines] == [pid for pid in ids if pid in keep_ids]  # shard, then line order
    with open(os.path.join(baseline_dir, "entry_counts_balanced.json")) as f:
        balanced = json.load(f)
    assert balanced == np.bincount([e for line in lines for e in line["entries"]], minlength=len(ENTRIES)).tolist()
    exp = balance.expected_kept([m for m in per_text if m], expected_counts, 15)
    assert abs(len(lines) - exp) < 5 * np.sqrt(exp)


def test_curated_pairs_are_pinned(tmp_path):
    """End to end with a fixed seed: ids, entries and the kept set of a tiny pool do not drift."""
    texts = [f"a dog number {k}" if k % 2 == 0 else f"a cat, {k}" for k in range(16)]
    texts += ["a red dog.", "red dog", "bird?", "nothing"]
    shard = pools.write_jsonl(tmp_path / "s.jsonl", [{"id": f"p{k}", "text": t} for k, t in enumerate(texts)])
    summary = curate(["dog", "cat", "red dog", "bird"], [shard], str(tmp_path / "o"), t=3, seed=7, workers=1)
    curated, counts, _ = pools.read_out(str(tmp_path / "o"))
    assert counts == [10, 8, 2, 1] and (summary["matched"], summary["kept"]) == (19, 5)
    assert curated == ('{"id": "p3", "entries": [1]}\n{"id": "p4", "entries": [0]}\n'
                       '{"id": "p16", "entries": [0, 2]}\n{"id": "p17", "entries": [0, 2]}\n'
                       '{"id": "p18", "entries": [3]}\n')


def test_worker_count_independence(pool_dir, baseline, tmp_path):
    _, shards, meta = pool_dir
    out = str(tmp_path / "out")
    summary = curate(meta, shards, out, t=15, seed=1, workers=3)
    curated, counts, _ = pools.read_out(out)
    assert summary["workers_per_rank"] == [3] and summary["resumed_shards"] == 0
    assert (curated, counts) == baseline[:2]


def test_python_matcher_gives_the_same_curation(pool_dir, baseline, tmp_path):
    _, shards, meta = pool_dir
    summary = curate(meta, shards, str(tmp_path / "out"), t=15, seed=1, workers=1, backend="python")
    assert summary["matcher_backend"] == "python"
    assert pools.read_out(str(tmp_path / "out"))[:2] == baseline[:2]


def test_seed_and_t_change_the_selection(pool_dir, baseline, tmp_path):
    _, shards, meta = pool_dir
    curate(meta, shards, str(tmp_path / "a"), t=15, seed=2, workers=1)
    assert pools.read_out(str(tmp_path / "a"))[0] != baseline[0]
    summary = curate(meta, shards, str(tmp_path / "b"), t=10**9, seed=1, workers=1)
    assert summary["kept"] == summary["matched"]  # every count < t: nothing is dropped


def test_resume_after_a_crash(pool_dir, baseline, tmp_path, monkeypatch):
    _, shards, meta = pool_dir
    out = str(tmp_path / "out")
    real = metaclip._count_shard
    calls = []

    def crashing(i):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(i)
        return real(i)

    monkeypatch.setattr(metaclip, "_count_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        curate(meta, shards, out, t=15, seed=1, workers=1)
    work = os.path.join(out, "_work", "pass1")
    assert sorted(os.listdir(work)) == ["000000.npz", "000001.npz"]
    open(os.path.join(work, "000002.npz.tmp999"), "wb").write(b"half a file")  # a crash mid-write

    def counting(i):
        calls.append(i)
        return real(i)

    calls.clear()
    monkeypatch.setattr(metaclip, "_count_shard", counting)
    real_balance = metaclip._balance_shard

    def crash_in_pass2(i, pass2):
        if i == 3:
            raise KeyboardInterrupt("simulated crash in pass 2")
        return real_balance(i, pass2)

    monkeypatch.setattr(metaclip, "_balance_shard", crash_in_pass2)
    with pytest.raises(KeyboardInterrupt):
        curate(meta, shards, out, t=15, seed=1, workers=1)
    assert calls == [2, 3, 4, 5]  # only the unfinished shards were matched again
    monkeypatch.setattr(metaclip, "_balance_shard", real_balance)
    calls.clear()
    summary = curate(meta, shards, out, t=15, seed=1, workers=1)
    assert calls == [] and summary["resumed_shards"] == 6
    assert pools.read_out(out)[:2] == baseline[:2]
    assert not [n for n in os.listdir(work) if ".tmp" in n]


def test_different_job_in_the_same_folder(pool_dir, tmp_path):
    _, shards, meta = pool_dir
    out = str(tmp_path / "out")
    curate(meta, shards[:2], out, t=15, workers=1)
    expect_error(ValueError, lambda: curate(meta, shards[:3], out, t=15, workers=1), "different curation job",
                 "--fresh")
    assert curate(meta, shards[:3], out, t=15, workers=1, fresh=True)["shards"]["total"] == 3


def test_unreadable_shards_are_skipped_and_reported(pool_dir, tmp_path):
    _, shards, meta = pool_dir
    (tmp_path / "corrupt.tar").write_bytes(os.urandom(2048))
    (tmp_path / "cut.jsonl").write_bytes(b'{"text": "dog"}\n{"te')
    bad = [str(tmp_path / "corrupt.tar"), str(tmp_path / "cut.jsonl"), str(tmp_path / "missing.parquet")]
    summary = curate(meta, shards[:3] + bad, str(tmp_path / "out"), t=15, seed=1, workers=2)
    assert summary["shards"] == {"total": 6, "read": 3, "unreadable": 3}
    assert [b["path"] for b in summary["unreadable_shards"]] == bad
    assert "ReadError" in summary["unreadable_shards"][0]["error"]
    curate(meta, shards[:3], str(tmp_path / "good"), t=15, seed=1, workers=1)
    assert pools.read_out(str(tmp_path / "out"))[0] == pools.read_out(str(tmp_path / "good"))[0]


def test_a_pool_with_no_readable_shard_is_an_error(tmp_path, capsys):
    missing = [str(tmp_path / "p" / "missing.jsonl"), str(tmp_path / "p" / "gone.parquet")]
    expect_error(DataError, lambda: curate(["a"], missing, str(tmp_path / "o"), workers=1),
                 "no shard of the pool could be read", "all 2 failed", "missing.jsonl", "FileNotFoundError")
    (tmp_path / "meta.txt").write_text("a\n")
    assert main(["curate", "metaclip", "--metadata", str(tmp_path / "meta.txt"), "--pool", missing[0],
                 "--out", str(tmp_path / "o4"), "--quiet"]) == 2
    assert "no shard of the pool could be read" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o4" / "curated.jsonl")


def test_duplicate_ids_are_an_error(tmp_path, monkeypatch):
    a = pools.write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "a dog"}, {"id": 2, "text": "a cat"}])
    b = pools.write_jsonl(tmp_path / "b.jsonl", [{"id": 3, "text": "dog"}, {"id": 2, "text": "cat!"}])
    twice = pools.write_jsonl(tmp_path / "c.jsonl", [{"id": 4, "text": "dog"}, {"id": 4, "text": "the dog"}])
    fine = pools.write_jsonl(tmp_path / "d.jsonl", [{"id": 4, "text": "no match"}, {"id": 4, "text": "none"}])
    meta = ["dog", "cat"]
    expect_error(DataError, lambda: curate(meta, [a, twice], str(tmp_path / "o1"), workers=1),
                 "c.jsonl", "pair id 4 occurs twice in this shard", "unique over the whole pool", "--id-field ''")
    for workers in (1, 2):  # across shards: found after pass 1, whichever process matched them
        expect_error(DataError, lambda: curate(meta, [a, fine, b], str(tmp_path / f"o{workers}x"), workers=workers),
                     "pair id 2 occurs 2 times", "a.jsonl", "b.jsonl", "--id-field ''")
    # with many hash buckets (as a pool larger than one bucket), still found
    monkeypatch.setattr(metaclip, "_DUP_BUCKET", 1)
    expect_error(DataError, lambda: curate(meta, [a, b], str(tmp_path / "o3"), workers=1), "pair id 2 occurs 2 times")
    # repeated ids of unmatched pairs never reach the output; shard:offset ids are unique
    assert curate(meta, [a, fine], str(tmp_path / "o4"), workers=1)["kept"] == 2
    assert curate(meta, [a, b, twice], str(tmp_path / "o5"), workers=1, id_field=None)["kept"] == 6


def test_distinct_ids_sharing_a_hash_are_not_duplicates(tmp_path, monkeypatch):
    a = pools.write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "a dog"}, {"id": 2, "text": "a cat"}])
    b = pools.write_jsonl(tmp_path / "b.jsonl", [{"id": 3, "text": "dog"}])
    monkeypatch.setattr(metaclip._balance, "id_hashes", lambda ids: np.full(len(ids), 7, dtype=np.uint64))
    assert curate(["dog", "cat"], [a, b], str(tmp_path / "o"), workers=1)["kept"] == 3


@pytest.mark.parametrize("workers", [0, -2])
def test_workers_must_be_positive(tmp_path, capsys, workers):
    shard = pools.write_jsonl(tmp_path / "s.jsonl", [{"text": "a"}])
    expect_error(ValueError, lambda: curate(["a"], [shard], str(tmp_path / "o"), workers=workers),
                 "workers must be >= 1", str(workers))
    (tmp_path / "meta.txt").write_text("a\n")
    assert main(["curate", "metaclip", "--metadata", str(tmp_path / "meta.txt"), "--pool", shard, "--out",
                 str(tmp_path / "o"), "--workers", str(workers), "--quiet"]) == 2
    assert "workers must be >= 1" in capsys.readouterr().err


def test_formats_give_the_same_curation(tmp_path):
    recs = pools.shard_records(TEXTS[:120], 2, with_ids=True)
    meta = ENTRIES
    specs = {
        "jsonl": [pools.write_jsonl(tmp_path / f"{k}.jsonl.gz", r, gz=True) for k, r in enumerate(recs)],
        "parquet": [pools.write_parquet(tmp_path / f"{k}.parquet", r) for k, r in enumerate(recs)],
        "tar-txt": [pools.write_tar(tmp_path / f"{k}.txt.tar", r, member="txt") for k, r in enumerate(recs)],
        "tar-json": [pools.write_tar(tmp_path / f"{k}.json.tar", r, member="json") for k, r in enumerate(recs)],
    }
    outs = {}
    for name, shards in specs.items():
        curate(meta, shards, str(tmp_path / name), t=5, seed=0, workers=1)
        outs[name] = pools.read_out(str(tmp_path / name))[:2]
    assert all(v == outs["jsonl"] for v in outs.values())
    assert json.loads(outs["jsonl"][0].splitlines()[0])["id"].startswith("pair-")


def test_null_texts_are_counted_not_matched(tmp_path):
    shard = pools.write_jsonl(tmp_path / "s.jsonl", [{"text": None}, {"text": "x y"}, {"text": ""}])
    summary = curate(["x", ""], [shard], str(tmp_path / "o"), t=5, workers=1)
    assert (summary["pool_size"], summary["null_texts"], summary["matched"]) == (3, 1, 2)  # "" matches entry ""


@pytest.mark.parametrize("metadata, words", [
    ("", ["has no entries"]),
    ("\n\n", ["has no entries"]),
    ("[]", ["has no entries"]),
    ('["a", 3]', ["JSON list entry 1 is int"]),
    ('{"entries": ["a"]}', ["is a JSON object", "one entry per line"]),
])
def test_bad_metadata(tmp_path, metadata, words):
    (tmp_path / "m.txt").write_text(metadata)
    shard = pools.write_jsonl(tmp_path / "s.jsonl", [{"text": "a"}])
    expect_error(ValueError, lambda: curate(str(tmp_path / "m.txt"), [shard], str(tmp_path / "o"), workers=1), *words)


def test_metadata_one_per_line(tmp_path):
    (tmp_path / "m.txt").write_text("new york\r\n\ndog \n \t\ncat\n")  # entries as given; blank lines skipped
    assert metaclip.load_metadata(str(tmp_path / "m.txt")) == ["new york", "dog ", "cat"]


@pytest.mark.parametrize("text, entries", [
    ("[new] york\ndog\n", ["[new] york", "dog"]),     # first entry starts with "[": still one per line
    ("[1]\n[2]\n", ["[1]", "[2]"]),                    # not one JSON document
    ('\ufeff[" dog", "cat "]', [" dog", "cat "]),      # JSON: verbatim, after a byte-order mark
    ("\ufeffdog\ncat", ["dog", "cat"]),
])
def test_metadata_formats(tmp_path, text, entries):
    (tmp_path / "m.txt").write_text(text, encoding="utf-8")
    assert metaclip.load_metadata(str(tmp_path / "m.txt")) == entries


def test_metadata_broken_json_list_is_read_as_lines_with_a_warning(tmp_path):
    (tmp_path / "m.json").write_text('["dog",\n "cat",\n]')  # trailing comma
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert metaclip.load_metadata(str(tmp_path / "m.json")) == ['["dog",', ' "cat",', "]"]


def test_cit_reads_metadata_with_the_same_loader(tmp_path):
    from train.data import DataError as TrainDataError
    from train.recipes.cit import _read_metadata

    (tmp_path / "m.txt").write_text("[new] york\ndog \n\n")
    assert _read_metadata(str(tmp_path / "m.txt")) == metaclip.load_metadata(str(tmp_path / "m.txt"))
    (tmp_path / "e.txt").write_text("\n \n")
    expect_error(TrainDataError, lambda: _read_metadata(str(tmp_path / "e.txt")), "--metadata", "has no entries")


def test_bad_arguments(tmp_path):
    shard = pools.write_jsonl(tmp_path / "s.jsonl", [{"caption": "a"}])
    out = str(tmp_path / "o")
    expect_error(DataError, lambda: curate(["a"], [shard], out, workers=2), "no text field 'text'", "--text-field")
    assert curate(["a"], [shard], out + "2", workers=1, text_field="caption")["matched"] == 1
    expect_error(ValueError, lambda: curate(["a"], [shard], out, t=0), "t must be > 0")
    expect_error(ValueError, lambda: curate(["a"], [str(tmp_path / "*.tar")], out), "names no shards")
    expect_error(ValueError, lambda: curate(str(tmp_path / "nope.json"), [shard], out), "cannot read")


def test_cli(pool_dir, baseline, tmp_path, capsys):
    _, shards, meta = pool_dir
    out = str(tmp_path / "out")
    assert main(["curate", "metaclip", "--metadata", meta, "--pool", *shards, "--out", out, "--t", "15",
                 "--seed", "1", "--workers", "2", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == baseline[2]["kept"]
    assert pools.read_out(out)[:2] == baseline[:2]
    assert os.path.getsize(os.path.join(out, "entry_counts.png")) > 1000
    assert main(["curate", "metaclip", "--metadata", meta, "--pool", "x.csv", "--out", out]) == 2
    assert "unsupported shard" in capsys.readouterr().err


def test_id_field_off_uses_shard_offsets(tmp_path):
    shard = pools.write_jsonl(tmp_path / "s.jsonl", [{"text": "b", "id": 5}, {"text": "a", "id": 6}])
    curate(["a"], [shard], str(tmp_path / "ids"), t=5, workers=1)
    curate(["a"], [shard], str(tmp_path / "offsets"), t=5, workers=1, id_field=None)
    assert pools.read_out(str(tmp_path / "ids"))[0] == '{"id": 6, "entries": [0]}\n'
    assert pools.read_out(str(tmp_path / "offsets"))[0] == f'{{"id": "{shard}:1", "entries": [0]}}\n'


def test_spawned_workers_rebuild_the_job(tmp_path):
    import dataclasses
    import pickle

    job = metaclip._Job(["s.jsonl"], str(tmp_path), "text", "id", 8, 5.0, 1)
    spawned = pickle.loads(pickle.dumps((job, ["a", "b c"], "auto")))  # what a spawn start method ships
    saved = metaclip._JOB
    try:
        metaclip._init_worker(spawned)
        assert dataclasses.replace(metaclip._JOB, matcher=None) == job
        assert metaclip._JOB.matcher.match("a b c") == [0, 1]
    finally:
        metaclip._JOB = saved
