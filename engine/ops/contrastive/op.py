"""kfe::contrastive_loss: the public entry, input checks, custom-op registration (fake, autograd, FLOPs).

The custom op computes the loss terms of rows [row_start, row_start + row_count) of embeddings that
hold every row (see reference.py); the single-process call is row_start = 0, row_count = B, and the
multi-process path (dist.py) gathers the features first and passes its rank's rows. Process groups
stay outside the op, so torch.compile traces the single-process path as one op with no graph break.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from engine.backend import Impl, OpBackends, register
from engine.ops import _checks
from engine.ops.contrastive.reference import KINDS

LOWP = (torch.float32, torch.float16, torch.bfloat16)


def _example(device: torch.device) -> tuple:
    x = torch.nn.functional.normalize(torch.randn(8, 32, device=device), dim=-1)
    return x, x.flip(0), torch.tensor(10.0, device=device), None, "clip", 0, 8


BACKENDS = register(OpBackends("contrastive_loss", example=_example))
BACKENDS.add(Impl("triton", "engine.ops.contrastive.triton", dtypes=LOWP))
BACKENDS.add(Impl("reference", "engine.ops.contrastive.reference"))  # chunked over rows: O(B*D) memory


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("kfe::contrastive_loss", mutates_args=())
def _contrastive(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: Optional[torch.Tensor], kind: str, row_start: int,
                 row_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS.select(image).forward(image, text, logit_scale, logit_bias, kind, row_start, row_count)


@_contrastive.register_fake
def _contrastive_fake(image, text, logit_scale, logit_bias, kind, row_start, row_count):
    acc = _acc(image)
    return image.new_empty((), dtype=acc), image.new_empty((2 if kind == "clip" else 0, row_count), dtype=acc)


@torch.library.custom_op("kfe::contrastive_loss_backward", mutates_args=())
def _contrastive_backward(grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                          logit_bias: Optional[torch.Tensor], stats: torch.Tensor, kind: str, row_start: int,
                          row_count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(BACKENDS.select(image).backward(grad, image, text, logit_scale, logit_bias, stats, kind,
                                                 row_start, row_count))


@_contrastive_backward.register_fake
def _contrastive_backward_fake(grad, image, text, logit_scale, logit_bias, stats, kind, row_start, row_count):
    acc = _acc(image)
    return (torch.empty_like(image, memory_format=torch.contiguous_format),
            torch.empty_like(text, memory_format=torch.contiguous_format),
            image.new_empty((), dtype=acc), image.new_empty((), dtype=acc))


def _setup_context(ctx, inputs, output):
    image, text, logit_scale, logit_bias, kind, row_start, row_count = inputs
    ctx.save_for_backward(image, text, logit_scale, logit_bias, output[1])
    ctx.args = (kind, row_start, row_count)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dloss, dstats):
    image, text, logit_scale, logit_bias, stats = ctx.saved_tensors
    dimage, dtext, dscale, dbias = _contrastive_backward(dloss, image, text, logit_scale, logit_bias, stats,
                                                         *ctx.args)
    dscale = dscale.reshape(logit_scale.shape).to(logit_scale.dtype)
    dbias = None if logit_bias is None else dbias.reshape(logit_bias.shape).to(logit_bias.dtype)
    return dimage, dtext, dscale, dbias, None, None, None


_contrastive.register_autograd(_backward, setup_context=_setup_context)


# Useful FLOPs (what the math needs, not what a kernel recomputes): the logits CLIP needs are the rows R
# and the columns R of the B x B matrix (a cross of 2nB - n^2 cells; all B^2 for one process), SigLIP's
# the rows R (nB cells). Forward: 2D per cell (the similarity); backward: 4D per cell (dimage, dtext).
def _cells(kind: str, B: int, n: int) -> int:
    return 2 * n * B - n * n if kind == "clip" else n * B


@register_flop_formula(torch.ops.kfe.contrastive_loss)
def _forward_flops(image_shape, text_shape, scale_shape, bias_shape, kind, row_start, row_count, *args,
                   out_shape=None, **kwargs) -> int:
    B, D = image_shape
    return 2 * D * _cells(kind, B, row_count)


@register_flop_formula(torch.ops.kfe.contrastive_loss_backward)
def _backward_flops(grad_shape, image_shape, text_shape, scale_shape, bias_shape, stats_shape, kind, row_start,
                    row_count, *args, out_shape=None, **kwargs) -> int:
    B, D = image_shape
    return 4 * D * _cells(kind, B, row_count)


def _scalar(name: str, value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    _checks.tensor(name, value)
    if value.dim() > 1 or value.numel() != 1:
        raise ValueError(f"{name} must be a scalar tensor (shape () or (1,)), got shape {tuple(value.shape)}")
    _checks.same_device(name, value, "image", like)
    return value


def check(image, text, logit_scale, logit_bias, kind):
    """Validate the public arguments; returns (logit_scale, logit_bias) as tensors (or None)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    _checks.tensor("image", image, ndim=2, layout="(B, D)")
    _checks.tensor("text", text, ndim=2, layout="(B, D)")
    if text.shape != image.shape:
        what = "rows (batch)" if text.shape[0] != image.shape[0] else "columns (embedding dim D)"
        raise ValueError(f"text must have the shape of image {tuple(image.shape)} (B, D), got "
                         f"{tuple(text.shape)}: the {what} differ")
    if text.dtype != image.dtype:
        raise TypeError(f"text has dtype {text.dtype} but image has {image.dtype}; pass one dtype")
    _checks.same_device("text", text, "image", image)
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image and text must be non-empty (B >= 1, D >= 1), got shape {tuple(image.shape)}")
    logit_scale = _scalar("logit_scale", logit_scale, image)
    if logit_bias is not None:
        if kind != "siglip":
            raise ValueError("logit_bias is only used with kind='siglip' (a constant added to every CLIP "
                             "logit cancels in both softmaxes)")
        logit_bias = _scalar("logit_bias", logit_bias, image)
    return logit_scale, logit_bias


