"""The raw pool of image-text pairs: shard lists and streaming readers.

A pool is given as paths, each one of: a shard file (.jsonl, .jsonl.gz, .parquet, .tar, .tar.gz,
.tgz), a brace pattern (`data/{00000..00099}.tar`, `{a,b}`), a glob (`data/*.parquet`), a directory
(its shard files, sorted) or a shard list (.txt / .list / .shards: one path or pattern per line, `#`
comments, relative to the list's folder). Shards are read in constant memory, in batches:
  JSONL    one JSON object per line; offset = line number (0-based)
  Parquet  the text column (and the id column when present); offset = row number
  tar      WebDataset: members grouped by key (the name up to the first dot of its basename); the
           text is the .json member's text field when present, else the .txt member; the id is the
           .json member's id field; offset = sample number
A pair's id is its id field when it has one, else "<shard>:<offset>".

Errors: `DataError` (a missing text field, a record that is not an object) is the user's to fix and
aborts the job; anything in `UNREADABLE` (I/O errors, truncated or corrupt files, invalid JSON or
UTF-8) marks the shard unreadable: it is reported and skipped.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from train import tarfiles

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet", ".tar": "tar", ".tar.gz": "tar",
           ".tgz": "tar"}
LIST_SUFFIXES = (".txt", ".list", ".shards")
UNREADABLE = (OSError, EOFError, tarfile.TarError, zlib.error, ValueError)  # after DataError is excluded
_BRACE = re.compile(r"\{([^{}]*)\}")


class DataError(ValueError):
    """The pool does not have the shape the job was told (missing text field, ...): fix the input."""


@dataclass
class Batch:
    offsets: list[int] = field(default_factory=list)
    ids: list = field(default_factory=list)  # the record's id field, or None
    texts: list = field(default_factory=list)  # str, or None for a null text

    def __len__(self) -> int:
        return len(self.offsets)


def shard_format(path: str) -> str:
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if path.endswith(suffix):
            return FORMATS[suffix]
    raise ValueError(f"pool: unsupported shard {path!r}; expected one of {', '.join(FORMATS)} "
                     f"(or a shard list ending in {', '.join(LIST_SUFFIXES)})")


def braceexpand(pattern: str) -> list[str]:
    """`a{0..2}b` -> a0b a1b a2b (zero-padded to the width of the bounds), `{x,y}` -> x y; nested ok."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    return [out for opt in options for out in braceexpand(head + opt + tail)]


def expand_pool(specs: list[str]) -> list[str]:
    """The ordered shard list of a pool (see the module doc). Raises ValueError on an empty pool, a
    shard listed twice or an unsupported suffix; missing files are left to the readers to report."""
    if isinstance(specs, str):
        specs = [specs]
    shards: list[str] = []
    for spec in specs:
        shards += _expand_one(str(spec))
    if not shards:
        raise ValueError(f"pool {list(specs)} names no shards")
    seen: set[str] = set()
    for path in shards:
        if path in seen:
            raise ValueError(f"pool: shard {path!r} is listed twice (it would be counted twice)")
        seen.add(path)
        shard_format(path)
    return shards


def _expand_one(spec: str) -> list[str]:
    if _BRACE.search(spec):
        return [p for s in braceexpand(spec) for p in _expand_one(s)]
    if os.path.isdir(spec):
        found = []
        for root, _, files in os.walk(spec):
            found += [os.path.join(root, f) for f in files if _is_shard(f)]
        return sorted(found)
    if spec.endswith(LIST_SUFFIXES):
        if not os.path.isfile(spec):
            raise ValueError(f"pool: shard list {spec!r} does not exist")
        base = os.path.dirname(spec)
        with open(spec, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
        return [p for ln in lines if ln and not ln.startswith("#")
                for p in _expand_one(ln if os.path.isabs(ln) else os.path.join(base, ln))]
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec, recursive=True))
    return [spec]


def _is_shard(name: str) -> bool:
    return any(name.endswith(s) for s in FORMATS)


def read_shard(path: str, text_field: str = "text", id_field: str | None = "id",
               batch_size: int = 4096) -> Iterator[Batch]:
    """Stream a shard in batches of `batch_size` records."""
    reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "tar": _read_tar}[shard_format(path)]
    batch = Batch()
    for offset, record_id, text in reader(path, text_field, id_field, batch_size):
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}: record {offset}: text field {text_field!r} must be a string, "
                            f"got {type(text).__name__}")
        batch.offsets.append(offset)
        batch.ids.append(record_id)
        batch.texts.append(text)
        if len(batch) == batch_size:
            yield batch
            batch = Batch()
    if len(batch):
        yield batch


def _read_jsonl(path, text_field, id_field, batch_size):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for offset, line in enumerate(f):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {offset + 1}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise DataError(f"{path}: line {offset + 1}: no text field {text_field!r} (fields: "
                                f"{sorted(record)[:20]}); choose it with --text-field")
            yield offset, record.get(id_field) if id_field else None, record[text_field]


def _read_parquet(path, text_field, id_field, batch_size):
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{path}: no text column {text_field!r} (columns: {names[:20]}); "
                            "choose it with --text-field")
        columns = [text_field] + ([id_field] if id_field and id_field in names and id_field != text_field else [])
        offset = 0
        for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
            texts = rb.column(text_field).to_pylist()
            ids = rb.column(id_field).to_pylist() if len(columns) > 1 else [None] * len(texts)
            for i, text in enumerate(texts):
                yield offset + i, ids[i], text
            offset += len(texts)


def _read_tar(path, text_field, id_field, batch_size):
    offset, key, members = 0, None, {}
    # seekable mode: tarfiles.members checks the end-of-archive block (a cut shard raises, then it is
    # reported unreadable instead of read short or aborting on its half-written last sample)
    with tarfile.open(path, mode="r:*") as tar:
        for info in tarfiles.members(tar, path):
            if not info.isfile():
                continue
            folder, base = os.path.split(info.name)
            stem, dot, ext = base.partition(".")
            name = os.path.join(folder, stem)
            if name != key:
                if key is not None:
                    yield _tar_sample(path, offset, key, members, text_field, id_field)
                    offset += 1
                key, members = name, {}
            members[ext] = tar.extractfile(info).read() if ext in ("txt", "json") else None
        if key is not None:
            yield _tar_sample(path, offset, key, members, text_field, id_field)


def _tar_sample(path, offset, key, members, text_field, id_field):
    meta = json.loads(members["json"]) if members.get("json") is not None else None
    if meta is not None and not isinstance(meta, dict):
        raise DataError(f"{path}: sample {key!r}: .json must hold an object, got {type(meta).__name__}")
    record_id = meta.get(id_field) if meta is not None and id_field else None
    if meta is not None and text_field in meta:
        return offset, record_id, meta[text_field]
    if members.get("txt") is not None:
        return offset, record_id, members["txt"].decode("utf-8")
    raise DataError(f"{path}: sample {key!r} has no text: neither a .txt member nor a .json member with "
                    f"field {text_field!r} (members: {sorted(members)}); choose it with --text-field")
