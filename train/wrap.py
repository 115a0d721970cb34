"""Data-parallel wrappers: DDP (default) or FSDP2 `fully_shard`, and their checkpoint state.

DDP keeps a full replica per process; its state dicts are the plain module's. FSDP2 shards
parameters, gradients and optimizer state across processes (for models that do not fit a replica):
each unit (default: every module whose class name ends in "Block") is sharded, then the root. Its
training checkpoints are sharded (train/dcp.py); the full-state helpers below serve loading a
single-file checkpoint into a sharded model.
"""
from __future__ import annotations

import contextlib

from torch import nn

from train.dist import DistInfo


def _units(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Block")]


def per_block(module: nn.Module, act_ckpt: bool, compile_blocks: bool,
              units: list[nn.Module] | None = None) -> int:
    """Per unit (every *Block): --act_ckpt recomputes its activations in the backward instead of keeping
    them (torch.distributed._composable.checkpoint: non-reentrant, RNG state replayed, state-dict keys
    unchanged); --compile_blocks torch.compiles it in place (one graph per block type, reused by every
    block; no graph over FSDP2's collectives). Applied before fully_shard, which composes with both.
    Returns how many units."""
    units = units or _units(module)
    if act_ckpt:
        from torch.distributed._composable import checkpoint

        for unit in units:
            checkpoint(unit)
    if compile_blocks:
        for unit in units:
            unit.compile()
    return len(units)


def wrap_model(module: nn.Module, cfg, info: DistInfo, shard_units: list[nn.Module] | None = None) -> nn.Module:
    """The module to train with (DDP / FSDP2 over torchrun's processes; the module itself alone)."""
    if getattr(cfg, "act_ckpt", False) or getattr(cfg, "compile_blocks", False):
        per_block(module, cfg.act_ckpt, cfg.compile_blocks, shard_units)
    if info.world == 1:
        return module
    if cfg.dist == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # FSDP2 cannot shard 0-d parameters (CLIP's logit_scale; official checkpoints keep it a scalar):
        # they stay replicated and their gradient is averaged over processes here, as DDP would.
        scalars = {p for p in module.parameters() if p.dim() == 0}
        for unit in shard_units or _units(module):
            fully_shard(unit, ignored_params=scalars or None)
        fully_shard(module, ignored_params=scalars or None)
        for p in scalars:
            p.register_post_accumulate_grad_hook(_average_grad)
        return module  # fully_shard converts in place
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


@contextlib.contextmanager
def unsharded(module: nn.Module, sharded: bool):
    """Full parameters on every process for the duration (FSDP2): evaluation calls sub-modules
    (e.g. CLIP's encode_text) whose parameters only a root forward would gather. Everything is
    gathered once up front (a collective every process joins) and kept until the end, so an
    evaluation that runs a different number of forwards per process cannot deadlock."""
    if not sharded:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in units:
        if m is not module:
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            if m is not module:
                m.set_reshard_after_forward(True, recurse=False)


def _average_grad(param: nn.Parameter) -> None:
    """Average a replicated parameter's gradient over processes (after each accumulation step: the
    part already averaged is equal on every process, so averaging again leaves it unchanged)."""
    import torch.distributed as dist

    dist.all_reduce(param.grad)  # SUM then divide: gloo has no AVG
    param.grad.div_(dist.get_world_size())


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
