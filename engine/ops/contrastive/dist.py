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
Every rank must pass the same batch size (checked once per shape, then cached: no host sync per step).
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
    """all_gather along dim 0 forward; backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rows = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)  # (W * b, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        rank, b = dist.get_rank(ctx.group), ctx.rows
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty((b,) + grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce_scatter: sum all, keep ours
        return grad[rank * b:(rank + 1) * b], None


_CHECKED: set = set()  # (group, local shape) pairs whose sizes every rank has confirmed equal


def _check_batch_sizes(image: torch.Tensor, group) -> None:
    """Every rank must pass one (B_local, D). The sizes are exchanged (and read on the host: a sync)
    only the first time this rank passes a shape in this group; later steps with that shape skip it,
    so the training step has no host synchronisation. A rank that changes shape alone (and so skips
    nothing) raises here while the others wait in the feature gather, and torchrun ends the job."""
    key = (id(group), tuple(image.shape))
    if key in _CHECKED:
        return
    mine = torch.tensor([image.shape[0], image.shape[1]], device=image.device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    shapes = [tuple(s) for s in torch.stack(sizes).tolist()]
    if len(set(shapes)) != 1:
        raise ValueError(f"every rank must pass image/text of one shape (B_local, D); got {shapes} by rank")
    _CHECKED.add(key)


def contrastive_loss(image, text, logit_scale, logit_bias, kind, group):
    from engine.ops.contrastive.op import _contrastive

    _check_batch_sizes(image, group)
    b = image.shape[0]
    image_all = _GatherRows.apply(image, group)
    text_all = _GatherRows.apply(text, group)
    loss, _ = _contrastive(image_all, text_all, logit_scale, logit_bias, kind, dist.get_rank(group) * b, b)
    return loss
