"""kfe::hog and kfe::hog_targets: the public entries, input checks, custom ops (with fakes) and dispatch.

Both ops are labels, not layers: the result is a constant. Inputs that require grad are detached (as
MaskFeat's HOG layer runs under torch.no_grad), so no gradient ever flows back into the images; no
autograd formula is registered.
"""
from __future__ import annotations

from typing import Optional

import torch

from engine import _cuda, _ext
from engine.backend import FLOAT_DTYPES, Impl, OpBackends, register
from engine.ops import _checks

LOWP = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_NBINS, TRITON_MAX_CELL = 32, 16


def _example(device: torch.device) -> tuple:
    return torch.rand(2, 3, 1, 16, 16, device=device), 9, 8


def _triton_reasons(x, nbins=9, cell=8, *rest) -> list[str]:
    why = []
    if nbins > TRITON_MAX_NBINS:
        why.append(f"nbins <= {TRITON_MAX_NBINS} (got {nbins})")
    if cell > TRITON_MAX_CELL:
        why.append(f"cell <= {TRITON_MAX_CELL} (got {cell})")
    return why


def _cuda_reasons(x, nbins=9, cell=8, patch=None, *rest) -> list[str]:
    from engine.ops.hog import cuda  # importable without CUDA

    return cuda.size_reasons(x.shape[1], nbins, cell, patch)


def _cuda_missing() -> list[str]:
    if _ext.has_op("_hog_cuda"):
        return []
    why = _cuda.runtime_reasons("hog")
    return ["engine._C has no CUDA HOG kernel (it is built only against a CUDA torch with nvcc)"] + why if why else []


BACKENDS = register(OpBackends("hog", example=_example))
BACKENDS.add(Impl("cuda", "engine.ops.hog.cuda", dtypes=LOWP, available=_cuda_missing, check=_cuda_reasons))
BACKENDS.add(Impl("triton", "engine.ops.hog.triton", dtypes=LOWP, check=_triton_reasons))
BACKENDS.add(Impl("cpp", "engine.ops.hog.cpp", dtypes=FLOAT_DTYPES,
                  available=lambda: [] if _ext.has_op("_hog_cpp") else ["engine._C has no HOG kernel"]))
BACKENDS.add(Impl("reference", "engine.ops.hog.reference"))


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("kfe::hog", mutates_args=())
def _hog(images: torch.Tensor, nbins: int, cell: int, gaussian_window: int) -> torch.Tensor:
    return BACKENDS.select(images, nbins, cell).hog_op(images, nbins, cell, gaussian_window)


