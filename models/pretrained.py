"""Load released weights into a KFE model: `models.load_pretrained(model, path)`.

Accepts what open_clip, OpenAI, MetaCLIP, SLIP and `kfe export` write: `.pt` / `.pth` / `.bin`
(torch.save of a state dict, or of {"state_dict": ...} / {"model": ...}, keys optionally prefixed by
`module.` from DDP) and `.safetensors`. Loading is strict: every key and shape must match, so a wrong
architecture fails loudly instead of leaving random weights behind. torch.load runs with
weights_only=True (a checkpoint file cannot run code); OpenAI's TorchScript archives are not read.
"""
from __future__ import annotations

import os

import torch
from torch import nn

WRAPPERS = ("state_dict", "model", "module")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and without a `module.` prefix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - say which file and why, in one line
            raise ValueError(f"{path}: not a weights-only torch checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]})") from None
    for key in WRAPPERS:  # {"state_dict": {...}} (open_clip / MetaCLIP training), {"model": ...} (SLIP, KFE)
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (optionally under 'state_dict' or 'model')")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_pretrained(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load a checkpoint file into `model` (strict by default); returns the model."""
    sd = read_state_dict(path)
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {type(model).__name__}: {str(err)[:2000]}") from None
    return model
