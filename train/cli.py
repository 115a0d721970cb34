"""`kfe`: the command line of the project.

    kfe doctor                 versions, device, compiled extension, backends per op
    kfe bench grn              benchmark an op (see `kfe bench --list`)
    kfe curate metaclip        MetaCLIP curation of a raw pool (--metadata M --pool P --out DIR)
    kfe bench recipe supervised  training images/s and data-loader images/s of a recipe
    kfe train supervised       train a recipe (kfe train --help; kfe train supervised --help)
    kfe eval RUN_OR_CKPT       held-out top-1 (or --probe knn|linear) of a checkpoint
    kfe eval RUN --zeroshot D  zero-shot top-1/top-5 (ImageFolder, labelled shards or JSON; 80 templates)
    kfe sample dit --ckpt RUN  draw a PNG grid of class-conditional DiT samples (CFG, DDPM/DDIM; --vae DIR)
    kfe latents encode --vae DIR --data IMAGES --out DIR   VAE latent shards for kfe train dit
    kfe bench model NAME       a model's training-step images/s: eager vs compiled, channels-last, timm
    kfe bench papers [NAME]    each paper's headline ablation at small scale (--smoke: seconds, for CI)
    kfe export CKPT OUT.pt     weights as a plain state dict with the official keys
    kfe checkpoint upgrade F   rewrite an old (format 1) checkpoint so it loads with weights_only=True
    kfe pseudo-bow RUN --data IMAGES --out F   bag-of-words captions from a trained clip/slip/cit run
    kfe predict vlpart --ckpt RUN --image IMG --vocab "cat, cat:head" --out overlay.png   object/part masks
    kfe vlpart parse RUN --out parsed.json    novel objects parsed into parts (dense correspondence)

Run `kfe <command> --help` for the options of each command.
"""
from __future__ import annotations

import argparse
import sys

from engine import cli as engine_cli
from engine.bench import register_suite
from train.curation import cli as curation_cli

register_suite("curate", "train.curation.bench")
register_suite("recipe", "train.bench")
register_suite("fcmae", "models.fcmae_bench")
register_suite("model", "models.bench")
register_suite("papers", "train.papers.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kfe", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    sub = parser.add_subparsers(dest="command", metavar="command")
    engine_cli.add_subcommands(sub)
    curation_cli.add_subcommands(sub)
    curation_cli.add_bench_arguments(sub.choices["bench"])
    from models import bench as model_bench

    model_bench.add_bench_arguments(sub.choices["bench"])
    from train.papers import bench as papers_bench

    papers_bench.add_bench_arguments(sub.choices["bench"])
    from train import cli_train

    cli_train.add_subcommands(sub)
    from train import sample as sample_cli

    sample_cli.add_subcommands(sub)
    from train import pseudo_bow

    pseudo_bow.add_subcommand(sub)
    from train import latents as latents_cli

    latents_cli.add_subcommands(sub)
    from train.vlpart import cli as vlpart_cli

    vlpart_cli.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("train", "eval"):  # free-form --key value overrides: parsed by train.config
        from train import cli_train

        return (cli_train.train_command if argv[0] == "train" else cli_train.eval_command)(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


def entry() -> None:
    """The `kfe` console script and `python -m train.cli`: a torchrun worker that finished ends without
    finalizing the interpreter (train/dist.py exit_worker says why); an exception ends it as usual."""
    code = main() or 0
    from train import dist as dist_mod

    if dist_mod.is_torchrun_worker():
        dist_mod.exit_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
