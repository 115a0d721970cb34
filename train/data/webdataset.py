"""WebDataset tar shards (as img2dataset writes them): image + caption samples, streamed.

A sample is the run of consecutive tar members sharing a key (the member path up to the first dot of
its basename): `000123.jpg` + `000123.txt` (+ `000123.json`, `000123.cls`). Shard lists use brace
expansion: `data/{00000..00099}.tar`. Only local files are read (a missing shard is an error before
anything is built).

Splitting: the stream is infinite, made of passes over the shards. Pass p visits the shards in a
permutation drawn from (seed, p). Every (rank, worker) pair is one of S = world * workers logical
streams; with at least S shards, stream s reads shards s, s + S, ... of the pass; with fewer, every
stream reads every shard and keeps member k of shard j when (j + k) % S == s. Either way no sample is
read by two streams in a pass. Samples are not shuffled inside a shard (img2dataset shards are
already in random order); shuffle across passes comes from the shard permutation.

Position: a stream's position is (pass, shard within its list, members consumed in that shard). A
batch carries its stream's position after it, so a checkpoint records where each stream stands and a
resumed stream seeks straight there (tar headers are skipped without reading the payloads).

Bad data: an undecodable image (`corrupt_image`), a sample without a required caption
(`missing_caption`) or label (`missing_label`), a truncated/corrupt shard (`corrupt_shard`, the rest
of that shard is dropped) are skipped and counted; the count rides on the next batch of the stream.
A training stream that reads a whole pass without one good sample would loop forever (the next pass
holds the same bad samples): it ends with a `_fatal` marker instead, which the Loader raises as a
DataError with the skip counts.
"""
from __future__ import annotations

import json
import os
import tarfile
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from train import tarfiles
from train.data.transforms import BadSample, decode_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "json")


def expand_shards(spec: str) -> list[str]:
    """'data/{00000..00099}.tar' (several specs may be joined with '::') -> list of paths."""
    from braceexpand import braceexpand

    out = []
    for part in spec.split("::"):
        out += list(braceexpand(part))
    return out


def check_shards(spec: str) -> list[str]:
    shards = expand_shards(spec)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} WebDataset shards of {spec!r} do not exist "
                                f"(first: {', '.join(missing[:3])})")
    return shards


