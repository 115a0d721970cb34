"""SLIP made exact (issue 15, item 5) against a faithful transcription of facebookresearch/SLIP's
models.py (CLIP + SLIP classes, OpenAI text transformer in LND layout with nn.MultiheadAttention and an
additive causal mask, timm ViT as `visual`) and losses.py (CLIPLoss, SIMCLRLoss, SLIPLoss) on one
process: the official key set loads strictly both ways, and in train mode the SimCLR head runs each
view separately (per-view BatchNorm statistics, two running-stat updates); outputs and loss match."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from train.recipes.slip import simclr_loss

timm = pytest.importorskip("timm")

W, LAYERS, HEADS, CTX, VOCAB, EMBED, MLP, SSL = 32, 2, 2, 12, 60, 16, 24, 8


# ------------------------------------------------------------ official SLIP, transcribed (models.py)
class _Block(nn.Module):
    def __init__(self, d_model, n_head, attn_mask):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = nn.LayerNorm(d_model)
        self.attn_mask = attn_mask

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class OfficialSLIP(nn.Module):
    def __init__(self, vision_model, vision_width):
        super().__init__()
        self.visual = vision_model
        mask = torch.empty(CTX, CTX).fill_(float("-inf")).triu_(1)
        self.transformer = _Transformer(W, LAYERS, HEADS, mask)
        self.token_embedding = nn.Embedding(VOCAB, W)
        self.positional_embedding = nn.Parameter(torch.empty(CTX, W))
        self.ln_final = nn.LayerNorm(W)
        self.image_projection = nn.Parameter(torch.empty(vision_width, EMBED))
        self.text_projection = nn.Parameter(torch.empty(W, EMBED))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        # SLIP builds the head with nn.SyncBatchNorm: on one process the same function as BatchNorm1d
        self.image_mlp = nn.Sequential(OrderedDict([
            ("layer1", nn.Linear(vision_width, MLP)), ("bn1", nn.BatchNorm1d(MLP)), ("relu1", nn.ReLU(inplace=True)),
            ("layer2", nn.Linear(MLP, MLP)), ("bn2", nn.BatchNorm1d(MLP)), ("relu2", nn.ReLU(inplace=True)),
            ("layer3", nn.Linear(MLP, SSL))]))

    def encode_image(self, image):
        return self.visual(image) @ self.image_projection

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text, aug1, aug2):
        aug1_embed = self.image_mlp(self.visual(aug1))
        aug2_embed = self.image_mlp(self.visual(aug2))
        return {"image_embed": self.encode_image(image), "text_embed": self.encode_text(text),
                "logit_scale": self.logit_scale.exp(), "aug1_embed": aug1_embed, "aug2_embed": aug2_embed}


# ------------------------------------------------------------ official losses, transcribed (losses.py), world 1
def official_clip_loss(out):
    image, text = F.normalize(out["image_embed"], dim=-1), F.normalize(out["text_embed"], dim=-1)
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(out["logit_scale"] * image @ text.t(), labels)
            + F.cross_entropy(out["logit_scale"] * text @ image.t(), labels)) / 2


def official_simclr_loss(out, tau=0.1):
    q_a, q_b = F.normalize(out["aug1_embed"], dim=-1), F.normalize(out["aug2_embed"], dim=-1)
    labels = torch.arange(q_a.shape[0])
    masks = F.one_hot(labels, q_a.shape[0]) * 1e9
    logits_aa, logits_bb = q_a @ q_a.t() / tau - masks, q_b @ q_b.t() / tau - masks
    logits_ab, logits_ba = q_a @ q_b.t() / tau, q_b @ q_a.t() / tau
    return (F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
            + F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)) / 2


def official_slip_loss(out, ssl_scale=1.0):
    return official_clip_loss(out) + ssl_scale * official_simclr_loss(out)


# ------------------------------------------------------------ the tests
def _pair():
    torch.manual_seed(0)
    ours = models.create_model("slip_vit_small_patch16", img_size=32, vision=dict(embed_dim=32, depth=2, num_heads=2,
                                                                                    patch_size=8),
                               embed_dim=EMBED, context_length=CTX, vocab_size=VOCAB, transformer_width=W,
                               transformer_heads=HEADS, transformer_layers=LAYERS, ssl_mlp_dim=MLP, ssl_emb_dim=SSL)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                            num_heads=2, num_classes=0)
    official = OfficialSLIP(vit, 32)
    return ours, official


def test_state_dict_loads_strictly_into_the_official_key_set_both_ways():
    ours, official = _pair()
    assert set(ours.state_dict()) == set(official.state_dict())
    assert "logit_scale" in ours.state_dict()
    official.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(official.state_dict(), strict=True)


def _inputs(B=6):
    g = torch.Generator().manual_seed(1)
    image, aug1, aug2 = (torch.randn(B, 3, 32, 32, generator=g) for _ in range(3))
    text = torch.randint(1, VOCAB - 1, (B, CTX), generator=g)
    text[torch.arange(B), torch.randint(2, CTX, (B,), generator=g)] = VOCAB - 1  # EOT = the largest id
    return image, text, aug1, aug2


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_train_mode_head_and_loss_match_the_per_view_official():
    ours, official = _pair()
    official.load_state_dict(ours.state_dict(), strict=True)
    ours.train(), official.train()
    image, text, aug1, aug2 = _inputs()
    out, ref = ours(image, text, aug1, aug2), official(image, text, aug1, aug2)
    for key in ("aug1_embed", "aug2_embed"):  # head outputs with per-view batch statistics
        assert _rel(out[key], ref[key]) <= 1e-5, key
    assert _rel(out["image_embed"], F.normalize(ref["image_embed"], dim=-1)) <= 1e-5
    assert _rel(out["text_embed"], F.normalize(ref["text_embed"], dim=-1)) <= 1e-5
    # running statistics: two updates (one per view), equal values
    for bn in ("bn1", "bn2"):
        a, b = getattr(ours.image_mlp, bn), getattr(official.image_mlp, bn)
        assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 2
        assert _rel(a.running_mean, b.running_mean) <= 1e-5 and _rel(a.running_var, b.running_var) <= 1e-5
    loss = ours.clip_loss(out) + simclr_loss(out["aug1_embed"], out["aug2_embed"], 0.1)
    ref_loss = official_slip_loss(ref)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    loss.backward(), ref_loss.backward()
    g_ours, g_ref = ours.image_mlp.layer1.weight.grad, official.image_mlp.layer1.weight.grad
    assert _rel(g_ours, g_ref) <= 1e-4


def test_eval_mode_matches_too():
    ours, official = _pair()
    official.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), official.eval()
    image, text, aug1, aug2 = _inputs(3)
    with torch.no_grad():
        out, ref = ours(image, text, aug1, aug2), official(image, text, aug1, aug2)
    assert _rel(out["aug1_embed"], ref["aug1_embed"]) <= 1e-5 and _rel(out["aug2_embed"], ref["aug2_embed"]) <= 1e-5
