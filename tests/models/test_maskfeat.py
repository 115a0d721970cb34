"""MaskFeat ViT: keys and parameter counts, MACs, mask-token replacement, the target / prediction order,
loss on masked tokens only, video forward/backward, torch.compile."""
import pytest
import torch

import engine.ops
import models
from models.maskfeat import from_slowfast, to_slowfast


def _meta(name, **kw):
    with torch.device("meta"):
        return models.create_model(name, **kw)


def _count(m, trainable=False):
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


def _tiny(**kw):
    torch.manual_seed(0)
    return models.create_model("maskfeat_vit_base", **{"img_size": 64, "embed_dim": 32, "depth": 2,
                                                       "num_heads": 2, **kw})


def _mask(model, B, seed=0):
    return model.random_mask(B, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", ["small", "base", "large", "huge"])
def test_parameters_are_vits_plus_mask_token_and_head(size):
    mf, vit = _meta(f"maskfeat_vit_{size}"), _meta(f"vit_{size}_patch16", num_classes=0, pos_embed="learned")
    D = vit.embed_dim
    assert _count(mf) == _count(vit) + D + (D * 108 + 108)   # mask token (1, 1, D), Linear D -> 108
    vit_keys = set(vit.state_dict())
    assert set(mf.state_dict()) == vit_keys | {"mask_token", "pred_head.projections.0.weight",
                                               "pred_head.projections.0.bias"}


def test_base_counts_against_the_vit_b_number():
    # ViT-B/16 encoder: 85,647,360 trainable with fixed sin-cos positions (issue 7); + 768 + 768 * 108 + 108.
    assert _count(_meta("maskfeat_vit_base", pos_embed="sincos"), trainable=True) == 85_647_360 + 83_820
    assert _count(_meta("maskfeat_vit_base")) == 85_882_476           # learned positions (SlowFast's), total


def test_macs_are_vits_plus_the_head():
    x, m = torch.zeros(1, 3, 224, 224, device="meta"), torch.zeros(1, 196, dtype=torch.bool, device="meta")
    vit = models.count_flops(_meta("vit_base_patch16", num_classes=0), (1, 3, 224, 224))
    assert models.count_flops(_meta("maskfeat_vit_base"), inputs=(x, m)) == vit + 196 * 768 * 108


def test_video_model_keys_and_shapes():
    v = _meta("maskfeat_vit_base", num_frames=16)
    sd = v.state_dict()
    assert sd["patch_embed.proj.weight"].shape == (768, 3, 2, 16, 16)            # 2x16x16 space-time patches
    assert sd["pos_embed_spatial"].shape == (1, 196, 768) and sd["pos_embed_temporal"].shape == (1, 8, 768)
    assert "pos_embed" not in sd and sd["pos_embed_class"].shape == (1, 1, 768)
    img = _meta("maskfeat_vit_base")
    assert _count(v) == _count(img) + 768 * 3 * 16 * 16 - 197 * 768 + (196 + 8 + 1) * 768


def test_encoder_loads_into_vit_and_slowfast_names_round_trip():
    mf = _tiny()
    vit = models.create_model("vit_base_patch16", img_size=64, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                              pos_embed="learned")
    enc = {k: v for k, v in mf.state_dict().items() if not k.startswith(("mask_token", "pred_head"))}
    vit.load_state_dict(enc)                                                    # strict: same keys and shapes
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(vit.forward_features(x), mf.forward_features(x), atol=1e-6)
    sf = to_slowfast(mf.state_dict())
    assert "pred_head.transforms.0.0.weight" in sf and "norm.weight" not in sf
    assert from_slowfast(sf).keys() == mf.state_dict().keys()


def test_masked_patches_are_replaced_by_the_mask_token():
    """Pixels under a masked token cannot reach the encoder; unmasked pixels do."""
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 5] = mask[1, 10] = True                                             # token 5 = row 1, col 1
    y = x.clone()
    y[0, :, 16:32, 16:32] += 3.0                                                # inside the masked token
    assert torch.equal(model(x, mask), model(y, mask))
    y[1, :, 0:16, 0:16] += 3.0                                                  # token 0 of sample 1: visible
    assert not torch.allclose(model(x, mask)[1], model(y, mask)[1])


def test_targets_are_the_masked_tokens_hog_in_prediction_order():
    model = _tiny()
    x = torch.rand(3, 3, 64, 64)
    mask = _mask(model, 3)
    dense = engine.ops.hog_targets(x)                                          # (B, L, 108), all tokens
    target = model.forward_target(x, mask)
    assert target.shape == (int(mask.sum()), 108) and torch.equal(target, dense[mask])
    # Perfect predictions give zero loss; the same predictions shifted by one token do not.
    assert model.forward_loss(dense, target, mask) == 0
    assert model.forward_loss(dense.roll(1, dims=1), target, mask) > 1e-3
    # Predict only token (b, l) right: the loss is everyone else's squared norm -> (b, l) met its own HOG.
    b, l = (mask.nonzero()[4]).tolist()
    pred = torch.zeros_like(dense)
    pred[b, l] = dense[b, l]
    expected = ((target ** 2).sum() - (dense[b, l] ** 2).sum()) / target.numel()
    torch.testing.assert_close(model.forward_loss(pred, target, mask), expected)