def _split_key(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def iter_tar(path: str, skip: int = 0) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Yield (member index, key, {ext: bytes}) per sample; payloads of the first `skip` are not read.

    A read error ends the shard with one (index, key, None) item (the caller counts `corrupt_shard`); so
    does a shard that stops without its end-of-archive block (cut), and then its last sample, which may
    lack members, is not yielded.
    """
    index, key, parts = -1, None, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tarfiles.members(tar, path):
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if k != key:
                    if key is not None and index >= skip:
                        yield index, key, parts
                    index, key, parts = index + 1, k, {}
                if index >= skip:
                    parts[ext] = tar.extractfile(member).read()
            if key is not None and index >= skip:
                yield index, key, parts
    except (tarfile.TarError, OSError, EOFError) as err:
        yield index + 1, f"{path}: {err}", None


def _caption(parts: dict[str, bytes]) -> str | None:
    if "txt" in parts:
        return parts["txt"].decode("utf-8", errors="replace").strip() or None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (ValueError, UnicodeDecodeError):
            return None
        cap = meta.get("caption") if isinstance(meta, dict) else None
        return cap.strip() or None if isinstance(cap, str) else None
    return None


def _label(parts: dict[str, bytes]) -> int | None:
    for ext in ("cls", "label"):
        if ext in parts:
            try:
                return int(parts[ext].decode().strip())
            except ValueError:
                return None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
            return int(meta["label"]) if isinstance(meta, dict) and "label" in meta else None
        except (ValueError, TypeError, KeyError):
            return None
    return None


def decode_sample(key: str, parts: dict[str, bytes], fields: tuple[str, ...]) -> dict:
    """{ext: bytes} -> {"image": PIL, "caption", "label", "key"}; raises BadSample for what must be skipped."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise BadSample("missing_image", key)
    caption, label = _caption(parts), _label(parts)
    if "caption" in fields and caption is None:
        raise BadSample("missing_caption", key)
    if "label" in fields and label is None:
        raise BadSample("missing_label", key)
    return {"image": decode_image(parts[ext], key), "caption": caption or "",
            "label": -1 if label is None else label, "key": key}


class WebDatasetStream(IterableDataset):
    """Infinite (or one-pass, loop=False) stream of decoded, transformed samples for one rank.

    Args:
        shards: shard paths (see expand_shards).
        fields: what a sample must have ("image" always; "caption", "label" as the recipe needs).
        transform: (PIL image, rng) -> tensor; rng is seeded from (seed, pass, shard, member).
        rank, world: this process among the data-parallel processes.
        seed: shard order per pass.
        loop: False = one pass (evaluation), True = endless passes (training).
    Resume: `positions` (stream id -> (pass, shard, member)) and `offset` (which logical stream the
    DataLoader's worker 0 serves first) are set by train.data.loader.Loader from a checkpoint.
    """

    def __init__(self, shards: list[str], fields: tuple[str, ...], transform: Callable, rank: int = 0,
                 world: int = 1, seed: int = 0, loop: bool = True):
        super().__init__()
        self.shards, self.fields, self.transform = list(shards), tuple(fields), transform
        self.rank, self.world, self.seed, self.loop = rank, world, seed, loop
        self.positions: dict[int, tuple[int, int, int]] = {}
        self.offset = 0

    def _plan(self, pass_: int, stream: int, streams: int) -> tuple[list[int], Callable[[int, int], bool]]:
        order = np.random.default_rng([self.seed, pass_]).permutation(len(self.shards)) if self.loop \
            else np.arange(len(self.shards))
        if len(self.shards) >= streams:
            return [int(j) for j in order[stream::streams]], lambda j, k: True
        return [int(j) for j in order], lambda j, k: (j + k) % streams == stream

    def __iter__(self):
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        logical = (wid + self.offset) % workers
        stream, streams = self.rank * workers + logical, self.world * workers
        pass_, start_shard, start_member = self.positions.get(stream, (0, 0, 0))
        skipped: dict[str, int] = {}
        while True:
            mine, keep = self._plan(pass_, stream, streams)
            good, pass_skipped = 0, {}
            for si in range(start_shard, len(mine)):
                j = mine[si]
                skip = start_member if si == start_shard else 0
                for k, key, parts in iter_tar(self.shards[j], skip):
                    pos = (pass_, si, k + 1)
                    if parts is None:
                        skipped["corrupt_shard"] = skipped.get("corrupt_shard", 0) + 1
                        pass_skipped["corrupt_shard"] = pass_skipped.get("corrupt_shard", 0) + 1
                        continue
                    if not keep(si, k):
                        continue
                    try:
                        sample = decode_sample(key, parts, self.fields)
                        rng = np.random.default_rng([self.seed, pass_, j, k])
                        sample["image"] = self.transform(sample["image"], rng)
                    except BadSample as bad:
                        skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
                        pass_skipped[bad.reason] = pass_skipped.get(bad.reason, 0) + 1
                        continue
                    sample.update(_stream=stream, _pos=pos, _skipped=skipped)
                    skipped, good = {}, good + 1
                    yield sample
            if not self.loop:
                if skipped:  # report what the tail of the pass dropped
                    yield {"_bad": None, "_stream": stream, "_pos": (pass_ + 1, 0, 0), "_skipped": skipped}
                return
            if not good and start_shard == 0 and start_member == 0:  # a whole pass: nothing good, ever
                yield {"_bad": None, "_stream": stream, "_pos": (pass_ + 1, 0, 0), "_skipped": skipped,
                       "_fatal": self._empty_pass(stream, streams, mine, pass_skipped)}
                return
            pass_, start_shard, start_member = pass_ + 1, 0, 0

    def _empty_pass(self, stream: int, streams: int, mine: list[int], skipped: dict[str, int]) -> str:
        where = (f"data stream {stream} of {streams} (rank {self.rank}) read a whole pass over its {len(mine)} "
                 f"of {len(self.shards)} shard(s) (first: {self.shards[mine[0]] if mine else 'none'})")
        if skipped:
            return f"{where} without one good sample: skipped {skipped}"
        return (f"{where} and was given no samples: the shards hold fewer samples than the {streams} reading "
                "streams (processes x num_workers); use fewer loader workers")
