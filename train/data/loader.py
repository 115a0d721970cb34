"""Resumable loaders: the data order is a pure function of (seed, epoch, step), never of history.

Map-style datasets (shapes, ImageFolder): micro-batch m of the run covers epoch e = m // B_e, batch
b = m % B_e of that epoch, where B_e = len(dataset) // global_batch (the ragged tail is dropped). The
epoch's order is a permutation drawn from (seed, e); the global batch is perm[b*G:(b+1)*G] and rank r
takes its r-th slice of `batch` samples, so N processes on batch B see exactly what one process sees
on batch N*B. Each sample's augmentation rng is seeded from (seed, e, index). Resuming at micro-batch
m just starts the sampler at m: nothing is replayed.

Streams (WebDataset): see train.data.webdataset; the loader records each logical stream's position
from the batches it hands out, and on resume rotates the workers so that the stream whose turn it was
is served first (the DataLoader asks its workers round-robin, starting at worker 0).

Bad samples are dropped from their batch (a map-style batch can come out smaller) and counted;
`Loader.skipped` is this process's running total, saved in checkpoints. Data with no good sample at all
would be skipped forever: a whole epoch of empty batches (map-style; the same samples are bad in every
epoch) or a stream's whole pass without a good sample raises DataError with the counts instead.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from train.data.transforms import BadSample, DataError
from train.data.webdataset import WebDatasetStream

SKIP_REASONS = ("corrupt_image", "missing_caption", "missing_label", "missing_image", "corrupt_shard",
                "unreadable_file")


class StopRequested(BaseException):
    """SIGTERM while waiting for data (a BaseException, like KeyboardInterrupt: no `except Exception` in a
    library swallows it). `checkpoint`: whether the steps done so far can be saved exactly (set by the
    trainer)."""

    checkpoint = False


class Transformed(Dataset):
    """Map-style view: key (epoch, index) -> transformed sample, or {"_bad": reason} for a bad one."""

    def __init__(self, base, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            sample = dict(self.base[index])
            sample["image"] = self.transform(sample["image"], np.random.default_rng([self.seed, epoch, index]))
        except BadSample as bad:
            return {"_bad": bad.reason}
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack good samples; meta: skipped counts, and for streams the stream id and its position."""
    good = [s for s in samples if "_bad" not in s]
    skipped = Counter(s["_bad"] for s in samples if s.get("_bad"))
    for s in samples:
        skipped.update(s.get("_skipped", {}))
    batch: dict = {}
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["label"] = torch.tensor([s.get("label", -1) for s in good], dtype=torch.long)
        batch["caption"] = [s.get("caption", "") for s in good]
        if "index" in good[0]:
            batch["index"] = torch.tensor([s["index"] for s in good], dtype=torch.long)
        if "key" in good[0]:
            batch["key"] = [s["key"] for s in good]
    meta = {"skipped": dict(skipped)}
    if "_stream" in samples[-1]:
        meta.update(stream=samples[-1]["_stream"], pos=samples[-1]["_pos"])
    fatal = [s["_fatal"] for s in samples if s.get("_fatal")]
    if fatal:
        meta["fatal"] = fatal[0]
    batch["_meta"] = meta
    return batch


