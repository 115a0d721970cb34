"""FCMAE: the fully convolutional masked autoencoder of ConvNeXt V2 (Woo et al., arXiv 2301.00808, Sec. 3.1).

Per sample, 60% of the 32x32-pixel patches are removed at random; a ConvNeXt V2 encoder sees only the
visible part as a sparse tensor (Sec. 3.1: "sparse convolution", so nothing leaks across the mask),
a light decoder (1x1 conv to 512, mask tokens at the removed patches, one dense ConvNeXt V2 block,
1x1 conv to 32*32*3 values per patch) reconstructs the image, and the loss is the MSE on the removed
patches (of per-patch normalised pixels by default).

Encoder on the engine's sparse path (engine.sparse, engine.nn), the official SparseConvNeXtV2 without
MinkowskiEngine:
    stem        Conv2d 4x4 s4 + LayerNorm on the whole image (dense, as the official code)
    stage i     the patch mask upsampled to H/4 (8x8 sites per patch), H/8 (4x4), H/16 (2x2), H/32 (1x1):
                one engine.sparse.SparseStage per resolution, built once per batch from the mask;
                visible rows only: SparseDownsample (LayerNorm + 2x2 s2 conv) between stages and
                SparseConvNeXtV2Block (submanifold 7x7 dwconv, GRN over each sample's visible rows)
The encoder's total stride is 32, so its last stage has one site per patch: the patch size must be 32
(the decoder predicts one patch per stage-4 site, as the official forward_loss assumes).

Masking follows the official gen_random_mask: per sample, the argsort of i.i.d. noise keeps the first
int(L * (1 - ratio)) of the L patches, so L - int(L * (1 - ratio)) are removed (30 of 49 at 224 px
and ratio 0.6: one more than int(L * ratio) = 29 whenever L * ratio is not an integer).

Keys: the encoder's are the plain ConvNeXt V2's (`downsample_layers.*`, `stages.*`; the sparse layers
keep the dense names), so `model.encoder.state_dict()` loads into `convnextv2_<size>` with only `norm.*`
and `head.*` missing; the decoder's are the official FCMAE's (`proj`, `mask_token`, `decoder.i.*`,
`pred`). models/fcmae_official.py converts to and from the official MinkowskiEngine checkpoints.

Init: truncated normal (std 0.02) weights, zero biases, GRN at zero and mask token N(0, 0.02), as the
plain ConvNeXt V2. (The official FCMAE._init_weights re-initialises the depthwise, MinkowskiLinear and
nn.Conv2d weights with timm's trunc_normal_ at its default std 1.0 and leaves the decoder's Linear
layers at PyTorch's default; we keep the encoder's documented 0.02 scheme everywhere.)

torch.compile: `make_mask_and_stages` (random mask, nonzero / .tolist() in the stage tables) has
data-dependent shapes and is excluded from compilation (torch.compiler.disable); everything after it
(stem, gathers, blocks, downsampling, decoder, loss) traces with fullgraph=True given the mask and
stages (`forward_with_stages`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine import sparse
from engine.nn import SparseConvNeXtV2Block, SparseDownsample
from engine.ops.sparse_conv.op import sparse_dwconv2d
from models import fcmae_official
from models.convnextv2 import VARIANTS, Block
from models.layers import LayerNorm, drop_path
from models.mae import patchify
from models.registry import register_model

STRIDE = 32  # the encoder's total stride: stem 4 x three 2x2 downsamplings


def random_mask(N: int, grid: tuple[int, int], ratio: float, device=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, L) float mask over the patch grid, 1 = removed: keep int(L * (1 - ratio)) per sample at random."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    L = grid[0] * grid[1]
    keep = int(L * (1 - ratio))
    noise = torch.rand(N, L, device=device, generator=generator)
    ids_restore = noise.argsort(dim=1).argsort(dim=1)     # rank of each patch's noise
    return (ids_restore >= keep).float()                   # the `keep` smallest are kept


def upsample_mask(mask: torch.Tensor, grid: tuple[int, int], scale: int) -> torch.Tensor:
    """(N, L) patch mask -> (N, gh * scale, gw * scale): each patch becomes a scale x scale block."""
    m = mask.reshape(-1, *grid)
    return m.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def stage_rows(kept: list[int], side: int, num_stages: int) -> list[int | None]:
    """Visible sites per sample at each stage when every sample keeps kept[0] patches of side x side
    sites at stage 1: a patch stays whole down to one site per patch; past that (or for uneven
    samples) the count depends on the mask (None: the stage reads it, one host sync)."""
    uniform = bool(kept) and kept[0] > 0 and all(k == kept[0] for k in kept)
    out = []
    for s in range(num_stages):
        sub = side >> s
        out.append(kept[0] * sub * sub if uniform and sub >= 1 and sub << s == side else None)
    return out


class SparseConvNeXtV2(nn.Module):
    """ConvNeXt V2 encoder on visible sites; parameter names are the dense ConvNeXt V2's."""

    def __init__(self, in_chans: int = 3, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0, grn: bool = True):
        super().__init__()
        self.depths, self.dims = tuple(depths), tuple(dims)
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"depths and dims need 4 stages, got {depths} and {dims}")
        stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                             LayerNorm(dims[0], eps=1e-6, data_format="channels_first"))
        self.downsample_layers = nn.ModuleList([stem] + [SparseDownsample(dims[i], dims[i + 1]) for i in range(3)])
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # as models.convnext
        self.stages = nn.ModuleList(
            nn.Sequential(*(SparseConvNeXtV2Block(dims[i], rates[sum(depths[:i]) + j], grn) for j in range(depths[i])))
            for i in range(4))

    def stem(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> channels-last (N, H/4, W/4, C0), dense over the whole image."""
        return self.downsample_layers[0](imgs).permute(0, 2, 3, 1)

    def forward(self, imgs: torch.Tensor, stages: Sequence[sparse.SparseStage]) -> torch.Tensor:
        """Encode the visible sites of `stages` (build_stages); returns (N, H/32, W/32, C3), 0 where removed."""
        x = stages[0].gather(self.stem(imgs))                    # SparseTensor (V0, C0): visible sites only
        for i in range(4):
            if i > 0:
                x = self.downsample_layers[i](x, stages[i])      # (V_i, C_i)
            x = self.stages[i](x)
        return x.to_dense()

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pooled features of the unmasked image (N, C3): global average pool + LayerNorm without affine,
        i.e. what `convnextv2_<size>.forward_features` gives with these weights and its fresh norm."""
        x = self.forward_dense(imgs).mean(dim=(1, 2))
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)

    # ---- the dense-masked computation (the official JAX fallback of TRAINING.md): the same function ----

    def forward_dense(self, imgs: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Dense encoder with the stage-1 mask `visible` (N, H/4, W/4) bool (None = nothing removed):
        masked input after the stem, the mask re-applied after every dwconv, GRN over visible sites,
        downsampled masks by the any-visible 2x2 rule. Equals forward() at every site."""
        x, m = self.stem(imgs), visible                          # (N, H/4, W/4, C0)
        for i in range(4):
            if i > 0:
                x, m = self._dense_downsample(self.downsample_layers[i], x, m)
            for blk in self.stages[i]:
                x = self._dense_block(blk, x, m)
        return x if m is None else torch.where(m[..., None], x, 0)

    @staticmethod
    def _dense_downsample(down: SparseDownsample, x, m):
        h = down[0](x)                                            # LayerNorm over C, (N, H, W, C)
        if m is not None:
            h = torch.where(m[..., None], h, 0)
            m = F.max_pool2d(m[:, None].to(torch.uint8), 2)[:, 0].bool()
        return down[1](h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), m

    @staticmethod
    def _dense_block(blk: SparseConvNeXtV2Block, x, m):
        if m is None:
            h = blk.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            h = sparse_dwconv2d(x, blk.dwconv.weight, blk.dwconv.bias, m)
        h = blk.act(blk.pwconv1(blk.norm(h)))
        h = blk.pwconv2(h if blk.grn is None else blk.grn(h, m))
        out = x + drop_path(h, blk.drop_path.p, blk.training)
        return out if m is None else torch.where(m[..., None], out, 0)


class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder with a sparse ConvNeXt V2 encoder (official layout)."""

    def __init__(self, in_chans: int = 3, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), decoder_depth: int = 1, decoder_embed_dim: int = 512,
                 patch_size: int = 32, mask_ratio: float = 0.6, norm_pix_loss: bool = True,
                 drop_path_rate: float = 0.0, grn: bool = True):
        super().__init__()
        if patch_size != STRIDE:
            raise ValueError(f"patch_size must be the encoder's total stride {STRIDE} (one stage-4 site per "
                             f"patch, as the official FCMAE), got {patch_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.patch_size, self.mask_ratio, self.norm_pix_loss = patch_size, mask_ratio, norm_pix_loss
        self.in_chans = in_chans
        self.encoder = SparseConvNeXtV2(in_chans, depths, dims, drop_path_rate, grn)  # grn=False: the no-GRN ablation
        self.proj = nn.Conv2d(dims[-1], decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*(Block(decoder_embed_dim, 0.0) for _ in range(decoder_depth)))
        self.pred = nn.Conv2d(decoder_embed_dim, patch_size ** 2 * in_chans, kernel_size=1)
        self.apply(self._init_weights)
        if self.mask_token.device.type != "meta":
            nn.init.normal_(self.mask_token, std=0.02)
        self.register_load_state_dict_pre_hook(fcmae_official.load_hook)  # official checkpoints load as they are

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        H, W = imgs.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image side must be a multiple of the patch size {self.patch_size}, got {H}x{W}")
        return H // self.patch_size, W // self.patch_size

    @torch.compiler.disable
    def make_mask_and_stages(self, imgs: torch.Tensor, mask: torch.Tensor | None = None,
                             mask_ratio: float | None = None):
        """The (N, L) patch mask (1 = removed; random unless given) and the encoder's 4 sparse stages.

        Eager by design: the stage tables have data-dependent sizes (engine.sparse)."""
        grid = self.grid(imgs)
        N, L = imgs.shape[0], grid[0] * grid[1]
        if mask is None:
            ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            mask = random_mask(N, grid, ratio, device=imgs.device)
            kept = [int(L * (1 - ratio))] * N                                 # known: no host sync
        elif tuple(mask.shape) != (N, L):
            raise ValueError(f"mask must be (N, L) = ({N}, {L}) (1 = removed), got {tuple(mask.shape)}")
        else:
            kept = (mask == 0).sum(dim=1).tolist()                            # one sync for a given mask
        visible = upsample_mask(mask, grid, self.patch_size // 4) == 0       # (N, H/4, W/4), True = visible
        return mask, sparse.build_stages(visible.contiguous(), num_stages=4,
                                         rows_per_sample=stage_rows(kept, self.patch_size // 4, 4))

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent (N, h, w, C3) -> pred (N, L, p*p*C): mask tokens where removed, the decoder, 1x1 pred."""
        x = self.proj(latent.permute(0, 3, 1, 2))                            # (N, D, h, w)
        N, _, h, w = x.shape
        removed = mask.reshape(N, 1, h, w).to(torch.bool)
        x = torch.where(removed, self.mask_token.to(x.dtype), x)
        pred = self.pred(self.decoder(x))                                    # (N, p*p*C, h, w)
        return pred.flatten(2).transpose(1, 2)                               # (N, L, p*p*C), patches row-major

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch_size)                             # (N, L, p*p*C)
        if self.norm_pix_loss:  # per-patch normalised pixels (MAE Sec. 4; main_pretrain.py's default)
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        acc = torch.promote_types(pred.dtype, torch.float32)                 # fp32 at least (bf16 autocast)
        loss = ((pred.to(acc) - target.to(acc)) ** 2).mean(dim=-1)          # (N, L) per patch
        return (loss * mask).sum() / mask.sum().clamp_min(1)                # removed patches only

    def forward_with_stages(self, imgs: torch.Tensor, mask: torch.Tensor, stages):
        """Everything after masking (compiles with fullgraph=True): (loss, pred (N, L, p*p*C), mask)."""
        pred = self.forward_decoder(self.encoder(imgs, stages), mask)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None, mask_ratio: float | None = None):
        """imgs (N, C, H, W), H and W multiples of 32; mask (N, L) 1 = removed (random when None).
        Returns (loss, pred (N, L, 32*32*C), mask (N, L))."""
        mask, stages = self.make_mask_and_stages(imgs, mask, mask_ratio)
        return self.forward_with_stages(imgs, mask, stages)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled features of the unmasked image (N, C3), for k-NN / linear probes."""
        return self.encoder.forward_features(imgs)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under the plain ConvNeXt V2 keys (load with strict=False: norm/head missing)."""
        return self.encoder.state_dict()


def encoder_macs(encoder: SparseConvNeXtV2, resolution: int, keep: float = 1.0) -> float:
    """Multiply-accumulates of the encoder at `resolution` px with a fraction `keep` of the patches
    visible: the stem on the whole image, every later layer on visible sites only."""
    total = (resolution // 4) ** 2 * 16 * encoder.downsample_layers[0][0].in_channels * encoder.dims[0]
    for i, (d, c) in enumerate(zip(encoder.depths, encoder.dims)):
        sites = keep * (resolution // (4 * 2 ** i)) ** 2
        if i > 0:
            total += sites * 4 * encoder.dims[i - 1] * c                      # 2x2 s2 conv
        total += sites * d * (49 * c + 8 * c * c)                            # dwconv + two Linear
    return total


def macs(model: FCMAE, resolution: int) -> float:
    """Multiply-accumulates of one FCMAE forward at `resolution` px and the model's mask ratio (the
    decoder runs on all L patch sites)."""
    L = (resolution // STRIDE) ** 2
    keep = int(L * (1 - model.mask_ratio)) / L
    D = model.proj.out_channels
    dec = L * (model.encoder.dims[-1] * D + len(model.decoder) * (49 * D + 8 * D * D) + D * model.pred.out_channels)
    return encoder_macs(model.encoder, resolution, keep) + dec


def fcmae(size: str, **overrides) -> FCMAE:
    return FCMAE(**{**VARIANTS[size], **overrides})


@register_model
def fcmae_convnextv2_atto(**kw): return fcmae("atto", **kw)
@register_model
def fcmae_convnextv2_femto(**kw): return fcmae("femto", **kw)
@register_model
def fcmae_convnextv2_pico(**kw): return fcmae("pico", **kw)
@register_model
def fcmae_convnextv2_nano(**kw): return fcmae("nano", **kw)
@register_model
def fcmae_convnextv2_tiny(**kw): return fcmae("tiny", **kw)
@register_model
def fcmae_convnextv2_base(**kw): return fcmae("base", **kw)
@register_model
def fcmae_convnextv2_large(**kw): return fcmae("large", **kw)
@register_model
def fcmae_convnextv2_huge(**kw): return fcmae("huge", **kw)
