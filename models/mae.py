"""MAE: "Masked Autoencoders Are Scalable Vision Learners" (He et al., arXiv 2111.06377), and the
long-sequence variant (Hu et al., arXiv 2210.07224) whose mask unit is decoupled from the patch size.

The encoder is the ViT of models/vit.py and sees only the kept tokens; a light decoder (512 wide,
8 blocks, 16 heads) fills in mask tokens and predicts pixels; the loss is the MSE of (per-patch
normalised) pixels on the removed patches. Keys follow facebookresearch/mae (encoder keys as in ViT,
`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks`, `decoder_norm`, `decoder_pred`).
k_bias=False is the long-sequence MAE's attention without key bias (`--no_k_bias_in_vit`): q and v
biases only, in encoder and decoder (keys `attn.q_bias`, `attn.v_bias`; see engine.nn.Attention).
"""
from __future__ import annotations

import torch
from torch import nn

from models.pos_embed import sincos_2d
from models.registry import register_model
from models.vit import VARIANTS, Block, VisionTransformer, init_transformer


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, pixels (p, p, C) inside a patch (MAE's order)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    gh, gw = grid
    x = x.reshape(x.shape[0], gh, gw, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, gh * p, gw * p)


def random_masking(B: int, grid: tuple[int, int], ratio: float, unit: int = 1, device=None,
                   generator: torch.Generator | None = None):
    """Per-sample random masking. Returns ids_keep (B, K), mask (B, L) with 1 = removed, ids_restore (B, L).

    With unit > 1 (long-sequence MAE), the grid is tiled by unit x unit patch squares sharing one
    random score, and K = int(L * (1 - ratio)) rounded down to whole units, so kept patches always
    form whole units.
    """
    if not 0.0 <= ratio < 1.0:  # 1 would remove every token; > 1 or < 0 would make keep meaningless
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    gh, gw = grid
    L = gh * gw
    if gh % unit or gw % unit:
        raise ValueError(f"mask unit of {unit}x{unit} patches does not tile the {gh}x{gw} patch grid")
    unit_noise = torch.rand(B, gh // unit, gw // unit, device=device, generator=generator)
    noise = unit_noise.repeat_interleave(unit, 1).repeat_interleave(unit, 2).reshape(B, L)
    keep = int(L * (1 - ratio)) // (unit * unit) * (unit * unit)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


class MaskedAutoencoderViT(VisionTransformer):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = True,
                 mask_ratio: float = 0.75, mask_unit: int | None = None, qkv_bias: bool = True,
                 k_bias: bool = True):
        super().__init__(img_size, patch_size, in_chans, 0, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                         k_bias=k_bias)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.norm_pix_loss, self.mask_ratio, self.in_chans = norm_pix_loss, mask_ratio, in_chans
        mask_unit = mask_unit or patch_size  # in pixels; a multiple of the patch size
        if mask_unit % patch_size:
            raise ValueError(f"mask_unit ({mask_unit} px) must be a multiple of patch_size ({patch_size})")
        self.unit = mask_unit // patch_size
        gh, gw = self.patch_embed.grid
        if gh % self.unit or gw % self.unit:
            raise ValueError(f"mask_unit ({mask_unit} px = {self.unit}x{self.unit} patches) must tile the "
                             f"{gh}x{gw} patch grid of img_size {img_size} with patch_size {patch_size}")
        L = self.patch_embed.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        # k_bias applies to the decoder too: long_seq_mae swaps timm's Attention for both.
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias,
                                                  k_bias=k_bias) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.decoder_pos_embed.copy_(sincos_2d(decoder_embed_dim, self.patch_embed.grid, True)[None])
                nn.init.normal_(self.mask_token, std=0.02)
            for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
                m.apply(init_transformer)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
        x = self.embed(imgs)  # (B, L, D)
        ids_keep, mask, ids_restore = random_masking(x.shape[0], self.patch_embed.grid, mask_ratio, self.unit,
                                                     device=x.device)
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D): kept only
        x = self.with_cls(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # (B, 1 + K, Dd)
        B, L = ids_restore.shape
        fill = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:], fill], dim=1)  # (B, L, Dd) in shuffled order
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, L, p*p*C)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch_embed.patch_size)
        if self.norm_pix_loss:  # per-patch normalised pixels (MAE Sec. 4, Table 1d)
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
        return (loss * mask).sum() / mask.sum().clamp_min(1)  # removed patches only

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None):
        """Returns (loss, pred (B, L, p*p*C), mask (B, L) with 1 = removed)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, self.mask_ratio if mask_ratio is None else mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def mae(size: str, patch: int, **overrides) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**VARIANTS[size], "patch_size": patch, **overrides})


@register_model
def mae_vit_base(**kw): return mae("base", 16, **kw)
@register_model
def mae_vit_large(**kw): return mae("large", 16, **kw)
@register_model
def mae_vit_huge(**kw): return mae("huge", 14, **kw)
