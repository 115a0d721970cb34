"""`kfe train`, `kfe eval`, `kfe export` and the `kfe bench recipe NAME` argument split."""
from __future__ import annotations

import argparse
import sys

USAGE = """usage: kfe train RECIPE [--config FILE.toml] [--preset NAME] [--key value ...]

Train a recipe. Config = the recipe's dataclass defaults (the paper's) -> the preset -> the TOML file
-> --key value overrides (nested keys with dots: --shapes.label color). `kfe train RECIPE --help`
lists every key with its type and default. The resolved config is printed and saved as
<out>/config.toml; metrics go to <out>/metrics.jsonl; checkpoints to <out>/ckpt-<step>.pt.

  CPU smoke run (built-in data):   kfe train supervised --data shapes
  one GPU:                         kfe train supervised --data /data/imagenet --preset paper
  many GPUs / nodes (torchrun):    torchrun --nproc_per_node=8 -m train.cli train supervised --data /data/imagenet
                                   (--batch_size is the global batch, split over processes x accum_steps)
  resume after a crash or kill:    kfe train supervised --data shapes --resume auto

recipes:
"""


def _recipes() -> dict:
    from train.recipes import RECIPES

    return RECIPES


def print_recipe_help(name: str) -> None:
    from train import config as config_mod

    recipe = _recipes()[name]
    print(f"usage: kfe train {name} [--config FILE.toml] [--preset NAME] [--key value ...]\n\n{recipe.help}\n")
    print("presets: paper (the defaults below)" + "".join(
        f"; {p} ({', '.join(f'{k}={v}' for k, v in m.items())})" for p, m in recipe.presets.items()))
    print("  --preset auto (default) picks 'shapes' when --data is shapes.\n\nkeys (type, default):")
    from train.recipes.base import TrainConfig

    shared = set(config_mod.keys(TrainConfig))
    flat = config_mod.keys(recipe.config)
    groups = (("recipe", [k for k in flat if k not in shared]), ("shared", [k for k in flat if k in shared]))
    for title, names in groups:
        print(f"  [{title}]")
        for k in names:
            tp, default, text = flat[k]
            print(f"  --{k:<22} {config_mod.type_name(tp):<16} {default!r:<14} {text}")