@_hog.register_fake
def _hog_fake(images, nbins, cell, gaussian_window):
    B, C, T, H, W = images.shape
    return images.new_empty((B, T, C, nbins, H // cell, W // cell), dtype=_out_dtype(images))


@torch.library.custom_op("kfe::hog_targets", mutates_args=())
def _hog_targets(images: torch.Tensor, mask: Optional[torch.Tensor], patch: int, nbins: int, cell: int,
                 gaussian_window: int) -> torch.Tensor:
    return BACKENDS.select(images, nbins, cell, patch).hog_targets_op(images, mask, patch, nbins, cell, gaussian_window)


@_hog_targets.register_fake
def _hog_targets_fake(images, mask, patch, nbins, cell, gaussian_window):
    B, C, T, H, W = images.shape
    D = C * nbins * (patch // cell) ** 2
    rows = (B, T * (H // patch) * (W // patch)) if mask is None else (torch.library.get_ctx().new_dynamic_size(),)
    return images.new_empty((*rows, D), dtype=_out_dtype(images))


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_images(images, nbins, cell, gaussian_window) -> torch.Tensor:
    """Validated images as the ops' canonical detached (B, C, T, H, W)."""
    _checks.tensor("images", images)
    if images.dim() not in (4, 5):
        raise ValueError(f"images must be (B, C, H, W) or a video (B, C, T, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] < 1:
        raise ValueError(f"images must have at least one channel (C >= 1), got shape {tuple(images.shape)}")
    _int("nbins", nbins, 1)
    _int("cell", cell, 1)
    _int("gaussian_window", gaussian_window, 0)
    H, W = images.shape[-2:]
    if H % cell or W % cell:
        raise ValueError(f"images height and width must be multiples of cell={cell}, got H={H}, W={W}")
    if H < 2 or W < 2:
        raise ValueError(f"images height and width must be >= 2 (reflect padding), got H={H}, W={W}")
    if gaussian_window and (H % gaussian_window or W % gaussian_window):
        raise ValueError(f"images height and width must be multiples of gaussian_window={gaussian_window}, "
                         f"got H={H}, W={W}")
    x = images.detach()  # a label: no gradient flows back (see the module docstring)
    return x.unsqueeze(2) if x.dim() == 4 else x


def hog(images: torch.Tensor, *, nbins: int = 9, cell: int = 8, gaussian_window: int = 0) -> torch.Tensor:
    """MaskFeat's HOG (reference.py is the spec): L2-normalised histograms of oriented gradients per cell.

    Args:
        images: (B, C, H, W), or a video (B, C, T, H, W) taken frame by frame; H and W multiples of
            `cell`. float32 / float16 / bfloat16 (float64 on the cpp and reference backends).
        nbins: unsigned orientation bins over [0, pi). cell: cell side in pixels.
        gaussian_window: 0 (MaskFeat's default) or the side of a Gaussian weighting of the magnitudes
            (std gaussian_window / 2) tiled over the image; H and W must be multiples of it.

    Returns float32 (float64 for float64 input) (B, C, nbins, H/cell, W/cell), or (B, T, C, nbins, H/cell,
    W/cell) for a video. A constant: images that require grad are detached.
    """
    x = _check_images(images, nbins, cell, gaussian_window)
    out = _hog(x, nbins, cell, gaussian_window)  # (B, T, C, nbins, h, w)
    return out.squeeze(1) if images.dim() == 4 else out


def hog_targets(images: torch.Tensor, *, patch: int = 16, mask: torch.Tensor | None = None, nbins: int = 9,
                cell: int = 8, gaussian_window: int = 0) -> torch.Tensor:
    """MaskFeat's prediction targets: per patch x patch token, its (C, nbins, patch/cell, patch/cell) HOG block.

    Args:
        images: (B, C, H, W) or a video (B, C, T, H, W); H and W multiples of `patch`.
        patch: token side in pixels, a multiple of `cell`.
        mask: optional bool (B, L). Only the tokens where it is True are computed, returned packed.
        nbins, cell, gaussian_window: as in `hog`.

    Tokens are numbered row-major within a frame, frames outer for a video: L = T * (H/patch) * (W/patch),
    token t * (H/patch) * (W/patch) + row * (W/patch) + col. Returns float32 (float64 for float64 input)
    (B, L, D) with D = C * nbins * (patch/cell)^2 (108 for RGB, 9 bins, 16/8), or with a mask
    (num_masked, D) in row-major (b, token) order, i.e. `hog_targets(images)[mask]`. A constant.
    With a mask the row count depends on the mask's values (as for `x[mask]`): under torch.compile, set
    `torch._dynamo.config.capture_dynamic_output_shape_ops = True` to keep a single graph.
    """
    x = _check_images(images, nbins, cell, gaussian_window)
    _int("patch", patch, 1)
    B, _, T, H, W = x.shape
    if patch % cell:
        raise ValueError(f"patch must be a multiple of cell={cell}, got patch={patch}")
    if H % patch or W % patch:
        raise ValueError(f"images height and width must be multiples of patch={patch}, got H={H}, W={W}")
    if mask is not None:
        _checks.tensor("mask", mask, dtypes=(torch.bool,))
        L = T * (H // patch) * (W // patch)
        if tuple(mask.shape) != (B, L):
            raise ValueError(f"mask must be (B, L) = ({B}, {L}) (True = compute that token), got {tuple(mask.shape)}")
        _checks.same_device("mask", mask, "images", images)
    return _hog_targets(x, mask, patch, nbins, cell, gaussian_window)
