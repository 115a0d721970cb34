"""`kfe curate ...`: data curation commands (and the options of `kfe bench curate`)."""
from __future__ import annotations

import argparse
import json
import sys

_METACLIP_EPILOG = """\
pool formats: .jsonl / .jsonl.gz (one JSON object per line), .parquet, WebDataset .tar / .tar.gz
(.txt member, or the text field of the .json member); PATHS may be files, folders, globs, brace
patterns (data/{00000..00099}.tar) or shard lists (.txt / .list / .shards, one path per line).
Unreadable shards are skipped and reported (a tar shard cut short, even at a member boundary, is
unreadable: it must end with tar's end-of-archive block); a pool with no readable shard is an error.
Output files are written to temporaries and renamed; a failed write (full disk) removes its
temporary, and a re-run removes those a killed run left. I/O errors are one line naming the file.

pair ids: the --id-field value must be unique over the whole pool (a pair's balancing coins are a
function of its id, and curated.jsonl names pairs by it); a repeated id among the matched pairs is
an error. --id-field '' identifies every pair by <shard path>:<record offset> (always unique).

metadata: a JSON list of strings (when the whole file parses as one), else one entry per line;
entries are matched exactly as given (surrounding spaces count), blank lines are skipped.

outputs in DIR: curated.jsonl, entry_counts.json, entry_counts_balanced.json, summary.json,
entry_counts.png; DIR/_work holds per-shard results: rerunning the same command resumes.

many processes / nodes (DIR on a shared filesystem; same output as one process):
  torchrun --nproc_per_node=8 -m train.cli curate metaclip --metadata M --pool P --out DIR
"""


def _metaclip(args: argparse.Namespace) -> int:
    from train.curation.metaclip import curate

    try:
        summary = curate(args.metadata, args.pool, args.out, t=args.t, seed=args.seed, workers=args.workers,
                         text_field=args.text_field, id_field=args.id_field or None, batch_size=args.batch_size,
                         backend=args.backend, fresh=args.fresh, progress=not args.quiet)
    except ValueError as err:  # bad input: say what, no traceback
        print(f"kfe curate metaclip: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only --out: the path, no traceback
        from train.cli_train import os_error

        print(f"kfe curate metaclip: error: {os_error(err)}", file=sys.stderr)
        return 1
    if summary.get("kept") is not None:  # rank 0
        brief = {k: summary[k] for k in ("pool_size", "matched", "kept", "t", "seed", "shards", "timings_s")}
        print(json.dumps(brief, indent=1))
        for bad in summary["unreadable_shards"]:
            print(f"unreadable shard skipped: {bad['path']}: {bad['error']}", file=sys.stderr)
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="data curation (kfe curate metaclip ...)",
                       description="Curate raw image-text pools.")
    methods = p.add_subparsers(dest="curate_method", metavar="method")
    p.set_defaults(func=lambda _: (p.print_help(), 2)[1])

    m = methods.add_parser(
        "metaclip", help="MetaCLIP substring matching + balancing (arXiv 2309.16671)",
        description="Match every text of the pool against the metadata entries (MetaCLIP's substring "
                    "definition), count matches per entry over the whole pool, and keep each pair of an "
                    "entry with count c with probability min(1, t / c).",
        epilog=_METACLIP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--metadata", required=True, help="JSON list of entries, or one entry per line")
    m.add_argument("--pool", required=True, nargs="+", metavar="PATHS", help="shards (see below)")
    m.add_argument("--out", required=True, metavar="DIR", help="output folder")
    m.add_argument("--t", type=float, default=20000, help="balancing threshold (paper: 20k for 400M pairs)")
    m.add_argument("--seed", type=int, default=0, help="balancing seed (default 0)")
    m.add_argument("--workers", type=int, help="processes per rank, >= 1 (default: cores / local ranks)")
    m.add_argument("--text-field", default="text", help="text field / column (default: text)")
    m.add_argument("--id-field", default="id", help="id field, unique over the pool; pairs without one are "
                                                    "<shard>:<offset> (default: id; '' = always shard:offset)")
    m.add_argument("--batch-size", type=int, default=4096, help="texts matched per call (default 4096)")
    m.add_argument("--backend", choices=["auto", "cpp", "python"], default="auto", help="matcher (default auto)")
    m.add_argument("--fresh", action="store_true", help="discard the results of an earlier run in DIR")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=_metaclip)


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    g = bench.add_argument_group("curate suite")
    g.add_argument("--entries", type=int, help="curate: metadata entries (default 500000)")
    g.add_argument("--texts", type=int, help="curate: texts matched (default 1000000)")
    g.add_argument("--workers", type=int, help="curate: processes for the all-cores run (default: all cores)")
