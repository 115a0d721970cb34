"""HOG targets of MaskFeat (Wei et al., "Masked Feature Prediction", arXiv 2112.09133, Sec. 3.2): the spec.

MaskFeat predicts, for every masked 16x16 patch, Histograms of Oriented Gradients of the input. This
file follows the HOG layer of the official code (`HOGLayerC` in SlowFast, slowfast/models/operators.py)
step by step, per colour channel and per frame:

    pad      reflect-pad the image by 1 pixel
    Sobel    gx = Kx * p, gy = Ky * p as cross-correlation (F.conv2d), Kx = [[1,0,-1],[2,0,-2],[1,0,-1]],
             Ky = Kx^T
    vote     magnitude |g| = sqrt(gx^2 + gy^2); phase = atan2(gx, gy) (this argument order);
             bin = floor(phase / pi * nbins) mod nbins (Python modulo: unsigned orientation, hard vote)
    window   optional: |g| *= a gaussian_window x gaussian_window Gaussian (std gaussian_window / 2,
             normalised to sum 1) tiled over the image
    cells    sum |g| per bin over non-overlapping cell x cell pixels -> (B, C, nbins, H/cell, W/cell)
    norm     L2-normalise over the bins of each (channel, cell): F.normalize(p=2, dim=bins, eps=1e-12)

Targets (MaskFeat's `_get_hog_label_2d/3d`): each patch x patch token takes the (C, nbins, patch/cell,
patch/cell) block of the cell histograms, flattened in that order (108 values for RGB, 9 bins, 16/8).
Tokens are numbered row-major within a frame; a video (B, C, T, H, W) is HOG'd frame by frame and its
tokens are numbered frame-major: token = t * (H/patch) * (W/patch) + row * (W/patch) + col.
(MaskFeat first subsamples frames by the temporal patch stride; that is the caller's choice.)

Gradients and orientations are taken in float64 (exact for the Sobel sums of ordinary images, see
hog_cells); magnitudes are summed in float32 (float64 for float64 input), as the official code's
float32 histogram buffer.
Everything here is a label: nothing is differentiated (the official layer runs under no_grad).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gaussian_kernel(size: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """(size, size) Gaussian with std size / 2, normalised to sum 1 (MaskFeat's get_gkern, which uses
    std = size // 2: the same for the even windows it uses)."""
    n = torch.arange(size, dtype=torch.float64)
    g = torch.exp(-0.5 * ((n - n.mean()) / (size / 2)) ** 2)
    g2 = torch.outer(g, g)
    return (g2 / g2.sum()).to(dtype=dtype, device=device)


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gx, gy) of x (N, C, H, W) per channel: reflect pad 1, then 3x3 cross-correlation."""
    C = x.shape[1]
    kx = torch.tensor(_SOBEL_X, dtype=x.dtype, device=x.device).view(1, 1, 3, 3).repeat(C, 1, 1, 1)
    ky = kx.transpose(2, 3)
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(xp, kx, groups=C), F.conv2d(xp, ky, groups=C)


def hog_cells(frames: torch.Tensor, nbins: int = 9, cell: int = 8, gaussian_window: int = 0) -> torch.Tensor:
    """Normalised cell histograms (N, C, nbins, H/cell, W/cell) of frames (N, C, H, W)."""
    N, C, H, W = frames.shape
    dtype = acc_dtype(frames)
    # Gradients and phase are evaluated in float64 whatever the input precision: the bins are those of
    # the input values as given. A Sobel sum of float32 (or lower) values is exact in float64 whenever
    # the nonzero values of the 3x3 neighbourhood lie within 2^26 of each other in magnitude (every
    # ordinary image, raw, /255 or mean/std normalised), in any summation order, so every path that
    # does the same sees the same gradient; in float32 the rounded gradient flips bins of pixels near a
    # boundary (1-2% of the values of a /255 image). Orientations exactly on a boundary (pi/4, pi/2,
    # 3pi/4, when nbins is even) land on the upper side as in exact arithmetic.
    gx, gy = sobel(frames.detach().double())
    mag = torch.stack([gx, gy], dim=-1).norm(dim=-1).to(dtype)  # (N, C, H, W)
    phase = torch.atan2(gx, gy) / math.pi * nbins               # in [-nbins, nbins]
    bins = phase.floor().long() % nbins                         # (N, C, H, W), in [0, nbins)
    if gaussian_window:
        w = gaussian_window
        mag = mag * gaussian_kernel(w, dtype, mag.device).repeat(H // w, W // w)
    votes = torch.zeros(N, C, nbins, H, W, dtype=dtype, device=mag.device)
    votes.scatter_add_(2, bins.unsqueeze(2), mag.unsqueeze(2))  # one-hot vote per pixel
    cells = votes.unfold(3, cell, cell).unfold(4, cell, cell).sum(dim=(-1, -2))  # (N, C, nbins, h, w)
    return F.normalize(cells, p=2, dim=2, eps=1e-12)


def _frames(images: torch.Tensor) -> torch.Tensor:
    """(B*T, C, H, W) frames of images (B, C, H, W) or of a video (B, C, T, H, W)."""
    if images.dim() == 4:
        return images
    B, C, T, H, W = images.shape
    return images.transpose(1, 2).reshape(B * T, C, H, W)


def hog(images: torch.Tensor, *, nbins: int = 9, cell: int = 8, gaussian_window: int = 0) -> torch.Tensor:
    """HOG of images (B, C, H, W) -> (B, C, nbins, H/cell, W/cell), or of a video (B, C, T, H, W) frame
    by frame -> (B, T, C, nbins, H/cell, W/cell)."""
    out = hog_cells(_frames(images), nbins, cell, gaussian_window)  # (B*T, C, nbins, h, w)
    return out if images.dim() == 4 else out.unflatten(0, (images.shape[0], images.shape[2]))


def hog_targets(images: torch.Tensor, *, patch: int = 16, mask: torch.Tensor | None = None, nbins: int = 9,
                cell: int = 8, gaussian_window: int = 0) -> torch.Tensor:
    """MaskFeat's HOG targets (B, L, C*nbins*(patch/cell)^2); with a bool mask (B, L), only the tokens
    where it is True, packed (num_masked, D) in row-major (b, token) order."""
    B, u = images.shape[0], patch // cell
    cells = hog_cells(_frames(images), nbins, cell, gaussian_window).flatten(1, 2)  # (B*T, C*nbins, h, w)
    tokens = (cells.permute(0, 2, 3, 1)                          # (B*T, h, w, C*nbins)
              .unfold(1, u, u).unfold(2, u, u)                   # (B*T, h/u, w/u, C*nbins, u, u)
              .flatten(1, 2).flatten(2))                         # (B*T, Lf, D)
    T = images.shape[2] if images.dim() == 5 else 1
    tokens = tokens.reshape(B, T * tokens.shape[1], tokens.shape[2])  # (B, T*Lf, D): frames outer
    return tokens if mask is None else tokens[mask]


# The reference *backend* of kfe::hog / kfe::hog_targets: the functions above on the ops' canonical
# arguments (images always (B, C, T, H, W); hog returns (B, T, C, nbins, h, w)).
def hog_op(x: torch.Tensor, nbins: int, cell: int, gaussian_window: int) -> torch.Tensor:
    return hog(x, nbins=nbins, cell=cell, gaussian_window=gaussian_window).contiguous()


def hog_targets_op(x: torch.Tensor, mask: torch.Tensor | None, patch: int, nbins: int, cell: int,
                   gaussian_window: int) -> torch.Tensor:
    return hog_targets(x, patch=patch, mask=mask, nbins=nbins, cell=cell,
                       gaussian_window=gaussian_window).contiguous()
