"""CLIP / SLIP towers: text-tower size, OpenAI/SLIP keys, causal text attention, EOT pooling, SimCLR."""
import torch

import models
from models.clip import nt_xent


def _tiny(name="clip_vit_small_patch16", **kw):
    return models.create_model(name, img_size=32, vision=dict(depth=1), transformer_layers=1, vocab_size=50,
                               context_length=12, transformer_width=32, transformer_heads=2, embed_dim=16, **kw)


def test_text_tower_size_at_clip_settings():
    with torch.device("meta"):
        model = models.create_model("clip_vit_base_patch16")
    text = sum(p.numel() for n, p in model.named_parameters()
               if n.startswith(("transformer.", "token_embedding", "positional_embedding", "ln_final")))
    assert text == 63_165_952  # 63.17M: width 512, 12 layers, 8 heads, context 77, vocab 49408
    assert model.text_projection.shape == (512, 512) and model.image_projection.shape == (768, 512)


def test_slip_keys():
    with torch.device("meta"):
        keys = models.create_model("slip_vit_small_patch16").state_dict().keys()
    for k in ("visual.patch_embed.proj.weight", "visual.cls_token", "visual.pos_embed", "visual.blocks.0.attn.qkv.weight",
              "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.11.mlp.c_proj.bias",
              "token_embedding.weight", "positional_embedding", "ln_final.weight", "image_projection",
              "text_projection", "logit_scale", "image_mlp.layer1.weight", "image_mlp.bn2.running_var",
              "image_mlp.layer3.weight"):
        assert k in keys, k


def test_text_is_causal_and_pooled_at_eot():
    torch.manual_seed(0)
    model = _tiny(eot_token_id=7).eval()
    text = torch.tensor([[3, 4, 7, 0, 0], [5, 7, 1, 2, 3]])
    changed = text.clone()
    changed[:, 3:] = 9  # tokens after EOT cannot change a causal encoding pooled at EOT
    torch.testing.assert_close(model.encode_text(text), model.encode_text(changed))
    changed[0, 0] = 9  # a token before EOT does
    assert not torch.allclose(model.encode_text(text)[0], model.encode_text(changed)[0])


def test_forward_outputs_and_grads():
    torch.manual_seed(0)
    model = _tiny("slip_vit_small_patch16", ssl_mlp_dim=32, ssl_emb_dim=8)
    img = torch.randn(4, 3, 32, 32)
    out = model(img, torch.randint(0, 50, (4, 12)), img + 0.1 * torch.randn_like(img), img)
    assert out["image_embed"].shape == out["text_embed"].shape == (4, 16)
    torch.testing.assert_close(out["image_embed"].norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))
    loss = (out["image_embed"] * out["text_embed"]).sum() + nt_xent(out["aug1_embed"], out["aug2_embed"])
    loss.backward()
    assert model.token_embedding.weight.grad.abs().sum() > 0 and model.image_mlp.layer1.weight.grad.abs().sum() > 0


def test_nt_xent_matches_definition():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=-1)
    sim = (z @ z.t() / 0.1).double()
    losses = []
    for i in range(10):
        pos = (i + 5) % 10
        others = torch.cat([sim[i, :i], sim[i, i + 1:]])
        losses.append(-(sim[i, pos] - torch.logsumexp(others, 0)))
    torch.testing.assert_close(nt_xent(z1, z2).double(), torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


def test_compile_fullgraph():
    model = _tiny().eval()
    img, text = torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 12))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(img, text)["text_embed"], model(img, text)["text_embed"])


def test_old_kfe_checkpoint_logit_scale_loads_and_loss_runs():
    model = _tiny()
    state = dict(model.state_dict())
    state["contrastive.logit_scale"] = torch.tensor(2.5)  # the key of KFE checkpoints before SLIP's own
    del state["logit_scale"]
    model.load_state_dict(state)
    assert model.logit_scale.item() == 2.5
    img, text = torch.randn(3, 3, 32, 32), torch.randint(0, 50, (3, 12))
    loss = model.clip_loss(model(img, text))
    loss.backward()
    assert loss.ndim == 0 and model.logit_scale.grad is not None


def test_vision_tower_heads_are_slips():
    # facebookresearch/SLIP models.py: CLIP_VITS16 / SLIP_VITS16 use timm's `vit_small_mocov3_patch16_224`
    # (embed_dim 384, depth 12, num_heads=12: MoCo v3's ViT-S), VITB16 vit_base_patch16_224, VITL16 vit_large.
    expected = {"small": (384, 12, 12), "base": (768, 12, 12), "large": (1024, 24, 16)}
    for kind in ("clip", "slip"):
        for size, (width, depth, heads) in expected.items():
            with torch.device("meta"):
                visual = models.create_model(f"{kind}_vit_{size}_patch16").visual
            attn = visual.blocks[0].attn
            assert (visual.embed_dim, len(visual.blocks), attn.num_heads) == (width, depth, heads), (kind, size)
    with torch.device("meta"):  # the plain ViT-S stays DeiT's / timm's vit_small_patch16_224: 6 heads
        assert models.create_model("vit_small_patch16").blocks[0].attn.num_heads == 6


def test_bad_token_ids_raise():
    import pytest

    model = _tiny(eot_token_id=7).eval()
    ok = torch.tensor([[3, 4, 7, 0], [5, 7, 1, 2]])
    model.encode_text(ok)
    with pytest.raises(ValueError, match=r"token ids in \[0, 50\].*vocab_size"):
        model.encode_text(torch.tensor([[3, 50, 7, 0]]))          # id == vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        model.encode_text(torch.tensor([[3, -1, 7, 0]]))
    with pytest.raises(ValueError, match=r"rows \[1\] have no end-of-text token \(eot_token_id=7\)"):
        model.encode_text(torch.tensor([[3, 4, 7, 0], [5, 6, 1, 2]]))  # would pool position 0
    with pytest.raises(TypeError, match="integer token ids"):
        model.encode_text(ok.float())
    with torch.device("meta"):                                  # no values on the meta device: nothing to check
        assert models.count_flops(_tiny(eot_token_id=7), inputs=(torch.zeros(1, 3, 32, 32), ok)) > 0
    # the value checks run eagerly only: the compiled text tower stays one graph
    compiled = torch.compile(model.encode_text, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ok), model.encode_text(ok))