def _autocast(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast, the embeddings in the autocast dtype, as torch.matmul would take them: the similarity
    dots then run in bf16/fp16 with fp32 accumulation (F.normalize returns float32 under autocast, so
    without this a CLIP model would send float32 and run the exact-fp32 path)."""
    device = image.device.type
    if image.dtype in LOWP and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if image.dtype != dtype:
            return image.to(dtype), text.to(dtype)
    return image, text


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale, logit_bias=None, *,
                     kind: str = "clip", group=None) -> torch.Tensor:
    """CLIP or SigLIP loss of L2-normalised image and text embeddings, never building B x B logits.

    Args:
        image, text: (B, D) embeddings, already L2-normalised; float32 / float16 / bfloat16 (float64 on
            the reference backend). Row i of image and row i of text are a positive pair.
        logit_scale: the multiplier s (a 0-d or (1,) tensor, or a number): the caller exponentiates
            its learnable log-temperature, as CLIP does (see engine.nn.ContrastiveLoss).
        logit_bias: SigLIP's bias b (0-d tensor or number); only with kind="siglip" (default 0).
        kind: "clip": (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2, mean over rows.
            "siglip": -sum_ij log sigmoid(z_ij (s <i_i, t_j> + b)) / B, z = +1 on the diagonal, -1 off it.
        group: a process group: each rank passes its local batch; the features (never logits) are
            all-gathered and this rank's rows are scored against every rank's columns. None: the
            default group when torch.distributed is initialised with world size > 1; False: this
            process's batch only; anything else raises TypeError. Each rank's loss is the mean of its own rows' terms (the global loss
            is the mean over ranks), so DDP's gradient averaging yields exactly the gradients of the
            single-process loss on the concatenated batch (see dist.py). Ranks may pass different
            local batch sizes (exact; the sizes are exchanged once per local shape, see dist.py).

    Precision: under autocast the dots run in the autocast dtype (float32 embeddings are cast, as
    torch.matmul does); float32 outside autocast runs TF32 dots when
    torch.get_float32_matmul_precision() is "high"/"medium" and exact fp32 at "highest" (the default).

    Returns a 0-d float32 tensor (float64 for float64 input), differentiable in image, text,
    logit_scale and logit_bias. Non-finite inputs give a non-finite loss: a NaN anywhere gives NaN; an
    inf gives NaN or inf (which one depends on the order of operations and may differ between the
    backends: -inf in image gives inf on the reference path for CLIP and NaN in the Triton kernel). The
    gradients of a non-finite loss are unspecified (they may be finite, as SigLIP's saturate).
    """
    logit_scale, logit_bias = check(image, text, logit_scale, logit_bias, kind)
    image, text = _autocast(image, text)
    from engine.ops.contrastive import dist

    group = dist.resolve_group(group)
    if group is not None:
        return dist.contrastive_loss(image, text, logit_scale, logit_bias, kind, group)
    loss, _ = _contrastive(image, text, logit_scale, logit_bias, kind, 0, image.shape[0])
    return loss
