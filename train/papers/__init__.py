"""`kfe bench papers`: each paper's headline ablation, reproduced at small scale on `shapes` (issue 20).

A paper is a few arms (configurations of existing recipes, trained in-process through train.run), fixed
seeds, and one metric read from the runs' held-out evaluations (plus an optional linear probe after
training). train.papers.runner trains the arms, train.papers.report writes
benchmarks/results/papers/NAME.{md,json,png}.

    kfe bench papers --smoke             every paper, a few steps per arm (CI: tests/train/test_papers.py)
    kfe bench papers slip --seeds 0,1    one paper for real
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Stage:
    """A pre-training run an arm starts from: trained once per seed in RUNS/PAPER/pretrain-NAME/seedS (shared by
    every arm naming it, read back when finished, resumed when interrupted); its run dir is the arm's --init."""
    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    steps: int = 0  # 0: the recipe's shapes preset's


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: str
    overrides: tuple[str, ...] = ()  # `kfe train` --key value overrides on top of the recipe's shapes preset
    # Built before this arm trains, from earlier arms' runs (e.g. pseudo-captions by a teacher arm of the same
    # seed): prepare(PAPER_RUNS_DIR, seed, smoke) -> {placeholder: path} substituted into the overrides
    prepare: Callable[[str, int, bool], dict[str, str]] | None = None
    pretrain: Stage | None = None  # pre-train first, then this arm runs with --init <the stage's run dir>
    baseline: str = ""  # the arm this one is compared with ('' = the paper's arms[0])


@dataclass(frozen=True)
class Paper:
    name: str
    title: str
    claim: str  # what the paper found, the effect this suite looks for
    arms: tuple[Arm, ...]  # arms[0] is the baseline; the others are compared with it
    metric: str  # key of the runs' eval records plotted against steps, e.g. "top1"
    steps: int  # the real run's budget per arm
    eval_every: int
    seeds: tuple[int, ...] = (0, 1, 2)
    percent: bool = True  # the metric is an accuracy (shown in %); False: shown as it is (e.g. a loss)
    probe: tuple[str, ...] | None = None  # after training: a linear probe with these overrides (None = none)
    notes: str = ""
    common: tuple[str, ...] = field(default=())  # overrides shared by every arm
    # Builds the data the arms need (once, in FOLDER; smoke: small) and returns {placeholder: path}
    # substituted into the arms' overrides, e.g. {"{pool}": ".../{00000..00003}.tar"}.
    prepare: Callable[[str, bool], dict[str, str]] | None = None
    # Optional extra analysis of the runs (e.g. steps to reach the baseline): -> (JSON dict, markdown lines)
    analyze: Callable[[list[dict]], tuple[dict, list[str]]] | None = None
    # Optional measurement of each finished run that its training does not log (e.g. DiT's samples scored by a
    # classifier): score(run, smoke, paths) -> {key: value}, cached in the run's score.json; the table shows
    # score_columns (key, header, as a percentage) per arm and their differences from the baseline arm.
    score: Callable[[dict, bool, dict[str, str]], dict[str, float]] | None = None
    score_columns: tuple[tuple[str, str, bool], ...] = ()
    # Optional second panel of the plot, drawn from the runs (e.g. a score against model compute): (ax, runs)
    plot_extra: Callable[[object, list[dict]], None] | None = None


PAPERS: dict[str, Paper] = {}


def register(paper: Paper) -> Paper:
    PAPERS[paper.name] = paper
    return paper


# SLIP (Mu et al., arXiv 2112.12750, Table 2 / Table 5): adding the SimCLR term to CLIP improves zero-shot
# and, more so, linear-probe accuracy at equal epochs. Zero-shot is on the colour (what the captions name
# first); the probe is on the *shape* label, which CLIP on `shapes` barely learns (train/recipes/clip.py),
# so it is where an image-only self-supervised term can show. 1500 steps: at 200 and 600 neither effect showed
# (zero-shot 89.6 vs 92.3% and 94.0 vs 92.5%; probes 16.9 vs 16.3% and 18.2 vs 20.4%).
register(Paper(
    name="slip", title="SLIP vs CLIP (equal steps)",
    claim="SLIP >= CLIP zero-shot; SLIP > CLIP linear probe",
    arms=(Arm("clip", "clip"), Arm("slip", "slip")),
    metric="top1", steps=1500, eval_every=300, seeds=(0, 1),
    probe=("--shapes.label", "shape")))

