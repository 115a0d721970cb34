"""Data: WebDataset shards split over ranks and workers, bad samples counted, ImageFolder, resumable order."""
import os
from collections import Counter

import numpy as np
import pytest
import torch

from tests.train.util import jpeg, write_shards
from train.data import DataError, check, eval_batches, open_eval, open_split
from train.data.loader import EpochBatchSampler, Loader

FIELDS = ("image", "caption")


def _stream(spec, rank, world, fields=FIELDS):
    return open_split(spec, "train", resolution=16, fields=fields, augment="none", seed=3, rank=rank,
                      world=world).dataset


def test_webdataset_split_over_two_ranks_and_two_workers_without_overlap(tmp_path):
    good = write_shards(str(tmp_path), shards=4, per_shard=6, corrupt=[(1, 2)], no_caption=[(2, 0)])
    spec = str(tmp_path / "{00000..00003}.tar")
    seen, skipped = {}, {}
    for rank in range(2):
        split = open_eval(spec, resolution=16, fields=FIELDS, seed=3, rank=rank, world=2)
        from collections import Counter

        counts = Counter()
        keys = [k for b in eval_batches(split.dataset, 4, rank, 2, num_workers=2, skipped=counts) for k in b["key"]]
        seen[rank], skipped[rank] = keys, counts
        assert all(b["image"].shape[1:] == (3, 16, 16) for b in eval_batches(split.dataset, 4, rank, 2))
    assert not set(seen[0]) & set(seen[1])                      # no sample read by both ranks
    assert len(seen[0]) + len(seen[1]) == len(set(seen[0]) | set(seen[1]))  # nor twice by one
    assert sorted(seen[0] + seen[1]) == sorted(good)            # and none lost
    total = skipped[0] + skipped[1]
    assert total == {"corrupt_image": 1, "missing_caption": 1}


def test_webdataset_fewer_shards_than_streams_splits_samples(tmp_path):
    good = write_shards(str(tmp_path), shards=1, per_shard=9)
    spec = str(tmp_path / "00000.tar")
    keys = []
    for rank in range(2):
        split = open_eval(spec, resolution=16, fields=FIELDS, seed=0, rank=rank, world=2)
        keys.append([k for b in eval_batches(split.dataset, 2, rank, 2, num_workers=2) for k in b["key"]])
    assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == sorted(good)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _ids(batches):
    return [tuple(b["key"]) if "key" in b else tuple(b["index"].tolist()) for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_continues_exactly(tmp_path, workers):
    write_shards(str(tmp_path), shards=4, per_shard=5, corrupt=[(0, 1)])
    spec = str(tmp_path / "{00000..00003}.tar")
    full = Loader(_stream(spec, 0, 1), 3, 0, 1, seed=3, num_workers=workers)
    reference = _ids(_take(full, 9))      # crosses a pass boundary (19 good samples per pass)
    first = Loader(_stream(spec, 0, 1), 3, 0, 1, seed=3, num_workers=workers)
    head = _ids(_take(first, 5))          # 5 batches: not a multiple of the worker count
    state = first.state_dict()
    resumed = Loader(_stream(spec, 0, 1), 3, 0, 1, seed=3, num_workers=workers)
    resumed.load_state_dict(state)
    assert head + _ids(_take(resumed, 4)) == reference
    assert resumed.skipped == full.skipped


def test_map_order_is_a_function_of_seed_epoch_step_and_ranks_tile_the_global_batch():
    one = EpochBatchSampler(100, 8, 0, 1, seed=5)
    halves = [EpochBatchSampler(100, 4, r, 2, seed=5) for r in range(2)]
    for m in (0, 11, 12, 30):             # 12 batches per epoch: m = 12 starts epoch 1
        assert one.keys(m) == halves[0].keys(m) + halves[1].keys(m)
    assert one.keys(0) != one.keys(12)    # a new permutation per epoch
    started = EpochBatchSampler(100, 8, 0, 1, seed=5, start=13)
    assert next(iter(started)) == one.keys(13)
    epoch = [i for m in range(12) for _, i in one.keys(m)]
    assert len(set(epoch)) == 96           # an epoch never repeats a sample


def test_map_loader_resume_with_workers():
    split = open_split("shapes", "train", resolution=16, fields=("image", "label"), augment="flip", seed=1)
    full = Loader(split.dataset, 4, 0, 1, seed=1, num_workers=2)
    ref = _take(full, 6)
    part = Loader(split.dataset, 4, 0, 1, seed=1, num_workers=2)
    _take(part, 3)
    resumed = Loader(split.dataset, 4, 0, 1, seed=1, num_workers=0)  # worker count does not matter here
    resumed.load_state_dict(part.state_dict())
    for a, b in zip(ref[3:], _take(resumed, 3)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def _folder(root, classes=("cat", "dog"), per=3, corrupt=None):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per):
            (root / c / f"{i}.jpg").write_bytes(jpeg(40 * i + len(c), size=(30, 40)))
    if corrupt:
        (root / corrupt).write_bytes(b"truncated")


def test_image_folder_classes_corrupt_files_and_layouts(tmp_path):
    _folder(tmp_path / "train", corrupt="dog/bad.png")
    _folder(tmp_path / "val", per=2)
    split = open_split(str(tmp_path), "train", resolution=24, fields=("image", "label"), augment="rrc", seed=0)
    assert split.class_names == ["cat", "dog"] and split.size == 7
    from collections import Counter

    counts = Counter()
    batches = list(eval_batches(split.dataset, 4, 0, 1, skipped=counts))
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert sorted(labels) == [0, 0, 0, 1, 1, 1] and counts == {"corrupt_image": 1}
    assert batches[0]["image"].shape[1:] == (3, 24, 24) and batches[0]["image"].dtype == torch.uint8
    val = open_eval(str(tmp_path), resolution=24, fields=("image", "label"), seed=0)
    assert val.size == 4                        # <root>/val is the held-out split
    unlabelled = tmp_path / "flat"
    unlabelled.mkdir()
    for i in range(3):
        (unlabelled / f"{i}.png").write_bytes(jpeg(i))
    flat = open_split(str(unlabelled), "train", resolution=8, fields=("image",), augment="none", seed=0)
    assert flat.class_names is None
    with pytest.raises(DataError, match="unlabelled ImageFolder"):
        open_split(str(unlabelled), "train", resolution=8, fields=("image", "label"), augment="none", seed=0)


@pytest.mark.parametrize("spec, match", [
    ("/nonexistent/imagenet", "no such directory"),
    ("/nonexistent/shards/{00000..00009}.tar", "10 of 10 WebDataset shards"),
    ("", "is empty"),
])
def test_missing_paths_are_clear_errors(spec, match):
    with pytest.raises(DataError, match=match):
        check(spec)


def test_augmentation_is_deterministic_per_sample():
    split = open_split("shapes", "train", resolution=32, fields=("image", "label"), augment="rrc", seed=4)
    a, b = split.dataset[(2, 17)], split.dataset[(2, 17)]
    assert torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], split.dataset[(3, 17)]["image"])  # a new draw next epoch
    assert np.array_equal(a["label"], b["label"])


