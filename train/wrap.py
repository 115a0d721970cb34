"""Data-parallel wrappers: DDP (default) or FSDP2 `fully_shard`, and their checkpoint state.

DDP keeps a full replica per process; its state dicts are the plain module's. FSDP2 shards
parameters, gradients and optimizer state across processes (for models that do not fit a replica):
each unit (default: every module whose class name ends in "Block") is sharded, then the root. Its
checkpoints gather full, unsharded state dicts on rank 0 through torch.distributed.checkpoint's
state_dict helpers, so a checkpoint reads the same whatever the wrapper or process count.
"""
from __future__ import annotations

from torch import nn

from train.dist import DistInfo


def _units(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Block")]


def wrap_model(module: nn.Module, cfg, info: DistInfo, shard_units: list[nn.Module] | None = None) -> nn.Module:
    """The module to train with (DDP / FSDP2 over torchrun's processes; the module itself alone)."""
    if info.world == 1:
        return module
    if cfg.dist == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in shard_units or _units(module):
            fully_shard(unit)
        fully_shard(module)
        return module  # fully_shard converts in place
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def unwrap_state(module: nn.Module, info: DistInfo) -> dict:
    """Full (unsharded) model state dict of an FSDP2 module; collective, rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def load_wrapped_state(module: nn.Module, sd: dict, info: DistInfo) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, sd, options=_options())


def optimizer_state(module: nn.Module, optimizer, mode: str) -> dict:
    if mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options())


def load_optimizer_state(module: nn.Module, optimizer, sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, sd, options=_options())
