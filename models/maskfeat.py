"""MaskFeat: "Masked Feature Prediction for Self-Supervised Visual Pre-Training" (Wei et al., arXiv 2112.09133).

A ViT sees the whole token sequence in which masked patch embeddings are replaced by a learned
`mask_token` (before positions are added; unlike MAE, every token goes through the encoder); a linear
head predicts, for every masked token, the HOG of that 16x16 patch of the input (Sec. 3.2; 9 unsigned
bins per 8x8 cell, L2-normalised per cell: 3 * 9 * (16/8)^2 = 108 values); the loss is the mean squared
error over the masked tokens only. Targets come from `engine.ops.hog_targets(images, mask=mask)`, which
computes only the masked tokens, packed in row-major (sample, token) order; predictions are gathered
with `pred[mask]`, which packs them in that same order.

Layout follows the official code (facebookresearch/SlowFast, `MaskMViT` in slowfast/models/masked.py,
run with ViT settings by configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml): cls token on, learned absolute
positions (trunc-normal 0.02), `mask_token` (trunc-normal 0.02) swapped in as x * (1 - m) + token * m,
the head a LayerNorm then one Linear (`MSSeparateHead`: `pred_head.transforms.0.0`,
`pred_head.projections.0`, trunc-normal 0.02, zero bias). Keys here are the timm / MAE ViT's
(`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.i.*`, `norm`) so the encoder loads straight into
`vit_<size>_patch16`; the head's LayerNorm is our `norm` (`to_slowfast` / `from_slowfast` rename it),
plus `mask_token` and `pred_head.projections.0.{weight,bias}`.

Video (B, 3, T, H, W): space-time tokens of 2 x 16 x 16 pixels (Conv3d patch embedding, SlowFast's
PATCH_KERNEL (2, 16, 16) for ViT on Kinetics) numbered frames outer, then row-major; separable learned
positions `pos_embed_spatial` + `pos_embed_temporal` (+ `pos_embed_class`), SlowFast's SEP_POS_EMBED.
The target of a 2-frame cube is the HOG of its first frame (108 values): SlowFast's `_get_hog_label_3d`
subsamples the frames by the temporal patch stride before computing HOG. Masks are space-time cubes
(SlowFast's default MaskingGenerator3D) or tubes (`video_mask="tube"`), see models/masking.py.

`forward(x, mask)` returns dense predictions (B, L, 108): static shapes, so it compiles with
fullgraph=True as is. The packed gather `pred[mask]` and the masked targets have a data-dependent row
count: `forward_loss` runs them eagerly, or under torch.compile with
`torch._dynamo.config.capture_dynamic_output_shape_ops = True` (see tests/models/test_maskfeat.py).
"""
from __future__ import annotations

import torch
from torch import nn

import engine.ops
from models.masking import block_mask
from models.pos_embed import sincos_1d, sincos_2d
from models.registry import register_model
from models.vit import VARIANTS, VisionTransformer

SLOWFAST_NORM = "pred_head.transforms.0.0."  # SlowFast's name for the LayerNorm before the head


