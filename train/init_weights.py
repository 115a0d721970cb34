"""`--init RUN_OR_CKPT`: initialise a classifier's encoder from pre-trained weights, strictly.

Accepted (all read with torch.load(weights_only=True), see train/checkpoint.py):
- a KFE run directory (its newest checkpoint), a ckpt-*.pt file or an FSDP run's sharded ckpt-*.dcp of mae,
  fcmae, maskfeat, supervised, ...;
- a KFE export (`kfe export`: a plain state dict in the official keys, .pt or .safetensors);
- official checkpoints: MAE's `.pth` ({"model": ...}, facebookresearch/mae), ConvNeXt V2 FCMAE `.pt`
  ({"model": ...} with MinkowskiEngine keys, converted by models/fcmae_official.py), MaskFeat's SlowFast
  checkpoint ({"model_state": ...}, converted by models.maskfeat.from_slowfast); long-sequence MAE's `.pth`
  (facebookresearch/long_seq_mae: MAE's layout, pre-trained at 448 px so its position table is resized;
  its `--no_k_bias_in_vit` variant's q_bias / v_bias merged into qkv.bias).

The pre-trained keys are mapped to the target model's; anything that does not match is reported, and only
the expected differences pass: pre-training-only parts dropped (decoder*, mask_token, the MaskFeat / FCMAE
heads, the final `norm` a global-pool ViT replaces, a classifier head of another size), classifier parts
new (head, fc_norm, a ConvNeXt's final norm). Any other missing or unused key is an error naming it. A
position table of another grid is resized (bicubic, MAE's interpolate_pos_embed).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from models.pos_embed import resize_pos_embed
from train import checkpoint as ckpt_mod

# Pre-training parts a classifier does not have (MAE decoder, FCMAE decoder / proj / pred, MaskFeat head).
DROPPABLE = ("decoder*", "mask_token", "pred", "pred.*", "proj.*", "pred_head.*", "norm.*", "head.*")
NEW_OK = ("head.*", "fc_norm.*", "norm.*")


@dataclass
class InitReport:
    source: str                              # what the file was recognised as
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)   # in the checkpoint, not used
    new: list[str] = field(default_factory=list)       # in the model, freshly initialised
    resized: list[str] = field(default_factory=list)   # position tables interpolated

    def line(self) -> str:
        return (f"init from {self.source}: {len(self.loaded)} tensors loaded; dropped {_short(self.dropped)}; "
                f"new {_short(self.new)}" + (f"; resized {', '.join(self.resized)}" if self.resized else ""))


def _short(keys: list[str]) -> str:
    """Keys grouped by their first name component: 'decoder_blocks.* (96), mask_token'."""
    if not keys:
        return "none"
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{h}.* ({n})" if n > 1 or h not in keys else h for h, n in groups.items())


def _read(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return ckpt_mod.safe_load(path, "init weights")


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(encoder state dict in KFE's dense keys, a description of the source)."""
    from train import dcp

    if os.path.isdir(path) and not os.path.normpath(path).endswith(dcp.SUFFIX):
        found = ckpt_mod.find_resume(path, "auto")
        if found is None:
            raise FileNotFoundError(f"--init {path!r}: no checkpoint in that run directory")
        path = found
    if os.path.isdir(path):  # an FSDP run's sharded checkpoint: metadata and model read safely (train/dcp.py)
        obj = {**ckpt_mod.load(path), "model": None}
        obj["model"] = dcp.full_model_state(path)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"--init {path!r}: no such file or run directory")
    else:
        obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == 1:
        raise ckpt_mod.UnsafeCheckpointError(f"{path} is a format-1 KFE checkpoint: convert it once with "
                                             f"`kfe checkpoint upgrade {path}`")
    if isinstance(obj, dict) and obj.get("format") == ckpt_mod.FORMAT_VERSION and "model" in obj:
        sd, source = obj["model"], f"KFE {obj.get('recipe')} checkpoint {path} (step {obj.get('step')})"
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd, source = obj["model"], f"{path} ('model': MAE / ConvNeXt V2 layout)"
    elif isinstance(obj, dict) and isinstance(obj.get("model_state"), dict):
        sd, source = obj["model_state"], f"{path} ('model_state': SlowFast / MaskFeat layout)"
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, source = obj, f"{path} (plain state dict)"
    else:
        raise ValueError(f"--init {path!r}: not a checkpoint KFE can read (expected a KFE run or checkpoint, "
                         "a state dict, or a dict with 'model' / 'model_state')")
    return to_dense(ckpt_mod.clean_state_dict(sd)), source


def to_dense(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official layouts -> KFE's keys: FCMAE's sparse (MinkowskiEngine) encoder densified and its
    `encoder.` prefix stripped (its decoder keys kept, to be reported as dropped); SlowFast's MaskFeat head
    LayerNorm renamed to `norm`."""
    from models import fcmae_official
    from models.maskfeat import from_slowfast

    if fcmae_official.is_official(sd):
        sd = fcmae_official.from_official(sd)
    sd = from_slowfast(sd)
    if any(k.startswith("encoder.") for k in sd):
        sd = {(k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in sd.items()}
    return merge_qv_bias(sd)


def merge_qv_bias(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BEiT-style attention without a key bias (long-sequence MAE's `--no_k_bias_in_vit`: `attn.q_bias`,
    `attn.v_bias`) -> one `attn.qkv.bias` with a zero key part, as facebookresearch/long_seq_mae's
    tools/convert_model_ckpt_k_bias.py --add_k_bias does. Exact: a key bias adds the same q.b_k to every
    logit of a query, which the softmax cancels."""
    out = dict(sd)
    for name in [k for k in sd if k.endswith("attn.q_bias")]:
        v_name = name[:-len("q_bias")] + "v_bias"
        if v_name in out:
            q, v = out.pop(name), out.pop(v_name)
            out[name[:-len("q_bias")] + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_init(model: nn.Module, path: str) -> InitReport:
    """Copy the pre-trained encoder of `path` into `model` (in place); the report lists every key."""
    sd, source = read_state_dict(path)
    target = model.state_dict()
    report = InitReport(source)
    load = {}
    for k, v in sd.items():
        if k not in target:
            report.dropped.append(k)
            continue
        want = target[k].shape
        if v.shape != want and k in ("pos_embed", "decoder_pos_embed") and v.dim() == 3:
            grid = model.patch_embed.grid
            v = resize_pos_embed(v, grid, extra=1)  # the cls position is kept
            report.resized.append(f"{k} {tuple(sd[k].shape)} -> {tuple(v.shape)}")
        if v.shape != want:
            if k.startswith("head."):  # a classifier of another size: re-initialised
                report.dropped.append(k)
                continue
            raise ValueError(f"--init {path!r}: {k} has shape {tuple(v.shape)}, the model's is {tuple(want)} "
                             "(another model size?)")
        load[k] = v
    report.new = [k for k in target if k not in load and not k.endswith("num_batches_tracked")]
    bad_drop = [k for k in report.dropped if not _matches(k, DROPPABLE)]
    bad_new = [k for k in report.new if not _matches(k, NEW_OK)]
    if bad_drop or bad_new or not load:
        raise ValueError(f"--init {path!r} does not match model {type(model).__name__}: "
                         f"unused checkpoint keys {bad_drop[:6] or 'none'}, model keys without weights "
                         f"{bad_new[:6] or 'none'} (is it the same architecture and size?)")
    report.loaded, report.dropped, report.new = sorted(load), sorted(report.dropped), sorted(report.new)
    missing, unexpected = model.load_state_dict(load, strict=False)
    assert not unexpected and set(missing) == {k for k in target if k not in load}
    return report
