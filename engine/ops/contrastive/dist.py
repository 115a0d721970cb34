"""Multi-process contrastive loss: gather the features, score this rank's rows against every column.

Rank k holds b rows of image and text features. Both are all-gathered (O(B*D) traffic for the global
batch B = W*b; never logits), and kfe::contrastive_loss computes the terms of rows R_k = [k*b, (k+1)*b):
for CLIP, image rows R_k against all B texts and text rows R_k against all B images; for SigLIP, image
rows R_k against all texts. This is open_clip's `local_loss=True, gather_with_grad=True` scheme.

Convention (what each rank's loss is): loss_k = (terms of rows R_k) / b, i.e. the mean over the rank's
own rows; the global loss is mean_k loss_k. Gradients flow through the gather to the rank that owns
each row (its backward sums every rank's gradient of its features), so each rank's feature gradient
is d(sum_k loss_k)/d(own rows) = W * dL/d(own rows). DDP averages parameter gradients over the W
ranks, which cancels the W: DDP training with this loss has exactly the parameter gradients of
single-process training on the concatenated batch (tests/engine/ops/test_contrastive_dist.py checks
this under torchrun). logit_scale/logit_bias get each rank's own dloss_k/ds, averaged the same way.
Uneven batches are exact: rank k holds b_k rows, R_k starts at b_0 + ... + b_{k-1}, and loss_k is still
the mean over its own rows, so the global loss is sum_k b_k loss_k / B (for DDP with uneven batches,
scale each rank's loss by W b_k / B to keep the single-process gradients). The sizes are exchanged
once per local shape and cached (`batch_sizes`): no host sync per step.

Overlap: the gather is not overlapped with local tiles. Image and text go in one all_gather (one
latency instead of two). Overlapping needs a block of work that does not depend on the gathered rows,
and the kernels have none big enough: the forward's row statistics (LSE over all B columns) could start
on the local b x b block and merge the remote columns later (the kernels already merge column splits),
but that is 1/W of the forward, and the backward needs the complete LSE before its first tile, so
the op would have to be split into per-column-block calls and its backward into two phases. With the
features' O(B D) gather against O(n B D) tile work, the gather is the smaller cost; a ring schedule
(Inf-CL), which hides each block's transfer behind the previous block's tiles, is the way to get it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def resolve_group(group):
    """The process group to use, or None for a single-process loss (see contrastive_loss's `group`)."""
    if group is False:
        return None
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group must be None (the default process group when initialised), False (this "
                        f"process only) or a torch.distributed ProcessGroup, got {type(group).__name__}")
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _GatherRows(torch.autograd.Function):
    """Gather the rows of every rank (sizes[k] rows on rank k, each padded to max(sizes) for the
    collective) along dim 0; backward sums every rank's gradient of the gathered rows and keeps this
    rank's own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: tuple) -> torch.Tensor:
        ctx.group, ctx.sizes = group, sizes
        pad = max(sizes)
        x = x.contiguous()
        if x.shape[0] < pad:
            x = torch.cat([x, x.new_zeros((pad - x.shape[0],) + x.shape[1:])])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
        if min(sizes) == pad:
            return torch.cat(parts)  # (sum(sizes), ...)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, rank = ctx.sizes, dist.get_rank(ctx.group)
        pad = max(sizes)
        if min(sizes) == pad:
            padded = grad.contiguous()
        else:  # back to the padded (W * pad) layout of the collective
            padded = grad.new_zeros((len(sizes) * pad,) + grad.shape[1:])
            for k, part in enumerate(grad.split(list(sizes))):
                padded[k * pad:k * pad + sizes[k]] = part
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = padded.new_empty((pad,) + padded.shape[1:])
            dist.reduce_scatter_tensor(out, padded, group=ctx.group)
        else:  # gloo has no reduce_scatter: sum all, keep ours
            dist.all_reduce(padded, group=ctx.group)
            out = padded[rank * pad:(rank + 1) * pad]
        return out[:sizes[rank]], None, None


_SIZES: dict = {}  # (group, local shape) -> every rank's local batch size, exchanged once per shape


def batch_sizes(image: torch.Tensor, group) -> tuple:
    """Every rank's local batch size. They are exchanged (and read on the host: a sync) only the first
    time this rank passes a shape in this group; later steps with that shape take them from the cache,
    so the training step has no host synchronisation. Uneven batches are exact (rows are padded for the
    collective and cut after it). Every rank must therefore meet a new local shape at the same step
    (e.g. a last, smaller batch on every rank); D must be the same everywhere (checked)."""
    key = (id(group), tuple(image.shape))
    if key in _SIZES:
        return _SIZES[key]
    mine = torch.tensor([image.shape[0], image.shape[1]], device=image.device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    shapes = [tuple(s) for s in torch.stack(sizes).tolist()]
    if len({d for _, d in shapes}) != 1:
        raise ValueError(f"every rank must pass image/text of one width D; got (B_local, D) = {shapes} by rank")
    _SIZES[key] = tuple(b for b, _ in shapes)
    return _SIZES[key]


def contrastive_loss(image, text, logit_scale, logit_bias, kind, group):
    from engine.ops.contrastive.op import _contrastive

    sizes = batch_sizes(image, group)
    rank, b, D = dist.get_rank(group), image.shape[0], image.shape[1]
    if image.dtype == text.dtype:  # one collective for both towers: half the latency of two
        both = _GatherRows.apply(torch.cat([image, text], dim=1), group, sizes)
        image_all, text_all = both[:, :D], both[:, D:]
    else:
        image_all, text_all = _GatherRows.apply(image, group, sizes), _GatherRows.apply(text, group, sizes)
    loss, _ = _contrastive(image_all, text_all, logit_scale, logit_bias, kind, sum(sizes[:rank]), b)
    return loss