# ---------------------------------------------------------------- data with no good sample at all

@pytest.mark.parametrize("workers", [0, 1])
def test_all_bad_stream_is_a_data_error_not_a_hang(tmp_path, workers):
    """Every sample lacks its caption: a whole pass yields nothing, and the next pass would be the same."""
    write_shards(str(tmp_path), shards=2, per_shard=3, no_caption=[(s, k) for s in range(2) for k in range(3)])
    loader = Loader(_stream(str(tmp_path / "{00000..00001}.tar"), 0, 1), 2, 0, 1, seed=0, num_workers=workers)
    with pytest.raises(DataError, match=r"whole pass .* without one good sample: skipped \{'missing_caption': "):
        next(iter(loader))


def test_stream_given_no_samples_is_a_data_error(tmp_path):
    """One 1-sample shard, two loader workers: the second reading stream is given nothing, forever."""
    write_shards(str(tmp_path), shards=1, per_shard=1)
    loader = Loader(_stream(str(tmp_path / "00000.tar"), 0, 1), 1, 0, 1, seed=0, num_workers=2)
    with pytest.raises(DataError, match="given no samples.*use fewer loader workers"):
        _take(loader, 3)


class _AllBad(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, key):
        return {"_bad": "corrupt_image"}


def test_all_bad_map_dataset_is_a_data_error_after_one_epoch():
    loader = Loader(_AllBad(), 4, 0, 1, seed=0)
    with pytest.raises(DataError, match=r"whole epoch \(3 batches of 4\).*'corrupt_image': 12"):
        next(iter(loader))


def test_loader_checks_the_stop_flag_while_skipping():
    from train.data.loader import StopRequested

    loader = Loader(_AllBad(), 4, 0, 1, seed=0)
    loader.should_stop = lambda: True
    with pytest.raises(StopRequested):
        next(iter(loader))
    assert loader.consumed == 1 and loader.skipped == {"corrupt_image": 4}


def test_kfe_train_on_all_bad_shards_exits_with_the_skip_counts(tmp_path, capsys):
    """The reported hang: `kfe train clip` on shards whose samples all lack captions ran for 10+ minutes."""
    from train.cli import main as kfe_main

    write_shards(str(tmp_path / "bad"), shards=2, per_shard=3, no_caption=[(s, k) for s in range(2) for k in range(3)])
    argv = ["train", "clip", "--preset", "shapes", "--data", str(tmp_path / "bad" / "{00000..00001}.tar"),
            "--steps", "3", "--batch_size", "4", "--num_workers", "1", "--progress", "false",
            "--out", str(tmp_path / "run")]
    assert kfe_main(argv) == 2
    err = capsys.readouterr().err
    assert "without one good sample" in err and "missing_caption" in err


def test_training_stream_splits_over_two_torchrun_processes_without_overlap(tmp_path):
    """Two real processes (torchrun, gloo) x two loader workers read the training stream: in one pass the
    ranks' samples are disjoint and together all good samples; the corrupt member and the one without a
    caption are counted once (placed mid-shard, their counts ride on the same pass's next sample)."""
    import json
    import subprocess
    import sys

    from tests.train.util import ROOT, env

    good = write_shards(str(tmp_path), shards=5, per_shard=4, corrupt=[(1, 1)], no_caption=[(3, 2)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "train", "wds_ranks.py"), str(tmp_path / "{00000..00004}.tar"), str(tmp_path)]
    r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    keys = [rank["keys"] for rank in ranks]
    assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1])       # both read, no sample by both
    assert sorted(keys[0] + keys[1]) == sorted(good)                     # none twice, none lost
    assert ranks[0]["streams"] == [0, 1] and ranks[1]["streams"] == [2, 3]  # 2 ranks x 2 workers
    total = Counter(ranks[0]["skipped"]) + Counter(ranks[1]["skipped"])
    assert total == {"corrupt_image": 1, "missing_caption": 1}
