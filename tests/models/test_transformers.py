"""ViT, MAE (+ long-sequence mask units) and DiT: parameter counts, MACs, keys, masking, training steps."""
import pytest
import torch

import models
from models.mae import patchify, random_masking, unpatchify
from models.pos_embed import sincos_2d


def _meta(name, **kw):
    with torch.device("meta"):
        return models.create_model(name, **kw)


@pytest.mark.parametrize("name, trainable", [("vit_base_patch16", 85_647_360), ("vit_large_patch16", 303_099_904),
                                             ("vit_huge_patch14", 630_435_840)])
def test_vit_encoder_parameters_without_head(name, trainable):
    model = _meta(name, num_classes=0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


@pytest.mark.parametrize("name, total", [("dit_s_2", 32_963_360), ("dit_b_2", 130_512_416),
                                         ("dit_l_2", 458_102_816), ("dit_xl_2", 675_129_632)])
def test_dit_parameters_including_frozen_positions(name, total):
    assert sum(p.numel() for p in _meta(name).parameters()) == total


@pytest.mark.parametrize("name, gmacs", [("dit_xl_2", 118.6), ("dit_xl_4", 29.0), ("dit_b_2", 23.0), ("dit_s_8", 0.36)])
def test_dit_macs_at_256px(name, gmacs):
    x = torch.zeros(1, 4, 32, 32, device="meta")
    t, y = torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    assert models.count_flops(_meta(name), inputs=(x, t, y)) / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_vit_keys_match_timm_and_mae():
    keys = _meta("vit_base_patch16").state_dict().keys()
    for k in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.11.mlp.fc1.weight",
              "blocks.11.mlp.fc2.bias", "norm.weight", "head.weight"):
        assert k in keys, k
    mae = _meta("mae_vit_base").state_dict().keys()
    for k in ("decoder_embed.weight", "mask_token", "decoder_pos_embed", "decoder_blocks.7.attn.qkv.weight",
              "decoder_norm.weight", "decoder_pred.weight", "blocks.0.attn.qkv.weight"):
        assert k in mae, k
    assert not any(k.startswith("head") for k in mae)


def test_sincos_matches_mae_layout():
    emb = sincos_2d(8, 3, cls_token=True)  # (1 + 9, 8)
    assert emb.shape == (10, 8) and (emb[0] == 0).all()
    # first half encodes the column: patches in one column share it, patches in one row share the second half
    assert torch.equal(emb[1, :4], emb[4, :4]) and not torch.equal(emb[1, :4], emb[2, :4])
    assert torch.equal(emb[1, 4:], emb[2, 4:]) and not torch.equal(emb[1, 4:], emb[4, 4:])
    assert torch.allclose(emb[1], torch.tensor([0.0, 0.0, 1.0, 1.0] * 2))  # position (0, 0): sin 0, cos 0


def _tiny_mae(**kw):
    return models.create_model("mae_vit_base", img_size=64, embed_dim=32, depth=1, num_heads=2,
                               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **kw)


def test_mae_encoder_sees_exactly_the_kept_tokens():
    torch.manual_seed(0)
    model = _tiny_mae()
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(3, 3, 64, 64)
    torch.manual_seed(5)
    loss, pred, mask = model(x, mask_ratio=0.75)
    assert [t.shape for t in seen] == [(3, 1 + 4, 32)]  # 16 patches, 4 kept, plus cls
    torch.manual_seed(5)                                 # the same draw: which tokens, in which order
    ids_keep, _, _ = random_masking(3, (4, 4), 0.75, device=x.device)
    tokens = model.embed(x)                              # (3, 16, 32) patch tokens + positions
    torch.testing.assert_close(seen[0][:, 1:], torch.stack([tokens[b, ids_keep[b]] for b in range(3)]))
    torch.testing.assert_close(seen[0][:, 0], (model.cls_token + model.pos_embed[:, :1])[0].expand(3, -1))
    kept = mask == 0
    assert torch.equal(kept, torch.zeros(3, 16, dtype=torch.bool).scatter_(1, ids_keep, True))
    assert pred.shape == (3, 16, 16 * 16 * 3) and torch.equal(mask.sum(1), torch.full((3,), 12.0))
    loss.backward()
    assert model.mask_token.grad is not None and model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_mae_loss_is_on_removed_patches_only():
    torch.manual_seed(0)
    model = _tiny_mae(norm_pix_loss=False)
    imgs = torch.randn(2, 3, 64, 64)
    loss, pred, mask = model(imgs)
    target = patchify(imgs, 16)
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())
    torch.testing.assert_close(unpatchify(target, 16, (4, 4)), imgs)


