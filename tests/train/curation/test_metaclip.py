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


def test_worker_count_independence(pool_dir, baseline, tmp_path):
    _, shards, meta = pool_dir
    out = str(tmp_path / "out")
    summary = curate(meta, shards, out, t=15, seed=1, workers=3)
    curated, counts, _ = pools.read_out(out)
    assert summary["workers_per_rank"] == 3
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
    ('["a", 3]', ["entry 1 is int"]),
    ("[oops", ["invalid JSON list"]),
])
def test_bad_metadata(tmp_path, metadata, words):
    (tmp_path / "m.txt").write_text(metadata)
    shard = pools.write_jsonl(tmp_path / "s.jsonl", [{"text": "a"}])
    expect_error(ValueError, lambda: curate(str(tmp_path / "m.txt"), [shard], str(tmp_path / "o"), workers=1), *words)


def test_metadata_one_per_line(tmp_path):
    (tmp_path / "m.txt").write_text("new york\r\n\ndog \ncat\n")
    assert metaclip.load_metadata(str(tmp_path / "m.txt")) == ["new york", "dog ", "cat"]


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