class EpochBatchSampler:
    """Infinite batches of (epoch, index) keys for one rank, starting at micro-batch `start`."""

    def __init__(self, size: int, batch: int, rank: int, world: int, seed: int, start: int = 0):
        self.global_batch = batch * world
        if size < self.global_batch:
            raise ValueError(f"the dataset has {size} samples, fewer than one global batch of {self.global_batch}")
        self.size, self.batch, self.rank, self.seed, self.start = size, batch, rank, seed, start
        self.per_epoch = size // self.global_batch

    def keys(self, m: int) -> list[tuple[int, int]]:
        epoch, b = divmod(m, self.per_epoch)
        perm = _permutation(self.seed, epoch, self.size)
        lo = b * self.global_batch + self.rank * self.batch
        return [(epoch, int(i)) for i in perm[lo:lo + self.batch]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        m = self.start
        while True:
            yield self.keys(m)
            m += 1


_PERM_CACHE: dict = {}


def _permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    key = (seed, epoch, size)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()  # one epoch at a time
        _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(size)
    return _PERM_CACHE[key]


class Loader:
    """The training loader of one rank: iterate for batches; state_dict()/load_state_dict() to resume.

    Args:
        dataset: a map-style dataset (wrapped with Transformed) or a WebDatasetStream.
        batch: samples per micro-batch on this rank.
    """

    def __init__(self, dataset, batch: int, rank: int, world: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, prefetch: int = 4):
        self.dataset, self.batch, self.rank, self.world, self.seed = dataset, batch, rank, world, seed
        self.num_workers, self.pin_memory, self.prefetch = num_workers, pin_memory, prefetch
        self.stream = isinstance(dataset, WebDatasetStream)
        self.consumed = 0            # micro-batches handed out by this rank
        self.positions: dict[int, tuple[int, int, int]] = {}
        self.skipped: Counter = Counter()
        self.should_stop = lambda: False  # the trainer's stop flag, checked while skipping bad batches
        if not self.stream:
            self.sampler = EpochBatchSampler(len(dataset), batch, rank, world, seed)

    @property
    def batches_per_epoch(self) -> int | None:
        return None if self.stream else self.sampler.per_epoch

    def epoch(self) -> float | None:
        return None if self.stream else self.consumed / self.sampler.per_epoch

    def _dataloader(self) -> DataLoader:
        # Own generator: creating a DataLoader iterator draws a worker base seed, which must not move the
        # global RNG (drop path, Mixup) between an uninterrupted and a resumed run.
        kw = dict(num_workers=self.num_workers, collate_fn=collate, pin_memory=self.pin_memory,
                  generator=torch.Generator().manual_seed(self.seed))
        if self.num_workers > 0:
            kw.update(prefetch_factor=self.prefetch, persistent_workers=False)
        if self.stream:
            self.dataset.positions = dict(self.positions)
            self.dataset.offset = self.consumed % max(self.num_workers, 1)
            return DataLoader(self.dataset, batch_size=self.batch, **kw)
        self.sampler.start = self.consumed
        return DataLoader(self.dataset, batch_sampler=self.sampler, **kw)

    def __iter__(self) -> Iterator[dict]:
        empty = 0  # consecutive batches without a good sample
        for batch in self._dataloader():
            meta = batch.pop("_meta")
            self.skipped.update(meta["skipped"])
            if meta.get("fatal"):
                raise DataError(f"{meta['fatal']}; skipped on this process so far: {dict(self.skipped)}")
            if "stream" in meta:
                self.positions[meta["stream"]] = tuple(meta["pos"])
            self.consumed += 1
            if "image" in batch:  # a batch whose samples were all bad is counted, then passed over
                empty = 0
                yield batch
                continue
            empty += 1
            if self.should_stop():
                raise StopRequested(f"stopped while skipping bad data ({empty} empty batches in a row)")
            if not self.stream and empty >= self.sampler.per_epoch:
                raise DataError(f"a whole epoch ({empty} batches of {self.batch}) without one good sample: "
                                f"skipped {dict(self.skipped)}")

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "positions": {int(k): list(v) for k, v in self.positions.items()},
                "skipped": dict(self.skipped), "stream": self.stream, "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        if state["stream"] != self.stream:
            raise ValueError("checkpoint data state is for a different kind of dataset (stream vs map)")
        if self.stream and state["num_workers"] != self.num_workers and state["positions"]:
            raise ValueError(f"a stream's position depends on the worker count: the checkpoint used "
                             f"num_workers={state['num_workers']}, this run {self.num_workers}")
        self.consumed = int(state["consumed"])
        self.positions = {int(k): tuple(v) for k, v in state["positions"].items()}
        self.skipped = Counter(state["skipped"])


HELD_OUT_SKIPPED: Counter = Counter()  # every eval_batches pass of this process adds here (Trainer.evaluate reads it)


def eval_batches(dataset, batch: int, rank: int, world: int, num_workers: int = 0,
                 skipped: Counter | None = None, limit: int | None = None) -> Iterator[dict]:
    """One finite pass for evaluation: map-style datasets are split rank::world; a stream (built with
    loop=False for this rank) splits itself. Bad samples are skipped and added to `skipped`.
    `limit`: only the first `limit` samples (map-style) / about limit / world per rank (streams)."""
    kw = dict(num_workers=num_workers, collate_fn=collate)
    if isinstance(dataset, WebDatasetStream):
        loader = DataLoader(dataset, batch_size=batch, **kw)
        if limit is not None:
            loader = _take(loader, -(-limit // (world * batch)))
    else:
        n = len(dataset) if limit is None else min(limit, len(dataset))
        keys = [(0, k) for k in range(rank, n, world)]
        chunks = [keys[i:i + batch] for i in range(0, len(keys), batch)]
        loader = DataLoader(dataset, batch_sampler=chunks, **kw)
    for b in loader:
        meta = b.pop("_meta")
        if skipped is not None:
            skipped.update(meta["skipped"])
        HELD_OUT_SKIPPED.update(meta["skipped"])
        if "image" in b:
            yield b


def _take(iterable, n: int):
    for i, item in enumerate(iterable):
        if i >= n:
            return
        yield item