def test_loss_reads_masked_tokens_only():
    model = _tiny()
    x = torch.rand(2, 3, 64, 64)
    mask = _mask(model, 2)
    target = model.forward_target(x, mask)
    dense = engine.ops.hog_targets(x)
    noisy = torch.where(mask.unsqueeze(-1), dense, dense + torch.randn_like(dense))  # corrupt visible tokens
    assert model.forward_loss(noisy, target, mask) == 0
    pred = model(x, mask)
    pred.retain_grad()
    loss = model.forward_loss(pred, target, mask)
    loss.backward()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask].abs().sum(-1) > 0).all()
    assert model.mask_token.grad.abs().sum() > 0


def test_video_forward_backward_on_a_tiny_clip():
    model = _tiny(img_size=32, num_frames=4)                                    # (t, h, w) = (2, 2, 2) tokens
    clip = torch.rand(2, 3, 4, 32, 32)
    loss, out = model.loss(clip, generator=torch.Generator().manual_seed(0))
    mask = out["mask"]
    assert mask.shape == (2, 8) and out["pred"].shape == out["target"].shape == (int(mask.sum()), 108)
    # The cube (t', r, c) is predicted as the HOG of its first frame 2 t' (SlowFast's frame subsampling).
    first = engine.ops.hog_targets(clip[:, :, ::2])                             # (B, 2 * 4, 108), frames outer
    assert torch.equal(out["target"], first[mask])
    torch.testing.assert_close(first[:, 4:], engine.ops.hog_targets(clip[:, :, 2]))   # t' = 1 is frame 2
    loss.backward()
    for name in ("mask_token", "pos_embed_spatial", "pos_embed_temporal", "patch_embed.proj.weight",
                 "pred_head.projections.0.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_tube_masks_for_video():
    model = _tiny(img_size=64, num_frames=4, video_mask="tube")                # (2, 4, 4) tokens
    mask = _mask(model, 4).view(4, 2, 16)
    assert torch.equal(mask[:, 0], mask[:, 1])


@pytest.mark.parametrize("kw, err, match", [
    (dict(img_size=72), ValueError, "multiple of patch_size"), (dict(num_frames=3), ValueError, "t_patch"),
    (dict(video_mask="random"), ValueError, "video_mask"), (dict(mask_ratio=0.01), ValueError, "masks 0")])
def test_bad_model_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        _tiny(**kw)


def test_bad_masks_and_inputs():
    model = _tiny()
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 16\)"):
        model(x, torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        model(x, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="expected clips"):
        _tiny(num_frames=4)(x, torch.zeros(2, 32, dtype=torch.bool))


def test_compile_fullgraph_forward_and_loss():
    model = _tiny(img_size=32, depth=1)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    # The forward has static shapes: inductor, one graph, no extra config.
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), model(x, mask))
    # The packed targets / gather have a data-dependent row count: one graph needs
    # capture_dynamic_output_shape_ops (aot_eager: the tracing is what is checked, quickly).
    def step(x, mask):
        pred = model(x, mask)
        return model.forward_loss(pred, model.forward_target(x, mask), mask)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, mask)
    torch.testing.assert_close(loss, step(x, mask))
    torch._dynamo.reset()


def test_fixed_sincos_positions_for_video():
    model = _tiny(img_size=32, num_frames=4, pos_embed="sincos")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"}
    cls_pos, pos = model.positions()                                            # (1, 1, D), (1, t * h * w, D)
    assert (cls_pos == 0).all() and pos.shape == (1, 8, 32)
    torch.testing.assert_close(pos[0, 0] - pos[0, 4], model.pos_embed_temporal[0, 0] - model.pos_embed_temporal[0, 1])
    model.loss(torch.rand(1, 3, 4, 32, 32))[0].backward()


def test_pixel_targets_are_the_masked_patches_in_prediction_order():
    """target="pixel" (the paper's Table 1 "pixel colors" row): patch (b, l)'s input values, channels then
    rows then columns, packed in the predictions' row-major order; a wrong patch order fails."""
    model = _tiny(target="pixel")
    assert model.target_dim == 3 * 16 * 16 and model.pred_head.projections[0].out_features == 768
    x = torch.randn(2, 3, 64, 64)
    mask = _mask(model, 2)
    target = model.forward_target(x, mask)
    expected = torch.stack([x[b, :, 16 * (l // 4):16 * (l // 4) + 16, 16 * (l % 4):16 * (l % 4) + 16].reshape(-1)
                            for b, l in mask.nonzero().tolist()])
    assert torch.equal(target, expected)
    loss, _ = model.loss(x, mask)
    loss.backward()
    assert torch.isfinite(loss) and model.pred_head.projections[0].weight.grad.abs().sum() > 0
    # video: the first frame of each 2-frame cube, tokens frames outer
    video = _tiny(target="pixel", num_frames=4, img_size=32)
    clip = torch.randn(1, 3, 4, 32, 32)
    every = torch.ones(1, 8, dtype=torch.bool)
    t = video.forward_target(clip, every)
    assert torch.equal(t[5], clip[0, :, 2, :16, 16:].reshape(-1)) and torch.equal(t[2], clip[0, :, 0, 16:, :16].reshape(-1))
    with pytest.raises(ValueError, match="target"):
        _tiny(target="hog2")