@pytest.mark.parametrize("unit", [1, 2])
def test_masking_keeps_whole_units(unit):
    gen = torch.Generator().manual_seed(1)
    ids_keep, mask, ids_restore = random_masking(4, (8, 8), 0.75, unit, generator=gen)
    assert ids_keep.shape == (4, 16) and torch.equal(mask.sum(1), torch.full((4,), 48.0))
    units = mask.reshape(4, 8 // unit, unit, 8 // unit, unit).permute(0, 1, 3, 2, 4).reshape(4, -1, unit * unit)
    assert ((units.sum(-1) == 0) | (units.sum(-1) == unit * unit)).all()  # every unit kept or removed whole
    kept = torch.zeros(4, 64).scatter_(1, ids_keep, 1.0)
    assert torch.equal(kept, 1 - mask)


def test_long_sequence_mae_mask_unit():
    model = models.create_model("mae_vit_base", img_size=128, embed_dim=32, depth=1, num_heads=2,
                                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mask_unit=32)
    loss, _, mask = model(torch.randn(2, 3, 128, 128))
    grid = mask.reshape(2, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(2, 16, 4)
    assert ((grid.sum(-1) == 0) | (grid.sum(-1) == 4)).all() and torch.isfinite(loss)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        models.create_model("mae_vit_base", img_size=128, mask_unit=24)


def test_mae_argument_checks():
    with pytest.raises(ValueError, match="mask_unit .* must tile the 6x6 patch grid"):
        _tiny_mae_at(96, mask_unit=64)                  # 4x4-patch units on a 6x6 grid
    _tiny_mae_at(96, mask_unit=48)                      # 3x3 units tile it
    for bad in (1.5, 1.0, -0.1):
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            _tiny_mae(mask_ratio=bad)
    model = _tiny_mae()
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        model(torch.randn(1, 3, 64, 64), mask_ratio=1.5)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        random_masking(1, (4, 4), 1.0)


def _tiny_mae_at(img_size, **kw):
    return models.create_model("mae_vit_base", img_size=img_size, embed_dim=32, depth=1, num_heads=2,
                               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **kw)


def test_mae_and_dit_compile_fullgraph():
    torch.manual_seed(0)
    mae = _tiny_mae(mask_unit=32)
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(mae, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    got = compiled(x)
    torch.manual_seed(3)                                 # the same random mask
    want = mae(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    got[0].backward()
    assert mae.patch_embed.proj.weight.grad.abs().sum() > 0
    dit = models.create_model("dit_s_4", input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10).eval()
    for p in dit.parameters():                           # off the adaLN-Zero start, so the output is not 0
        torch.nn.init.normal_(p, std=0.05)
    z, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([3, 10])
    compiled = torch.compile(dit, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, t, y), dit(z, t, y), rtol=1e-4, atol=1e-5)


def test_dit_starts_as_zero_and_cfg_halves_agree():
    torch.manual_seed(0)
    model = models.create_model("dit_s_8", input_size=16, num_classes=10)
    x, t, y = torch.randn(4, 4, 16, 16), torch.randint(0, 1000, (4,)), torch.tensor([1, 2, 10, 10])
    assert (model(x, t, y) == 0).all()  # adaLN-Zero + zero final layer
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    assert out.shape == (4, 8, 16, 16)
    torch.testing.assert_close(out[:2, :3], out[2:, :3])  # guided eps is shared by both halves
    model.train()
    loss = model(x, t, y).square().mean()
    loss.backward()
    assert model.y_embedder.embedding_table.weight.shape == (11, 384)  # + the null class


def test_vit_train_step_and_compile():
    torch.manual_seed(0)
    model = models.create_model("vit_small_patch16", img_size=32, num_classes=3, depth=2)
    x = torch.randn(2, 3, 32, 32)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.pos_embed.grad is None  # MAE's fixed sin-cos table
    compiled = torch.compile(model.eval(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


# ---- attention without key bias (long-sequence MAE's --no_k_bias_in_vit; BEiT) ----

def test_attention_without_key_bias_layout_function_and_grads(monkeypatch):
    import engine.nn.attention as mod
    from engine.nn import Attention

    torch.manual_seed(0)
    attn = Attention(16, 2, k_bias=False)
    assert set(attn.state_dict()) == {"qkv.weight", "q_bias", "v_bias", "proj.weight", "proj.bias"}  # long_seq_mae keys
    for p in (attn.q_bias, attn.v_bias):
        torch.nn.init.normal_(p)
    x = torch.randn(2, 5, 16)
    qkv = torch.nn.functional.linear(x, attn.qkv.weight)  # the keys: x @ Wk^T with no bias at all
    k = qkv[..., 16:32]
    seen, real = [], mod.attention
    monkeypatch.setattr(mod, "attention", lambda q_, k_, v_, causal: seen.append(k_) or real(q_, k_, v_, causal=causal))
    out = attn(x)
    torch.testing.assert_close(seen[0].transpose(1, 2).reshape(2, 5, 16), k)  # what attention got as keys
    # Same function as a packed-bias Attention whose k third is zero.
    packed = Attention(16, 2)
    packed.load_state_dict(attn.state_dict())   # q_bias / v_bias merged into qkv.bias with a zero k part
    torch.testing.assert_close(packed.qkv.bias[16:32], torch.zeros(16))
    torch.testing.assert_close(packed(x), out)
    out.square().sum().backward()
    assert attn.q_bias.grad.abs().sum() > 0 and attn.v_bias.grad.abs().sum() > 0
    # ... and back: a timm/MAE-style qkv.bias with a zero k third loads; a non-zero one is refused.
    fresh = Attention(16, 2, k_bias=False)
    fresh.load_state_dict(packed.state_dict())
    torch.testing.assert_close(fresh(x), out)
    bad = packed.state_dict()
    bad["qkv.bias"][20] = 1.0
    with pytest.raises(ValueError, match="non-zero key bias"):
        fresh.load_state_dict(bad)


def test_vit_mae_maskfeat_take_k_bias():
    vit = _meta("vit_base_patch16", num_classes=0, k_bias=False)
    keys = vit.state_dict().keys()
    assert "blocks.0.attn.q_bias" in keys and "blocks.11.attn.v_bias" in keys and "blocks.0.attn.qkv.bias" not in keys
    assert sum(p.numel() for p in vit.parameters() if p.requires_grad) == 85_647_360 - 12 * 768  # no k bias
    mae = _tiny_mae(k_bias=False)
    keys = mae.state_dict().keys()
    assert "blocks.0.attn.q_bias" in keys and "decoder_blocks.0.attn.v_bias" in keys  # as long_seq_mae: both
    assert not any(k.endswith("qkv.bias") for k in keys)
    loss, _, _ = mae(torch.randn(2, 3, 64, 64))
    loss.backward()
    assert mae.blocks[0].attn.q_bias.grad is not None
    no_bias = _tiny_mae(qkv_bias=False).state_dict()
    assert not any(k.endswith(("qkv.bias", "q_bias", "v_bias")) for k in no_bias) and "blocks.0.attn.proj.bias" in no_bias
    mf = models.create_model("maskfeat_vit_small", img_size=32, depth=1, k_bias=False)
    assert "blocks.0.attn.q_bias" in mf.state_dict()
    # a long_seq_mae-layout encoder loads into the plain ViT for fine-tuning (k part zero)
    plain = models.create_model("vit_base_patch16", img_size=64, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    missing, unexpected = plain.load_state_dict(mae.state_dict(), strict=False)
    assert not missing and "blocks.0.attn.q_bias" not in unexpected
    torch.testing.assert_close(plain.blocks[0].attn.qkv.bias[32:64], torch.zeros(32))


# ---- MAE's default loss (norm_pix_loss=True) and DiT's class-label dropout, against independent code

def _norm_pix_loss(imgs, pred, mask, p):
    """MAE's normalised-pixel loss written out: each p x p patch's pixels (row, column, channel order)
    minus their mean over the unbiased std (+1e-6 in the variance); MSE on the removed patches only."""
    B, C, H, W = imgs.shape
    patches = imgs.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
    n = patches.shape[-1]
    mean = patches.sum(-1, keepdim=True) / n
    var = ((patches - mean) ** 2).sum(-1, keepdim=True) / (n - 1)
    per_patch = ((pred - (patches - mean) / torch.sqrt(var + 1e-6)) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def test_mae_default_loss_is_the_normalised_pixel_mse():
    torch.manual_seed(0)
    model = _tiny_mae().double()
    assert model.norm_pix_loss                                # MAE's default (Table 1d; main_pretrain.py)
    imgs = torch.rand(2, 3, 64, 64, dtype=torch.float64) * 4 + 1   # far from per-patch normalised already
    loss, pred, mask = model(imgs)
    want = _norm_pix_loss(imgs, pred, mask, 16)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    raw = ((pred - patchify(imgs, 16)) ** 2).mean(-1)[mask.bool()].mean()
    assert abs(float(loss - raw)) > 0.1 * float(raw)          # the normalisation matters for these images


def _looked_up(model, labels, train, whole=False, **kw):
    """The rows of the label table DiT actually reads for `labels` (after any dropout), through the
    whole model's forward or its label embedder alone."""
    seen = []
    hook = model.y_embedder.embedding_table.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    model.train(train)
    if whole:
        model(torch.zeros(len(labels), 4, 8, 8), torch.zeros(len(labels), dtype=torch.long), labels)
    else:
        model.y_embedder(labels, train, **kw)
    hook.remove()
    return seen[0]


def _tiny_dit(p):
    return models.create_model("dit_s_4", input_size=8, hidden_size=8, depth=1, num_heads=2, num_classes=10,
                               class_dropout_prob=p)


def check_label_dropout():
    labels = torch.arange(10).repeat(400)                     # 4000 labels
    model = _tiny_dit(0.1)
    torch.manual_seed(3)
    got = _looked_up(model, labels, train=True)
    torch.manual_seed(3)                                      # DiT's draw: rand(B) < p, then the null class 10
    want = torch.where(torch.rand(len(labels)) < 0.1, 10, labels)
    assert torch.equal(got, want)
    assert 0.08 < float((got == 10).float().mean()) < 0.12    # ~10 % replaced
    assert torch.equal(got[got != 10], labels[got != 10])     # the rest untouched
    torch.manual_seed(4)                                      # the same through DiT.forward
    few = _looked_up(model, labels[:64], train=True, whole=True)
    torch.manual_seed(4)
    assert torch.equal(few, torch.where(torch.rand(64) < 0.1, 10, labels[:64])) and (few == 10).any()
    assert torch.equal(_looked_up(model, labels[:64], train=False, whole=True), labels[:64])   # sampling: never
    assert torch.equal(_looked_up(model, labels, train=False), labels)
    assert torch.equal(_looked_up(_tiny_dit(1.0), labels, train=True), torch.full_like(labels, 10))
    assert torch.equal(_looked_up(_tiny_dit(0.0), labels, train=True), labels)  # p = 0: no null class
    assert _tiny_dit(0.0).y_embedder.embedding_table.num_embeddings == 10
    force = torch.tensor([1, 0] * 5)                          # CFG's forced drops, in eval mode too
    assert torch.equal(_looked_up(model, torch.arange(10), False, force_drop_ids=force),
                       torch.where(force == 1, 10, torch.arange(10)))


def test_dit_class_label_dropout_happens_in_training_only():
    check_label_dropout()


def test_label_dropout_check_fails_when_dit_drops_nothing_in_training(monkeypatch):
    """The mutant the old spy test (tests/train/test_dit.py, labels seen before the embedder) let through."""
    from models.dit import LabelEmbedder

    def no_training_drop(self, labels, train, force_drop_ids=None):
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
        return self.embedding_table(labels)
    monkeypatch.setattr(LabelEmbedder, "forward", no_training_drop)
    with pytest.raises(AssertionError):
        check_label_dropout()


def test_dit_recipe_passes_class_dropout_to_the_model(tmp_path):
    from train.recipes import get
    from train.run import resolve_config
    from train.trainer import Trainer

    cfg, _ = resolve_config("dit", overrides=["--data", "shapes", "--resolution", "16", "--model", "dit_s_4",
                                              "--model_kwargs", '{"hidden_size": 8, "depth": 1, "num_heads": 2}',
                                              "--num_workers", "0", "--out", str(tmp_path), "--class_dropout", "0.3"])
    t = Trainer(get("dit"), cfg)
    t.setup(checkpoints=False)
    assert t.module.y_embedder.dropout_prob == 0.3
