"""Small pools written in every supported format, for the curation tests."""
import gzip
import io
import json
import os
import tarfile

from train.curation import synthetic


def corpus(n_entries=120, n_texts=400, seed=0):
    vocab = synthetic.vocabulary(150, seed=seed)
    entries = synthetic.entries(n_entries, vocab, seed=seed)
    texts = synthetic.texts(n_texts, vocab, entries[int(0.6 * n_entries):], seed=seed, mean_words=6)
    return entries, texts


def write_jsonl(path, records, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()  # \\uXXXX: lone surrogates survive
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return str(path)


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: [r.get(k) for r in records] for k in records[0]}
    pq.write_table(pa.table(cols), path, row_group_size=37)
    return str(path)


def write_tar(path, records, member="txt", text_field="text"):
    """WebDataset shard: <key>.jpg (fake), and the text as <key>.txt or inside <key>.json."""
    with tarfile.open(path, "w") as tar:
        for k, r in enumerate(records):
            key = f"{k:06d}"
            files = {f"{key}.jpg": b"\xff\xd8 not really a jpeg"}
            if member == "txt":
                files[f"{key}.txt"] = r["text"].encode("utf-8")
                if "id" in r:
                    files[f"{key}.json"] = json.dumps({"id": r["id"]}).encode()
            else:
                meta = {k2: v for k2, v in r.items() if k2 != "text"}
                meta[text_field] = r["text"]
                files[f"{key}.json"] = json.dumps(meta).encode()
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def shard_records(texts, n_shards, with_ids=True):
    per = -(-len(texts) // n_shards)
    return [[{"text": t, **({"id": f"pair-{a + k}"} if with_ids else {})} for k, t in enumerate(texts[a:a + per])]
            for a in range(0, len(texts), per)]


def jsonl_pool(folder, texts, n_shards=5, with_ids=False):
    os.makedirs(folder, exist_ok=True)
    return [write_jsonl(os.path.join(folder, f"{s:05d}.jsonl"), recs)
            for s, recs in enumerate(shard_records(texts, n_shards, with_ids))]


def read_out(out):
    with open(os.path.join(out, "curated.jsonl"), encoding="utf-8") as f:
        curated = f.read()
    with open(os.path.join(out, "entry_counts.json")) as f:
        counts = json.load(f)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return curated, counts, summary


STABLE_SUMMARY_KEYS = ("pool_size", "null_texts", "matched", "kept", "t", "seed", "entries", "shards",
                       "unreadable_shards")
