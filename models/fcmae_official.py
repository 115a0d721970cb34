"""FCMAE state dicts in the official MinkowskiEngine layout (facebookresearch/ConvNeXt-V2, models/fcmae.py).

The official sparse encoder stores MinkowskiEngine parameters; its fine-tuning code (utils.py,
remap_checkpoint_keys) converts them to the dense ConvNeXt V2 layout. `from_official` does that
conversion (keeping the `encoder.` prefix, so the result loads into models.fcmae.FCMAE), `to_official`
is its inverse (what `kfe export` writes for the fcmae recipe, loadable by the official code):

    official (encoder.*)                          here
    stages.i.j.dwconv.kernel      (k*k, C)        stages.i.j.dwconv.weight (C, 1, k, k)   taps transposed
    stages.i.j.dwconv.bias        (1, C)          stages.i.j.dwconv.bias (C,)
    stages.i.j.norm.ln.{weight,bias}              stages.i.j.norm.{weight,bias}
    stages.i.j.pwconv{1,2}.linear.{weight,bias}   stages.i.j.pwconv{1,2}.{weight,bias}
    stages.i.j.grn.{gamma,beta}   (1, C)          (1, 1, 1, C)
    downsample_layers.i.0.ln.*    (i >= 1)        downsample_layers.i.0.*
    downsample_layers.i.1.kernel  (4, Cin, Cout)  downsample_layers.i.1.weight (Cout, Cin, 2, 2)
    downsample_layers.i.1.bias    (1, Cout)       (Cout,)
The stem (downsample_layers.0), proj, mask_token, decoder.* and pred are dense in both. The kernel-tap
order is the official conversion's (its transpose of the two spatial axes); no released checkpoint could
be read here (no network), so that order is checked against the official conversion code only.
"""
from __future__ import annotations

import math

import torch


def is_official(keys) -> bool:
    return any(k.endswith(".kernel") or ".ln." in k or ".linear." in k for k in keys)


def from_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith(".kernel"):
            k = k[: -len("kernel")] + "weight"
            if v.dim() == 3:                                    # (k*k, Cin, Cout) standard conv
                kv, cin, cout = v.shape
                ks = math.isqrt(kv)
                v = v.permute(2, 1, 0).reshape(cout, cin, ks, ks).transpose(3, 2)
            else:                                               # (k*k, C) depthwise
                kv, c = v.shape
                ks = math.isqrt(kv)
                v = v.permute(1, 0).reshape(c, 1, ks, ks).transpose(3, 2)
            v = v.contiguous()
        elif ".ln." in k or ".linear." in k:
            k = k.replace(".ln.", ".").replace(".linear.", ".")
        if k.endswith(".bias") and v.dim() != 1:
            v = v.reshape(-1)
        elif ".grn." in k and v.dim() == 2:
            v = v.reshape(1, 1, 1, -1)
        out[k] = v
    return out


def _kernel(w: torch.Tensor) -> torch.Tensor:
    """(C, 1, k, k) depthwise -> (k*k, C); (Cout, Cin, k, k) -> (k*k, Cin, Cout): from_official inverted."""
    w = w.transpose(3, 2)
    if w.shape[1] == 1:
        return w.reshape(w.shape[0], -1).permute(1, 0).contiguous()
    return w.reshape(w.shape[0], w.shape[1], -1).permute(2, 1, 0).contiguous()


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        sparse_stage = k.startswith("encoder.stages.")
        sparse_down = k.startswith("encoder.downsample_layers.") and parts[2] != "0"
        if not (sparse_stage or sparse_down):                   # stem and decoder: dense in both
            out[k] = v
            continue
        head, layer, name = parts[:-2], parts[-2], parts[-1]
        if sparse_stage and layer == "norm" or sparse_down and layer == "0":
            k = ".".join(head + [layer, "ln", name])
        elif sparse_stage and layer in ("pwconv1", "pwconv2"):
            k = ".".join(head + [layer, "linear", name])
        elif (sparse_stage and layer == "dwconv" or sparse_down and layer == "1") and name == "weight":
            k, v = ".".join(head + [layer, "kernel"]), _kernel(v)
        elif sparse_stage and layer in ("dwconv", "grn") or sparse_down and layer == "1":
            v = v.reshape(1, -1)                                # biases and GRN gamma / beta: (1, C)
        out[k] = v
    return out


def load_hook(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of FCMAE: converts an official (MinkowskiEngine) state dict in place."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not is_official(keys):
        return
    converted = from_official({k[len(prefix):]: state_dict.pop(k) for k in keys})
    state_dict.update({prefix + k: v for k, v in converted.items()})
