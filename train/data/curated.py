"""`kfe curate metaclip` output as a training stream: `--data CURATED_DIR` trains on the kept pairs.

A curation directory holds curated.jsonl (one kept pair per line: {"id": ..., "entries": [...]}) and
_work/job.json (the pool's shard list and the id / text fields the ids were made with). The images live
in the pool's WebDataset shards, so those are streamed (train/data/webdataset.py, with its shard order,
resume positions and per-rank split) and every sample that is not a kept pair is passed over. A pair's
id is what curation named it: the pool's id field (read from the sample's .json member), or
`<shard path>:<record offset>` when curation ran with --id-field ''. The kept set is resolved to
(shard, record offset) once at start; ids come from train.curation.pool's reader, the one curation
used, so the two agree on record offsets and id text.
"""
from __future__ import annotations

import json
import os

from train.data.transforms import DataError
from train.data.webdataset import WebDatasetStream

MARKER = "curated.jsonl"


def is_curated(spec: str) -> bool:
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, MARKER))


def kept_offsets(folder: str) -> tuple[list[str], dict[int, set[int]]]:
    """(pool shards, {shard index: record offsets of the kept pairs}) of a curation directory."""
    job_path = os.path.join(folder, "_work", "job.json")
    if not os.path.isfile(job_path):
        raise DataError(f"{folder!r}: no _work/job.json (the pool's shard list); curated.jsonl alone does not say "
                        "where the images are: rerun `kfe curate metaclip` with the same --out")
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    shards, id_field, text_field = job["shards"], job.get("id_field"), job.get("text_field", "text")
    not_tar = [s for s in shards if not s.endswith((".tar", ".tar.gz", ".tgz"))]
    if not_tar:
        raise DataError(f"{folder!r} was curated from a pool without images ({not_tar[0]!r}): training needs a "
                        "WebDataset (.tar) pool, whose samples carry the images")
    kept = set()
    with open(os.path.join(folder, MARKER), encoding="utf-8", errors="surrogatepass") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:  # the id's JSON text, as curation wrote and compares it
                    kept.add(json.dumps(json.loads(line)["id"], ensure_ascii=False, sort_keys=True,
                                        separators=(",", ":")))
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{folder}/{MARKER}:{n}: not a curated pair line: {line.strip()[:80]!r}") from None
    if not kept:
        raise DataError(f"{folder}/{MARKER} keeps no pairs: nothing to train on")
    from train.curation import pool as pool_mod
    from train.curation.metaclip import _id_json

    offsets: dict[int, set[int]] = {}
    found = 0
    for i, shard in enumerate(shards):
        if not os.path.isfile(shard):
            raise DataError(f"{folder!r}: pool shard {shard!r} is gone; the curated pairs' images are in it")
        for batch in pool_mod.read_shard(shard, text_field, id_field, 4096):
            for rid, off in zip(batch.ids, batch.offsets):
                if _canonical(_id_json(rid, shard, off)) in kept:
                    offsets.setdefault(i, set()).add(int(off))
                    found += 1
    if found != len(kept):
        raise DataError(f"{folder!r}: {len(kept) - found} of the {len(kept)} curated pairs are not in the pool "
                        "shards listed in _work/job.json (was the pool changed after curation?)")
    return shards, offsets


def _canonical(id_json: str) -> str:
    return json.dumps(json.loads(id_json), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


class CuratedStream(WebDatasetStream):
    """WebDatasetStream over the pool's shards that yields only the kept pairs."""

    def __init__(self, shards: list[str], kept: dict[int, set[int]], *args, **kw):
        super().__init__(shards, *args, **kw)
        self.kept = kept
        self.size = sum(len(v) for v in kept.values())

    def _plan(self, pass_: int, stream: int, streams: int):
        mine, share = super()._plan(pass_, stream, streams)
        kept = self.kept

        def keep(si: int, k: int) -> bool:
            return k in kept.get(mine[si], ()) and share(si, k)
        return mine, keep


def open_curated(folder: str, fields, transform, rank: int, world: int, seed: int) -> CuratedStream:
    shards, kept = kept_offsets(folder)
    return CuratedStream(shards, kept, fields, transform, rank, world, seed, loop=True)
