"""`kfe`: the command line of the project.

    kfe doctor                 versions, device, compiled extension, backends per op
    kfe bench grn              benchmark an op (see `kfe bench --list`)
    kfe curate metaclip        MetaCLIP curation of a raw pool (--metadata M --pool P --out DIR)

Run `kfe <command> --help` for the options of each command.
"""
from __future__ import annotations

import argparse
import sys

from engine import cli as engine_cli
from engine.bench import register_suite
from train.curation import cli as curation_cli

register_suite("curate", "train.curation.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kfe", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    sub = parser.add_subparsers(dest="command", metavar="command")
    engine_cli.add_subcommands(sub)
    curation_cli.add_subcommands(sub)
    curation_cli.add_bench_arguments(sub.choices["bench"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