_MAE = ('{"patch_size": PATCH, "embed_dim": 96, "depth": 4, "num_heads": 3, "decoder_embed_dim": 64, '
        '"decoder_depth": 2, "decoder_num_heads": 2}')  # the mae shapes preset's model with a chosen patch

# Long-sequence MAE (Hu et al., arXiv 2210.07224): decoupling the mask unit from the patch size (smaller
# patches, masked in the same 8 px units) gives a longer sequence and better features than the standard
# setting, most of all for localisation (the paper's detection / segmentation transfer). Metric: the
# recipe's own held-out linear probe on the position label (the 3 x 3 cell of the main object:
# train/data/shapes.py), on every patch token concatenated (the full-resolution map a detector reads: 16 x 96
# features for 8 px patches, 64 x 96 for 4 px). Earlier runs (300 steps, 2 seeds): the shape label with
# mean-pooled tokens, both at chance (16.7 vs 16.6%, chance 13.8%); the position label with mean-pooled
# tokens, 25.2 vs 25.6% (chance 16.3%, raw pixels 78.4%: averaging every token drops most of the position);
# with the tokens averaged to a 4 x 4 grid (one feature size for both, but the long sequence's finer map
# averaged away), 75.8 ± 2.3 vs 77.7 ± 0.4%.
def _probe_context(runs: list[dict]) -> tuple[dict, list[str]]:
    """The same linear probe on raw pixels, and the k-NN probe of each arm (from the runs' last evaluations)."""
    from train.papers.report import _stats
    from train.papers.runner import _records

    last = {}
    for r in runs:
        evals = [e for e in _records(r["run_dir"]) if e.get("kind") == "eval" and "pixel_linear_top1" in e]
        if evals:
            last[(r["arm"], r["seed"])] = evals[-1]
    if not last:
        return {}, []
    pixels = _stats([e["pixel_linear_top1"] for e in last.values()])
    arms = dict.fromkeys(arm for arm, _ in last)
    knn = {arm: _stats([e["knn_top1"] for (a, _), e in last.items() if a == arm]) for arm in arms}
    line = (f"The same linear probe on raw pixels: {100 * pixels[0]:.1f}%. k-NN on the same features: "
            + ", ".join(f"{arm} {100 * m:.1f} ± {100 * sd:.1f}%" for arm, (m, sd) in knn.items()) + ".")
    return {"pixel_linear_top1": pixels[0], "knn_top1": knn}, ["", line]


register(Paper(
    name="mae_longseq", title="MAE: long sequence (4 px patches, 8 px mask unit) vs standard (8 px)",
    claim="long-sequence MAE probe > standard MAE probe on a position-sensitive label",
    arms=(Arm("standard", "mae", ("--model_kwargs", _MAE.replace("PATCH", "8"))),
          Arm("longseq", "mae", ("--model_kwargs", _MAE.replace("PATCH", "4"), "--mask_unit", "8"))),
    metric="linear_top1", steps=300, eval_every=100, seeds=(0, 1),
    common=("--shapes.label", "position", "--feature_pool", "tokens"), analyze=_probe_context,
    notes="label position (9 cells of a 3 x 3 grid, the main object's centre); 32 px, mask 0.75 in 8 px units; "
          "probe: linear on every patch token of the encoder concatenated (16 x 96 / 64 x 96 features), 2000 "
          "training images"))

from train.papers import clip_family  # noqa: E402,F401  (SLIP, MetaCLIP, CiT, Fistful)
from train.papers import finetune_papers  # noqa: E402,F401  (MAE, ConvNeXt V2, MaskFeat: pre-train -> fine-tune)
from train.papers import dit_paper  # noqa: E402,F401  (DiT: sample quality vs compute, guidance)
