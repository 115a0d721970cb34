"""MetaCLIP curation of a raw image-text pool (Demystifying CLIP Data, arXiv 2309.16671, Alg. 1).

    curate(metadata, pool, out, t=20000)      # kfe curate metaclip --metadata M --pool P --out DIR

Pass 1 matches every pair's text against the metadata (`Matcher`, see matching.py) and writes, per
shard, the matched pairs' ids and entry indices (atomically: a crash resumes from the finished
shards); the per-entry match counts are summed over the pool (all-reduced across torchrun ranks).
Pass 2 balances each shard with the global counts (balance.py) and rank 0 concatenates the kept
pairs in shard order, so the output does not depend on the number of workers or ranks.

Pair ids (the id field, or <shard>:<offset> without one) must be unique over the pool: the balancing
coins are a function of the id, so two pairs with one id would be kept or dropped together and be
indistinguishable in curated.jsonl. A repeated id among the matched pairs is a DataError (found in
pass 1 within a shard, then over the whole pool by the 64-bit id hashes in bounded memory). Unmatched
pairs never reach the output and are not checked. A pool where no shard can be read is a DataError.

Parallelism: `workers` processes per rank over shards (fork, so the matcher is built once); under
`torchrun --nproc_per_node=N` (many nodes: DIR on a shared filesystem) rank r takes shards
r, r + N, ... and counts are all-reduced over gloo.

DIR/_work keeps the per-shard results: job.json (what was run: metadata hash, shard list, fields),
pass1/<shard>.npz, pass2-<key>/<shard>.{jsonl,npz} (key = hash of t, seed and the counts).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from train.curation import balance as _balance
from train.curation import pool as _pool
from train.curation import report as _report
from train.curation._dist import Dist
from train.curation.matching import Matcher, OfficialMatcher, match_reference, spacing
from train.curation.metadata import load_metadata
from train.curation.pool import DataError

__all__ = ["DataError", "Matcher", "OfficialMatcher", "curate", "load_metadata", "match_reference", "spacing"]

FORMAT_VERSION = 2


@dataclass
class _Job:
    shards: list[str]
    work: str
    text_field: str
    id_field: str | None
    batch_size: int
    t: float = 0.0
    seed: int = 0
    matcher: Matcher | None = None
    counts: tuple | None = field(default=None, repr=False)  # (pass-2 folder, its counts.npy, memory-mapped)


_JOB: _Job | None = None  # the job of this process (set before forking workers, or by _init_worker)


def _p1_path(job: _Job, i: int) -> str:
    return os.path.join(job.work, "pass1", f"{i:06d}.npz")


def _atomic_npz(path: str, **arrays) -> None:
    with _report.temporary(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def _id_json(record_id, shard: str, offset: int) -> str:
    if record_id is None:
        record_id = f"{shard}:{offset}"
    try:
        return json.dumps(record_id, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):  # e.g. bytes ids from a binary Parquet column
        return json.dumps(str(record_id), ensure_ascii=False)


def _count_shard(i: int) -> tuple:
    """Pass 1 on shard i: match every text, keep the matched pairs. ('ok'|'bad'|'error', i, info)."""
    job = _JOB
    path = job.shards[i]
    ids, entries, per_pair = [], [], []
    n_pairs = n_null = 0
    try:
        for batch in _pool.read_shard(path, job.text_field, job.id_field, job.batch_size):
            n_pairs += len(batch)
            rows = [k for k, text in enumerate(batch.texts) if text is not None]
            n_null += len(batch) - len(rows)
            flat, counts = job.matcher.match_flat([batch.texts[k] for k in rows])
            hit = np.flatnonzero(counts)
            ids += [_id_json(batch.ids[rows[k]], path, batch.offsets[rows[k]]) for k in hit.tolist()]
            entries.append(flat)
            per_pair.append(counts[hit])
    except DataError as err:
        return "error", i, str(err)
    except _pool.UNREADABLE as err:
        return "bad", i, f"{type(err).__name__}: {err}"
    if len(set(ids)) < len(ids):  # fail fast; _duplicate_ids checks the whole pool after pass 1
        seen = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        return "error", i, f"{path}: {_DUPLICATE.format(id=dup, where='twice in this shard')}"
    entries = np.concatenate(entries) if entries else np.zeros(0, np.int32)
    uniq, uniq_counts = np.unique(entries, return_counts=True)
    _atomic_npz(_p1_path(job, i), entries=entries.astype(np.int32),
                per_pair=(np.concatenate(per_pair) if per_pair else np.zeros(0, np.int32)).astype(np.int32),
                pair_hash=_balance.id_hashes(ids), ids=np.frombuffer("\n".join(ids).encode("utf-8", "surrogatepass"),
                                                                     dtype=np.uint8),
                uniq=uniq.astype(np.int64), uniq_counts=uniq_counts.astype(np.int64),
                stats=np.array([n_pairs, n_null, len(ids)], dtype=np.int64))
    return "ok", i, n_pairs


_DUPLICATE = ("pair id {id} occurs {where}: ids must be unique over the whole pool (a pair's balancing coins "
              "are a function of its id, and curated.jsonl names pairs by it); fix the ids, or identify pairs "
              "by <shard>:<offset> with --id-field '' (and --fresh)")
_DUP_BUCKET = 1 << 25  # id hashes held at once by the duplicate check (256 MB)


def _duplicate_ids(job: _Job, shards: list[int], n_matched: int, dist: Dist) -> str | None:
    """Collective: the error message when a pair id occurs twice among the matched pairs of the pool
    (only they reach the output), else None. The 64-bit id hashes of pass 1 are split by value into
    buckets of <= _DUP_BUCKET, ranks take every world-th bucket; a repeated hash is confirmed on the
    id texts (two different ids may share a hash)."""
    n_buckets = max(dist.world, -(-n_matched // _DUP_BUCKET))
    found = np.zeros(0, dtype=np.uint64)
    for b in range(dist.rank, n_buckets, dist.world):
        part = [h[h % np.uint64(n_buckets) == b] for h in _pass1_arrays(job, shards, "pair_hash")]
        h = np.sort(np.concatenate(part)) if part else np.zeros(0, dtype=np.uint64)
        found = np.union1d(found, h[1:][h[1:] == h[:-1]])
    hits: dict[str, list[int]] = {}  # id -> shards, for the repeated hashes
    if len(found):
        for i, h in zip(shards, _pass1_arrays(job, shards, "pair_hash")):
            rows = np.flatnonzero(np.isin(h, found)).tolist()
            if rows:
                with np.load(_p1_path(job, i)) as d:
                    ids = d["ids"].tobytes().decode("utf-8", "surrogatepass").split("\n")
                for r in rows:
                    hits.setdefault(ids[r], []).append(i)
    dups = {k: v for k, v in hits.items() if len(v) > 1}
    if not dups:
        return None
    pid, where = min(dups.items(), key=lambda kv: kv[1])
    names = ", ".join(repr(job.shards[i]) for i in sorted(set(where))[:3])
    more = f"; {len(dups) - 1} more ids are repeated" if len(dups) > 1 else ""
    return _DUPLICATE.format(id=pid, where=f"{len(where)} times (shards {names}){more}")


def _pass1_arrays(job: _Job, shards: list[int], name: str):
    for i in shards:
        with np.load(_p1_path(job, i)) as d:
            yield d[name]


def _load_pass1(job: _Job, i: int):
    try:
        with np.load(_p1_path(job, i)) as d:
            return {k: d[k] for k in d.files}
    except (OSError, ValueError, EOFError):
        return None


def _balance_shard(i: int, pass2: str) -> tuple:
    """Pass 2 on shard i: keep pairs by the global counts; write the kept lines and their entries."""
    job = _JOB
    base = os.path.join(pass2, f"{i:06d}")
    if os.path.exists(base + ".npz"):  # finished before a restart
        return "ok", i, None
    if job.counts is None or job.counts[0] != pass2:  # workers were forked before the counts existed
        job.counts = (pass2, np.load(os.path.join(pass2, "counts.npy"), mmap_mode="r"))
    d = _load_pass1(job, i)
    if d is None:
        return "error", i, f"pass-1 result of shard {job.shards[i]!r} vanished or is corrupt; rerun with --fresh"
    coins = _balance.coins(d["entries"], d["per_pair"], d["pair_hash"], job.counts[1], job.t, job.seed)
    keep = _balance.balance(d["entries"], d["per_pair"], d["pair_hash"], job.counts[1], job.t, job.seed, coins)
    ids = d["ids"].tobytes().decode("utf-8", "surrogatepass").split("\n") if len(keep) else []
    bounds = np.concatenate([[0], np.cumsum(d["per_pair"])]).tolist()
    entries = d["entries"].tolist()
    with _report.temporary(base + ".jsonl") as tmp, open(tmp, "w", encoding="utf-8", errors="surrogatepass") as f:
        for p in np.flatnonzero(keep).tolist():
            # a list of ints prints as its JSON array; ids are JSON text already
            f.write(f'{{"id": {ids[p]}, "entries": {entries[bounds[p]:bounds[p + 1]]}}}\n')
    uniq, uniq_counts = np.unique(d["entries"][np.repeat(keep, d["per_pair"])], return_counts=True)
    own, own_counts = np.unique(d["entries"][coins], return_counts=True)
    _atomic_npz(base + ".npz", uniq=uniq.astype(np.int64), uniq_counts=uniq_counts.astype(np.int64),
                own=own.astype(np.int64), own_counts=own_counts.astype(np.int64),
                stats=np.array([int(keep.sum())], dtype=np.int64))
    return "ok", i, None


def _init_worker(spawned: tuple | None) -> None:
    global _JOB
    if spawned is not None:  # spawn: rebuild what fork would have inherited
        job, entries, backend = spawned
        _JOB = dataclasses.replace(job, matcher=Matcher(entries, backend=backend))


def _run(fn, indices: list[int], pool, desc: str, progress: bool, total: int, done: int) -> list[tuple]:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, desc=desc, unit="shard", disable=not progress, file=sys.stderr)
    results = []
    it = pool.imap_unordered(fn, indices) if pool is not None else map(fn, indices)
    for result in it:
        results.append(result)
        bar.update(1)
        if result[0] == "error":
            break
    bar.close()
    return results


def _prepare_work(out: str, job: _Job, metadata_sha: str, fresh: bool) -> None:
    """Rank 0: create DIR/_work or check that it holds this job (for resuming)."""
    ident = {"format": FORMAT_VERSION, "metadata_sha256": metadata_sha, "shards": job.shards,
             "text_field": job.text_field, "id_field": job.id_field}
    path = os.path.join(job.work, "job.json")
    if fresh and os.path.isdir(job.work):
        shutil.rmtree(job.work)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) != ident:
                raise ValueError(f"{out!r} holds the work of a different curation job (metadata, pool or fields "
                                 "differ); pass --fresh to discard it, or choose another --out")
    os.makedirs(os.path.join(job.work, "pass1"), exist_ok=True)
    _report.remove_temporaries(out)  # e.g. curated.jsonl.tmp<pid> of a run killed while merging
    for name in os.listdir(os.path.join(job.work, "pass1")):  # partial writes of a crashed run
        if ".tmp" in name:
            os.remove(os.path.join(job.work, "pass1", name))
    if not os.path.exists(path):
        _report.write_json(path, ident)


def curate(metadata, pool, out: str, t: float = 20000, seed: int = 0, workers: int | None = None,
           text_field: str = "text", id_field: str | None = "id", batch_size: int = 4096, backend: str = "auto",
           fresh: bool = False, progress: bool = False) -> dict:
    """Curate `pool` with `metadata` (a path or a list of entries) into DIR `out`; returns the summary.

    Same result for any `workers` and any number of torchrun ranks. See the module doc."""
    if not t > 0:
        raise ValueError(f"t must be > 0, got {t}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (processes per rank), got {workers}")
    clock = {"start": time.perf_counter()}
    dist = Dist()
    entries = load_metadata(metadata) if isinstance(metadata, (str, os.PathLike)) else list(metadata)
    shards = _pool.expand_pool(pool)
    job = _Job(shards, os.path.join(out, "_work"), text_field, id_field or None, batch_size, float(t), int(seed))
    job.matcher = Matcher(entries, backend=backend)  # validates the entries (empty metadata -> ValueError)
    clock["build"] = time.perf_counter()
    workers = workers if workers is not None else max(1, (os.cpu_count() or 1) // dist.local_world)
    mine = [i for i in range(len(shards)) if i % dist.world == dist.rank]
    workers = min(workers, max(1, len(mine)))
    global _JOB
    _JOB = job
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    spawned = None if ctx.get_start_method() == "fork" else (dataclasses.replace(job, matcher=None), entries,
                                                              job.matcher.backend)
    pool_ = ctx.Pool(workers, _init_worker, (spawned,)) if workers > 1 else None
    try:
        dist.init()
        progress = progress and dist.rank == 0
        metadata_sha = hashlib.sha256("\n".join(entries).encode("utf-8", "surrogatepass")).hexdigest()
        dist.check(dist.on_rank0(lambda: _prepare_work(out, job, metadata_sha, fresh)))
        # Pass 1: match and count, per shard; shards finished by an earlier run are kept.
        todo = [i for i in mine if _load_pass1(job, i) is None]
        results = _run(_count_shard, todo, pool_, "pass 1: match", progress, len(mine), len(mine) - len(todo))
        dist.check(next((r[2] for r in results if r[0] == "error"), None), DataError)
        bad = {r[1]: r[2] for r in results if r[0] == "bad"}
        counts = np.zeros(len(entries), dtype=np.int64)
        stats = np.zeros(3, dtype=np.int64)  # pool size, null texts, matched
        for i in mine:
            if i not in bad:
                d = _load_pass1(job, i)
                counts[d["uniq"]] += d["uniq_counts"]
                stats += d["stats"]
        clock["pass1"] = time.perf_counter()
        counts = dist.all_reduce_sum(counts)
        stats = dist.all_reduce_sum(stats)
        bad = {i: msg for part in dist.all_gather(bad) for i, msg in part.items()}
        if len(bad) == len(shards):  # e.g. a mistyped path: an empty curation would look like success
            first = bad[min(bad)]
            raise DataError(f"no shard of the pool could be read: all {len(shards)} failed, e.g. "
                            f"{shards[min(bad)]!r}: {first}")
        ok = [i for i in range(len(shards)) if i not in bad]
        dist.check(_duplicate_ids(job, ok, int(stats[2]), dist), DataError)
        clock["reduce"] = time.perf_counter()
        # Pass 2: balance every readable shard with the global counts.
        key = hashlib.blake2b(json.dumps([FORMAT_VERSION, job.t, job.seed]).encode() + counts.tobytes(),
                              digest_size=8).hexdigest()
        pass2 = os.path.join(job.work, f"pass2-{key}")
        dist.check(dist.on_rank0(lambda: _start_pass2(job.work, pass2, counts)))
        ok_mine = [i for i in mine if i not in bad]
        # what every rank did, for the summary (rank 0 writes it)
        per_rank = dist.all_gather((len(mine) - len(todo), workers))
        results = _run(functools.partial(_balance_shard, pass2=pass2), ok_mine, pool_, "pass 2: balance", progress,
                       len(ok_mine), 0)
        dist.check(next((r[2] for r in results if r[0] == "error"), None))
        dist.barrier()
        clock["pass2"] = time.perf_counter()
        summary = {
            "pool_size": int(stats[0]), "null_texts": int(stats[1]), "matched": int(stats[2]), "kept": None,
            "t": t, "seed": int(seed), "entries": len(entries),
            "shards": {"total": len(shards), "read": len(shards) - len(bad), "unreadable": len(bad)},
            "unreadable_shards": [{"path": shards[i], "error": bad[i]} for i in sorted(bad)],
            "resumed_shards": sum(r for r, _ in per_rank), "workers_per_rank": [w for _, w in per_rank],
            "world_size": dist.world,
            "matcher_backend": job.matcher.backend, "text_field": text_field, "id_field": id_field,
        }
        if dist.rank == 0:
            summary["kept"] = _report.merge(out, pass2, ok, counts, t, summary, clock)
        dist.barrier()
        return summary
    finally:
        if pool_ is not None:
            pool_.terminate()
            pool_.join()
        _JOB = None
        dist.close()


def _start_pass2(work: str, pass2: str, counts: np.ndarray) -> None:
    """Rank 0: the pass-2 folder of this (t, seed, counts), kept if it exists (resume); older ones go."""
    for name in os.listdir(work):
        if name.startswith("pass2-") and os.path.join(work, name) != pass2:
            shutil.rmtree(os.path.join(work, name))
    os.makedirs(pass2, exist_ok=True)
    for name in os.listdir(pass2):
        if ".tmp" in name:
            os.remove(os.path.join(pass2, name))
    path = os.path.join(pass2, "counts.npy")
    if not os.path.exists(path):
        with _report.temporary(path, ".npy") as tmp:
            np.save(tmp, counts)
