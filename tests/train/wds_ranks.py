"""Run by test_data.py under torchrun: this rank's training stream (the Loader, 2 workers) for one pass.

Writes {"keys", "skipped", "streams"} for pass 0 of every logical stream of this rank to argv[2]/rank<R>.json.
Batches of one sample: a batch's stream position then names exactly that sample's pass."""
import json
import os
import sys
from collections import Counter

from train import dist as dist_mod
from train.data import open_split
from train.data.loader import Loader

WORKERS = 2

info = dist_mod.init("cpu")
spec, out = sys.argv[1], sys.argv[2]
split = open_split(spec, "train", resolution=16, fields=("image", "caption"), augment="none", seed=3,
                   rank=info.rank, world=info.world)
loader = Loader(split.dataset, 1, info.rank, info.world, seed=3, num_workers=WORKERS)
keys, skipped, streams, done = [], Counter(), set(), set()
positions, seen_skips = {}, Counter()
batches = iter(loader)
while len(done) < WORKERS:  # until each of this rank's streams has begun its second pass
    batch = next(batches)
    (stream,) = [s for s, p in loader.positions.items() if positions.get(s) != p]  # the stream that moved
    positions = dict(loader.positions)
    new_skips, seen_skips = loader.skipped - seen_skips, Counter(loader.skipped)
    streams.add(stream)
    if positions[stream][0] == 0:
        keys += batch["key"]
        skipped += new_skips
    else:
        done.add(stream)
with open(os.path.join(out, f"rank{info.rank}.json"), "w") as f:
    json.dump({"keys": keys, "skipped": dict(skipped), "streams": sorted(streams)}, f)
dist_mod.shutdown()
