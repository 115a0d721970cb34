"""Layer-wise learning-rate decay: parameter groups whose lr is scaled by decay^(depth from the top).

The layer id of each parameter is assigned as the official fine-tuning code assigns it:
- ViT (facebookresearch/mae, util/lr_decay.py): cls_token, pos_embed, patch_embed -> 0; blocks.i -> i + 1;
  everything else (fc_norm / norm, head) -> L = depth + 1; scale = decay^(L - id).
- ConvNeXt V2 (facebookresearch/ConvNeXt-V2, optim_factory.py), "single" (the paper's default: Atto..Tiny
  and Huge): downsample_layers.s -> sum(depths[:s]) + 1, stages.s.b -> sum(depths[:s]) + b + 1, the rest ->
  sum(depths) + 1, with L = sum(depths); "group" (Base and Large, arXiv 2301.00808 A.2; built for depths
  (3, 3, 27, 3)): 12 groups of three blocks
  (stem 0, stage 0 -> 1, stage 1 / downsample 1 -> 2, downsample 2 -> 3, stage 2 block b -> 3 + b // 3,
  downsample 3 and stage 3 -> 12, the rest 13), with L = 12; scale = decay^(L + 1 - id).
No weight decay on 1-D parameters, biases, GRN's gamma / beta (ConvNeXt V2) and on the names in
`no_weight_decay` (MAE: pos_embed, cls_token). Each group carries "lr_scale" (train.optim.adamw applies it).
"""
from __future__ import annotations

from torch import nn

VIT_NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token")


def vit_layer_id(name: str, num_layers: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def convnext_layer_id(name: str, depths: tuple[int, ...], kind: str = "single") -> int:
    if kind == "single":
        if name.startswith("downsample_layers."):
            return sum(depths[:int(name.split(".")[1])]) + 1
        if name.startswith("stages."):
            s, b = int(name.split(".")[1]), int(name.split(".")[2])
            return sum(depths[:s]) + b + 1
        return sum(depths) + 1
    if kind != "group":
        raise ValueError(f"layer_decay_type must be 'single' or 'group', got {kind!r}")
    if name.startswith("downsample_layers."):
        return {0: 0, 1: 2, 2: 3, 3: 12}[int(name.split(".")[1])]
    if name.startswith("stages."):
        s, b = int(name.split(".")[1]), int(name.split(".")[2])
        return {0: 1, 1: 2, 2: 3 + b // 3, 3: 12}[s]
    return 13


def layer_assigner(model: nn.Module, decay_type: str = "auto"):
    """(layer_id(name), num_layers, family) for a ViT (has `blocks`) or a ConvNeXt (has `stages`)."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        n = len(model.blocks) + 1
        return (lambda name: vit_layer_id(name, n)), n, "vit"
    if hasattr(model, "stages") and hasattr(model, "downsample_layers"):
        depths = tuple(len(s) for s in model.stages)
        kind = decay_type if decay_type != "auto" else ("group" if sum(depths) >= 36 else "single")
        n = 12 if kind == "group" else sum(depths)
        # ConvNeXt V2's scales run to L + 1 (one more id than MAE's); shift by one to share the formula.
        return (lambda name: convnext_layer_id(name, depths, kind)), n + 1, f"convnext-{kind}"
    raise ValueError(f"layer-wise lr decay knows ViTs and ConvNeXts, not {type(model).__name__}")


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float, decay_type: str = "auto",
                     no_weight_decay: tuple[str, ...] = VIT_NO_WEIGHT_DECAY) -> list[dict]:
    """Groups "layer_<id>_<decay|no_decay>" in first-seen order, each {params, weight_decay, lr_scale, name}."""
    layer_id, num_layers, _ = layer_assigner(model, decay_type)
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith((".bias", ".gamma", ".beta")) or name in no_weight_decay
        lid = layer_id(name)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scales[lid]}
        groups[key]["params"].append(p)
    return list(groups.values())