class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) -> (B, L, D), one token per t x p x p cube, frames outer then row-major."""

    def __init__(self, img_size: int, patch_size: int, num_frames: int, t_patch: int, in_chans: int,
                 embed_dim: int):
        super().__init__()
        if num_frames % t_patch:
            raise ValueError(f"num_frames ({num_frames}) must be a multiple of t_patch ({t_patch})")
        self.img_size, self.patch_size, self.num_frames, self.t_patch = img_size, patch_size, num_frames, t_patch
        self.grid = (num_frames // t_patch, img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(t_patch, patch_size, patch_size),
                              stride=(t_patch, patch_size, patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[-3:] != (self.num_frames, self.img_size, self.img_size):
            raise ValueError(f"expected clips (B, C, {self.num_frames}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T' * h * w, D)


class MaskFeatHead(nn.Module):
    """The linear HOG predictor (SlowFast's MSSeparateHead with one projection: `projections.0`)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.projections = nn.ModuleList([nn.Linear(dim, out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projections[0](x)


class MaskFeatViT(VisionTransformer):
    """ViT + mask token + linear HOG head. num_frames = 1: images (B, 3, H, W); > 1: clips (B, 3, T, H, W)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, pos_embed: str = "learned", num_frames: int = 1, t_patch: int = 2,
                 mask_ratio: float = 0.4, video_mask: str = "cube", nbins: int = 9, cell: int = 8,
                 gaussian_window: int = 0, k_bias: bool = True, target: str = "hog"):
        super().__init__(img_size, patch_size, in_chans, 0, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                         drop_path_rate, pos_embed, k_bias)
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        if patch_size % cell:
            raise ValueError(f"patch_size ({patch_size}) must be a multiple of the HOG cell ({cell})")
        if video_mask not in ("cube", "tube"):
            raise ValueError(f"video_mask must be 'cube' or 'tube', got {video_mask!r}")
        if target not in ("hog", "pixel"):
            raise ValueError(f"target must be 'hog' or 'pixel', got {target!r}")
        self.num_frames, self.mask_ratio, self.video_mask, self.target = num_frames, mask_ratio, video_mask, target
        self.hog_args = dict(patch=patch_size, nbins=nbins, cell=cell, gaussian_window=gaussian_window)
        # HOG: 108 for RGB 16 px patches; pixel (the paper's Table 1 "pixel colors" row): the patch's
        # (normalised) input values, p * p * 3
        self.target_dim = in_chans * (nbins * (patch_size // cell) ** 2 if target == "hog" else patch_size ** 2)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pred_head = MaskFeatHead(embed_dim, self.target_dim)
        if num_frames > 1:
            self._make_video(img_size, patch_size, num_frames, t_patch, in_chans, embed_dim, pos_embed)
        self.grid = self.patch_embed.grid
        budget = round(mask_ratio * self.patch_embed.num_patches)
        if budget < 1:
            raise ValueError(f"mask_ratio {mask_ratio} masks {budget} of {self.patch_embed.num_patches} tokens")
        if self.cls_token.device.type != "meta":
            self._init_maskfeat(pos_embed)

    def _make_video(self, img_size, patch_size, num_frames, t_patch, in_chans, embed_dim, pos_embed):
        self.patch_embed = PatchEmbed3D(img_size, patch_size, num_frames, t_patch, in_chans, embed_dim)
        t, h, w = self.patch_embed.grid
        del self.pos_embed  # the joint table of the image ViT; video positions are separable
        learned = pos_embed == "learned"
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, embed_dim), requires_grad=learned)
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, embed_dim), requires_grad=learned)
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, embed_dim), requires_grad=learned)

    def _init_maskfeat(self, pos_embed: str) -> None:
        with torch.no_grad():
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            head = self.pred_head.projections[0]
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            if self.num_frames > 1:
                w = self.patch_embed.proj.weight
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))
                nn.init.zeros_(self.patch_embed.proj.bias)
                if pos_embed == "learned":
                    for p in (self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class):
                        nn.init.trunc_normal_(p, std=0.02)
                else:  # fixed: 2D sin-cos over (row, column), 1D sin-cos over time, zeros for cls
                    D, (t, h, w) = self.embed_dim, self.patch_embed.grid
                    self.pos_embed_spatial.copy_(sincos_2d(D, (h, w))[None])
                    self.pos_embed_temporal.copy_(sincos_1d(D, torch.arange(t)).float()[None])

    # ------------------------------------------------------------------ stages

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls position (1, 1, D), token positions (1, L, D) in the patch embedding's order)."""
        if self.num_frames == 1:
            return self.pos_embed[:, :1], self.pos_embed[:, 1:]
        hw = self.pos_embed_spatial.shape[1]
        t = self.pos_embed_temporal.shape[1]
        grid = self.pos_embed_spatial.repeat(1, t, 1) + self.pos_embed_temporal.repeat_interleave(hw, dim=1)
        return self.pos_embed_class, grid  # (1, t * h * w, D): frames outer, as the tokens

    def check_mask(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        L = self.patch_embed.num_patches
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (B, L) with True = masked, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != (x.shape[0], L):
            raise ValueError(f"mask must be (B, L) = ({x.shape[0]}, {L}), got {tuple(mask.shape)}")

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images / clips (and an optional bool mask (B, L), True = masked) -> normed tokens (B, 1 + L, D)."""
        tokens = self.patch_embed(x)  # (B, L, D)
        if mask is not None:
            self.check_mask(x, mask)
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        cls_pos, pos = self.positions()
        cls = (self.cls_token + cls_pos).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens + pos], dim=1)  # (B, 1 + L, D); positions added after the mask token
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Dense HOG predictions (B, L, target_dim) for every token (the loss reads the masked ones)."""
        return self.pred_head(self.forward_features(x, mask)[:, 1:])

    def target_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Frames whose HOG is the target: the image, or the first frame of every t_patch-frame cube."""
        return x if self.num_frames == 1 else x[:, :, ::self.patch_embed.t_patch]  # (B, C, T', H, W)

    @torch.no_grad()
    def forward_target(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Targets of the masked tokens only, packed (num_masked, target_dim) in row-major order: their HOG,
        or with target="pixel" their input pixels (channels, rows, columns of the patch, flattened)."""
        frames = self.target_frames(x).detach()
        if self.target == "hog":
            return engine.ops.hog_targets(frames, mask=mask, **self.hog_args)
        p = self.patch_embed.patch_size
        if frames.dim() == 4:  # images (B, C, H, W) -> one "frame"
            frames = frames.unsqueeze(2)
        B, C, T, H, W = frames.shape
        patches = frames.reshape(B, C, T, H // p, p, W // p, p).permute(0, 2, 3, 5, 1, 4, 6)  # frames outer
        return patches.reshape(B, T * (H // p) * (W // p), C * p * p)[mask].float()

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over the masked tokens: pred (B, L, K) gathered by mask -> (num_masked, K) in the targets' order."""
        err = (pred[mask].float() - target) ** 2  # (num_masked, K), packed as hog_targets packs
        return err.sum() / (mask.sum().clamp_min(1) * err.shape[-1])

    def random_mask(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """Block-wise (images) or cube / tube (video) masks (B, L), True = masked, ratio `mask_ratio`."""
        return block_mask(batch, self.grid, self.mask_ratio, generator=generator, device=device,
                          tube=self.num_frames > 1 and self.video_mask == "tube")

    def loss(self, x: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """(loss, {"pred": (M, K), "target": (M, K), "mask": (B, L)}) for one batch; masks drawn if not given."""
        if mask is None:
            mask = self.random_mask(x.shape[0], generator, x.device)
        pred = self(x, mask)
        target = self.forward_target(x, mask)
        return self.forward_loss(pred, target, mask), {"pred": pred[mask], "target": target, "mask": mask}

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features of unmasked input for probing: the mean of the normed patch tokens."""
        return self.forward_features(x)[:, 1:].mean(dim=1)


def from_slowfast(state_dict: dict) -> dict:
    """A SlowFast MaskFeat ViT state dict -> ours (its head LayerNorm is our `norm`)."""
    return {("norm." + k[len(SLOWFAST_NORM):] if k.startswith(SLOWFAST_NORM) else k): v
            for k, v in state_dict.items()}


def to_slowfast(state_dict: dict) -> dict:
    return {(SLOWFAST_NORM + k[len("norm."):] if k.startswith("norm.") else k): v for k, v in state_dict.items()}


def maskfeat(size: str, **overrides) -> MaskFeatViT:
    return MaskFeatViT(**{**VARIANTS[size], "patch_size": 16, **overrides})


@register_model
def maskfeat_vit_small(**kw): return maskfeat("small", **kw)
@register_model
def maskfeat_vit_base(**kw): return maskfeat("base", **kw)
@register_model
def maskfeat_vit_large(**kw): return maskfeat("large", **kw)
@register_model
def maskfeat_vit_huge(**kw): return maskfeat("huge", **kw)
