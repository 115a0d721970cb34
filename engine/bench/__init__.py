"""`kfe bench`: time fwd / bwd / fwd+bwd of every provider of an op, against the machine's roofline.

Suites are modules with `cases(device, sizes, dtypes) -> list[Case]` (timed by `run` here), or with
their own `run(args, device) -> int` for measurements that are not op timings (e.g. texts/s). They are
registered by name in SUITES; models, recipes and curation add theirs with `register_suite` (train/cli.py).
"""
from engine.bench.core import MODES, Case, run
from engine.bench.report import Reporter, markdown, write_json

SUITES: dict[str, str] = {
    "grn": "engine.ops.grn.bench",
    "attention": "engine.ops.attention.bench",
    "contrastive": "engine.ops.contrastive.bench",
    "sparse": "engine.ops.sparse_conv.bench",
    "hog": "engine.ops.hog.bench",
}


def register_suite(name: str, module: str) -> None:
    SUITES[name] = module


__all__ = ["MODES", "SUITES", "Case", "Reporter", "markdown", "register_suite", "run", "write_json"]