def _pop(argv: list[str], flag: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == flag:
            if i + 1 >= len(argv):
                raise SystemExit(f"kfe train: {flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if tok.startswith(flag + "="):
            del argv[i]
            return tok.split("=", 1)[1]
    return None


def os_error(err: OSError) -> str:
    """One line naming the path: '[Errno 28] No space left on device: runs/x/ckpt-00000010.pt'."""
    where = err.filename or getattr(err, "kfe_path", None)
    text = f"{err.strerror or err}"
    if where:
        text += f": {where}" + (f" -> {err.filename2}" if err.filename2 else "")
    return text.replace("\n", " ")


def train_command(argv: list[str]) -> int:
    from train.checkpoint import UnsafeCheckpointError
    from train.config import ConfigError
    from train.data import DataError

    recipes = _recipes()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "".join(f"  {n:<12} {r.help}\n" for n, r in sorted(recipes.items())))
        return 0 if argv else 2
    name, rest = argv[0], list(argv[1:])
    if name not in recipes:
        print(f"kfe train: unknown recipe {name!r}; available: {', '.join(sorted(recipes))}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print_recipe_help(name)
        return 0
    from train.run import resolve_config, train

    try:
        config_file, preset = _pop(rest, "--config"), _pop(rest, "--preset") or "auto"
        cfg, preset = resolve_config(name, config_file, preset, rest)
        train(name, cfg, preset)
    except (ConfigError, DataError, UnsafeCheckpointError) as err:
        print(f"kfe train {name}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if not str(err).startswith("cannot read checkpoint"):
            raise
        print(f"kfe train {name}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only or missing --out, unreadable files: the path, no traceback
        print(f"kfe train {name}: error: {os_error(err)}", file=sys.stderr)
        return 1
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", help="a run directory (newest checkpoint) or a ckpt-*.pt file")
    p.add_argument("--probe", choices=["top1", "knn", "linear"], default="top1")
    p.add_argument("--probe_samples", type=int, default=5000, help="training images for knn / linear")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--zeroshot", metavar="DIR_OR_JSON", default="",
                   help="zero-shot top-1/top-5 (clip, slip, cit): an ImageFolder / labelled shards, or a JSON "
                        "{data, classnames, templates}; default templates: OpenAI's 80 (train/zeroshot.py)")
    return p


EVAL_HELP = ("Held-out top-1 of a run's newest checkpoint (or a file), or a k-NN / linear probe on the "
             "recipe's features. Other --key value pairs override the saved config (e.g. --val_data DIR "
             "--device cpu --num_workers 0).")


def eval_command(argv: list[str]) -> int:
    """`kfe eval CKPT [--probe ...] [--key value ...]`: unknown options are config overrides."""
    from train.config import ConfigError
    from train.data import DataError
    from train.run import evaluate_checkpoint

    parser = _eval_arguments(argparse.ArgumentParser(prog="kfe eval", description=EVAL_HELP))
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.zeroshot:
            from train import zeroshot

            zeroshot.evaluate_checkpoint(args.checkpoint, args.zeroshot, args.ema, overrides)
        else:
            evaluate_checkpoint(args.checkpoint, args.probe, args.ema, overrides, args.probe_samples)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"kfe eval: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"kfe eval: error: {os_error(err)}", file=sys.stderr)
        return 1
    return 0


def export_command(args: argparse.Namespace) -> int:
    from train.run import export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.out, args.ema)
    except (FileNotFoundError, ValueError) as err:
        print(f"kfe export: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"kfe export: error: {os_error(err)}", file=sys.stderr)
        return 1
    return 0


def checkpoint_command(args: argparse.Namespace) -> int:
    """`kfe checkpoint upgrade FILE...`: format-1 checkpoints rewritten as weights-only-loadable format 2."""
    from train.checkpoint import upgrade

    try:
        for path in args.files:
            print(f"upgraded {upgrade(path)}")
    except (FileNotFoundError, ValueError) as err:
        print(f"kfe checkpoint upgrade: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"kfe checkpoint upgrade: error: {os_error(err)}", file=sys.stderr)
        return 1
    return 0


def bench_command(args: argparse.Namespace) -> int:
    """`kfe bench recipe NAME ...` / `kfe bench model NAME ...`: the names after them are recipes / models."""
    from engine import cli as engine_cli
    from train import threads

    # recipes and papers run their shapes presets (1 thread); models and ops by cores / local processes
    print(f"kfe bench: {threads.apply(args.threads, args.suites[:1] in (['recipe'], ['papers']))}", file=sys.stderr)
    if args.suites[:1] == ["recipe"]:
        args.recipes, args.suites = args.suites[1:], ["recipe"]
    elif args.suites[:1] == ["model"]:
        args.models, args.suites = args.suites[1:], ["model"]
    elif args.suites[:1] == ["papers"]:
        args.papers, args.suites = args.suites[1:], ["papers"]
    if not args.profile:
        return engine_cli.bench(args)
    import os

    import torch
    from torch.profiler import profile

    from train import profile as profile_mod

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = os.path.splitext(args.json)[0] + ".trace.json" if args.json else "bench-trace.json"
    with profile(activities=profile_mod.activities(device)) as prof:
        status = engine_cli.bench(args)
    prof.export_chrome_trace(path)
    print(f"profile: trace {path} (open in ui.perfetto.dev)\n{profile_mod.table(prof, device)}")
    return status


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("train", help="train a recipe (kfe train --help)", add_help=False)
    _eval_arguments(sub.add_parser("eval", help="evaluate a checkpoint on the held-out split",
                                   description=EVAL_HELP))
    p = sub.add_parser("export", help="write a checkpoint's weights as a plain state dict (official keys)")
    p.add_argument("checkpoint", help="a run directory (newest checkpoint) or a ckpt-*.pt file")
    p.add_argument("out", help="output .pt (torch.save of the state dict) or .safetensors")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.set_defaults(func=export_command)
    p = sub.add_parser("checkpoint", help="checkpoint maintenance (kfe checkpoint upgrade FILE)")
    p.add_argument("action", choices=["upgrade"], help="upgrade: rewrite old (format 1) KFE checkpoints in "
                   "place so they load with weights_only=True")
    p.add_argument("files", nargs="+", help="ckpt-*.pt files")
    p.set_defaults(func=checkpoint_command)
    sub.choices["bench"].set_defaults(func=bench_command)
    sub.choices["bench"].add_argument("--profile", action="store_true",
                                      help="record the whole benchmark with torch.profiler: bench-trace.json (or "
                                           "<--json stem>.trace.json) and the top ops by self time")
    sub.choices["bench"].add_argument("--threads", type=int, default=0,
                                      help="torch CPU threads (0 = auto: 1 for recipes on shapes, else cores / "
                                           "local processes)")
    sub.choices["bench"].description += (" `kfe bench recipe NAME` times a training recipe: training and "
                                         "data-loader images/s. `kfe bench model NAME` times a model's "
                                         "training step: eager vs compiled, channels-last, timm.")
