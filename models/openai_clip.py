"""OpenAI-layout CLIP (Radford et al., arXiv 2103.00020) as MetaCLIP (Xu et al., arXiv 2309.16671)
releases it: the vision tower is OpenAI's ViT, not timm's, so OpenAI, open_clip and MetaCLIP
checkpoints load unchanged (models.load_pretrained) and `kfe export` writes them back.

Keys and shapes are exactly open_clip's `CLIP` (open_clip/model.py, transformer.py, version 3.x):
`visual.conv1` (bias-free patch conv), `visual.class_embedding`, `visual.positional_embedding`,
`visual.ln_pre`, `visual.transformer.resblocks.i.{ln_1, attn.in_proj_weight/in_proj_bias, attn.out_proj,
ln_2, mlp.c_fc, mlp.c_proj}`, `visual.ln_post`, `visual.proj`, and the text tower of models/clip_text.py
(`token_embedding`, `positional_embedding`, `transformer.*`, `ln_final`, `text_projection`, `logit_scale`).
Forward as open_clip's: image -> conv1 -> [class; patches] + positions -> ln_pre -> blocks -> ln_post
of the class token -> @ proj; text -> causal blocks -> ln_final -> the EOT token -> @ text_projection.
Attention is kfe::attention, the loss kfe::contrastive_loss. Vision heads = width / head_width (64;
80 for H/14, 104 for bigG/14), MLP width = int(width * mlp_ratio).

MetaCLIP's released models are open_clip's `ViT-*-quickgelu` configs (QuickGELU in both towers;
open_clip's pretrained table marks every MetaCLIP 400M / 2.5B checkpoint quick_gelu=True).
"""
from __future__ import annotations

import torch
from torch import nn

from models.clip_text import ImageTextModel, Transformer
from models.registry import register_model


class VisionTransformer(nn.Module):
    """OpenAI CLIP's ViT: (B, 3, H, W) -> (B, output_dim) through the class token."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, mlp_ratio: float = 4.0, quick_gelu: bool = True):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        if self.proj.device.type != "meta":
            self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's: width^-1/2 normals for the class token, positions and projection; the blocks keep
        nn.Linear's default init with nn.MultiheadAttention's xavier in-projection."""
        scale = self.width ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        for block in self.transformer.resblocks:
            nn.init.xavier_uniform_(block.attn.in_proj_weight)
            nn.init.zeros_(block.attn.out_proj.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the class token after ln_post (B, width): the pooled features before `proj`."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"image must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, L, width), row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0])  # open_clip: ln_post on every token, then the class token: the same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) @ self.proj


class OpenAICLIP(ImageTextModel):
    def __init__(self, embed_dim: int = 512, image_size: int = 224, patch_size: int = 32, vision_width: int = 768,
                 vision_layers: int = 12, vision_head_width: int = 64, vision_mlp_ratio: float = 4.0,
                 context_length: int = 77, vocab_size: int = 49408, transformer_width: int = 512,
                 transformer_heads: int = 8, transformer_layers: int = 12, quick_gelu: bool = True,
                 eot_token_id: int | None = None, init_temperature: float = 0.07, img_size: int | None = None):
        image_size = img_size or image_size  # (the recipes pass img_size)
        if vision_width % vision_head_width:
            raise ValueError(f"vision_width {vision_width} is not a multiple of vision_head_width {vision_head_width}")
        heads = vision_width // vision_head_width
        super().__init__(lambda: VisionTransformer(image_size, patch_size, vision_width, vision_layers, heads,
                                                   embed_dim, vision_mlp_ratio, quick_gelu),
                         embed_dim, context_length, vocab_size, transformer_width, transformer_heads,
                         transformer_layers, eot_token_id, init_temperature, quick_gelu)
        self.vision_width = vision_width
        if self.text_projection.device.type != "meta":
            self.init_text_tower()

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled vision features (B, vision_width), before the projection."""
        return self.visual.features(image)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


# open_clip's configs (model_configs/ViT-*-quickgelu.json) = MetaCLIP's released models (Table 4 of
# arXiv 2309.16671: B/32, B/16, L/14 on 400M and 2.5B curated pairs; H/14 and bigG/14 on 2.5B).
CONFIGS = {
    "b32": dict(embed_dim=512, patch_size=32, vision_width=768, vision_layers=12,
                transformer_width=512, transformer_heads=8, transformer_layers=12),
    "b16": dict(embed_dim=512, patch_size=16, vision_width=768, vision_layers=12,
                transformer_width=512, transformer_heads=8, transformer_layers=12),
    "l14": dict(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24,
                transformer_width=768, transformer_heads=12, transformer_layers=12),
    "h14": dict(embed_dim=1024, patch_size=14, vision_width=1280, vision_layers=32, vision_head_width=80,
                transformer_width=1024, transformer_heads=16, transformer_layers=24),
    "bigg14": dict(embed_dim=1280, patch_size=14, vision_width=1664, vision_layers=48, vision_head_width=104,
                   vision_mlp_ratio=4.9231, transformer_width=1280, transformer_heads=20, transformer_layers=32),
}
OPEN_CLIP_NAMES = {"b32": "ViT-B-32", "b16": "ViT-B-16", "l14": "ViT-L-14", "h14": "ViT-H-14", "bigg14": "ViT-bigG-14"}


def _register(size: str) -> None:
    def build(**kw):
        return OpenAICLIP(**{**CONFIGS[size], **kw})
    build.__name__ = f"metaclip_vit_{size}"
    build.__doc__ = f"MetaCLIP {OPEN_CLIP_NAMES[size]} (open_clip's {OPEN_CLIP_NAMES[size]}-quickgelu)"
    register_model(build)


for _size in CONFIGS:
    _register(_size)
