"""Cut tar shards: the real training stream and the real curation reader never lose samples silently.

Python's tarfile reads a shard cut at a member boundary or inside a header as a shorter, complete
archive; these tests cut a small shard at every 512-byte boundary and at a few hundred random offsets.
"""
import os

import numpy as np
import pytest

from tests.train.util import write_shards
from train.curation import pool
from train.data.webdataset import WebDatasetStream

N = 12


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    keys = write_shards(str(d), 1, N)
    with open(os.path.join(d, "00000.tar"), "rb") as f:
        return f.read(), keys


def _offsets(size: int) -> list[int]:
    rng = np.random.default_rng(0)
    return sorted(set(range(0, size, 512)) | set(rng.integers(0, size, 300).tolist()) | {size - 1})


def _train_pass(path: str) -> tuple[list[str], dict]:
    """One pass of the training stream (loop=True, as training runs it): the keys and the skip counts."""
    stream = WebDatasetStream([path], ("image", "caption"), lambda img, rng: 0, loop=True)
    keys, skipped = [], {}
    for item in stream:
        for reason, n in item["_skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        if "_fatal" in item or item["_pos"][0] > 0:  # the next pass began: pass 0 is complete
            break
        keys.append(item["key"])
    return keys, skipped


def test_a_cut_shard_is_corrupt_shard_in_training_never_silently_short(shard, tmp_path):
    data, keys = shard
    path = str(tmp_path / "cut.tar")
    full = 0
    for cut in _offsets(len(data)):
        with open(path, "wb") as f:
            f.write(data[:cut])
        got, skipped = _train_pass(path)
        assert got == keys[:len(got)], cut  # what is read is right and in order
        assert set(skipped) <= {"corrupt_shard"}, (cut, skipped)  # never a misleading missing_caption
        if len(got) < N:
            assert skipped.get("corrupt_shard") == 1, (cut, len(got), skipped)
        else:
            full += 1
    assert full < 20  # only cuts inside the trailing zero blocks keep every sample


def test_a_cut_shard_is_unreadable_in_curation_never_short_nor_an_abort(shard, tmp_path):
    data, keys = shard
    path = str(tmp_path / "cut.tar")
    for cut in _offsets(len(data)):
        with open(path, "wb") as f:
            f.write(data[:cut])
        try:
            n = sum(len(b) for b in pool.read_shard(path))
        except pool.DataError as err:  # the user's error class: aborts the whole job
            pytest.fail(f"cut at {cut}: {err}")
        except pool.UNREADABLE:  # reported and skipped
            continue
        assert n == N, cut


def test_curation_reports_a_cut_shard_and_curates_the_rest(shard, tmp_path):
    from train.curation.metaclip import curate

    data, _ = shard
    whole, cut = tmp_path / "a.tar", tmp_path / "b.tar"
    whole.write_bytes(data)
    import io
    import tarfile

    at = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[16].offset  # a header: tarfile alone reads it as complete
    assert len(tarfile.open(fileobj=io.BytesIO(data[:at])).getmembers()) == 16
    cut.write_bytes(data[:at])
    summary = curate(["photo"], [str(whole), str(cut)], str(tmp_path / "out"), workers=1)
    assert summary["shards"] == {"total": 2, "read": 1, "unreadable": 1}
    assert "end-of-archive" in summary["unreadable_shards"][0]["error"]
    assert summary["pool_size"] == N
