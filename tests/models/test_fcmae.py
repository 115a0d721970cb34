"""FCMAE (ConvNeXt V2, arXiv 2301.00808, Sec. 3.1): keys shared with the plain ConvNeXt V2 (all sizes),
the sparse encoder against the dense-masked computation in float64 (outputs and gradients), masking
invariants, the loss on removed patches only, no leak across the mask, official-checkpoint layout, compile."""
import copy

import pytest
import torch
import torch.nn.functional as F

import engine
import models
from engine import testing
from engine.ops.sparse_conv import reference
from models import fcmae_official
from models.convnextv2 import VARIANTS
from models.fcmae import FCMAE, macs, random_mask, upsample_mask


@pytest.fixture(autouse=True)
def _one_thread():  # as tests/train/conftest.py: two OpenMP threads on the shared 2 cores stall each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


HEAD_KEYS = {"norm.weight", "norm.bias", "head.weight", "head.bias"}
DECODER_KEYS = ["proj.weight", "proj.bias", "mask_token", "decoder.0.dwconv.weight", "decoder.0.dwconv.bias",
                "decoder.0.norm.weight", "decoder.0.norm.bias", "decoder.0.pwconv1.weight", "decoder.0.pwconv1.bias",
                "decoder.0.grn.gamma", "decoder.0.grn.beta", "decoder.0.pwconv2.weight", "decoder.0.pwconv2.bias",
                "pred.weight", "pred.bias"]  # the official FCMAE's names (models/fcmae.py there)


def _tiny(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = FCMAE(**{"depths": (1, 2, 1, 1), "dims": (6, 10, 12, 14), "decoder_embed_dim": 16, **kw}).to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random everywhere (GRN starts at zero, which would hide it)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


# ---- keys and parameters: every size, on the meta device ----

@pytest.mark.parametrize("size", list(VARIANTS))
def test_encoder_keys_load_into_plain_convnextv2_both_ways(size):
    with torch.device("meta"):
        fc = models.create_model(f"fcmae_convnextv2_{size}")
        plain = models.create_model(f"convnextv2_{size}")
    enc = {k: tuple(v.shape) for k, v in fc.encoder_state_dict().items()}
    dense = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    assert enc == {k: s for k, s in dense.items() if k not in HEAD_KEYS}
    res = plain.load_state_dict(fc.encoder_state_dict(), strict=False)
    assert set(res.missing_keys) == HEAD_KEYS and res.unexpected_keys == []
    res = fc.encoder.load_state_dict(plain.state_dict(), strict=False)
    assert set(res.unexpected_keys) == HEAD_KEYS and res.missing_keys == []
    full = fc.state_dict()
    assert sorted(k for k in full if not k.startswith("encoder.")) == sorted(DECODER_KEYS)
    C3 = VARIANTS[size]["dims"][-1]
    assert full["proj.weight"].shape == (512, C3, 1, 1) and full["mask_token"].shape == (1, 512, 1, 1)
    assert full["pred.weight"].shape == (32 * 32 * 3, 512, 1, 1)
    n_head = C3 * 1000 + 1000 + 2 * C3  # the plain model's head + final norm
    assert sum(p.numel() for p in fc.encoder.parameters()) == sum(p.numel() for p in plain.parameters()) - n_head


def test_round_trip_with_plain_model_same_function():
    fc = _tiny(torch.float64)
    plain = models.create_model("convnextv2_atto", depths=(1, 2, 1, 1), dims=(6, 10, 12, 14), num_classes=3).double()
    assert set(plain.load_state_dict(fc.encoder_state_dict(), strict=False).missing_keys) == HEAD_KEYS
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    # forward_features == the plain model's (its fresh final norm is the identity affine)
    testing.assert_close(fc.forward_features(x), plain.forward_features(x), torch.float64)
    # nothing removed: the sparse encoder is the plain dense backbone
    _, stages = fc.make_mask_and_stages(x, torch.zeros(2, 4))
    h = x
    for down, stage in zip(plain.downsample_layers, plain.stages):
        h = stage(down(h))
    testing.assert_close(fc.encoder(x, stages), h.permute(0, 2, 3, 1), torch.float64)
    other = _tiny(torch.float64)  # and back: the plain weights into an FCMAE encoder
    assert set(other.encoder.load_state_dict(plain.state_dict(), strict=False).unexpected_keys) == HEAD_KEYS
    testing.assert_close(other.forward_features(x), plain.forward_features(x), torch.float64)


# ---- the sparse encoder is the dense-masked computation (float64, outputs and gradients) ----

def _reference_encoder(enc, imgs, visible):
    """Stem, then engine.ops.sparse_conv.reference's masked_downsample / masked_block (the spec)."""
    x, m = enc.stem(imgs), visible
    x = torch.where(m[..., None], x, 0)
    for i in range(4):
        if i > 0:
            down = enc.downsample_layers[i]
            x, m = reference.masked_downsample(x, m, down[0].weight, down[0].bias, down[1].weight, down[1].bias)
        for b in enc.stages[i]:
            x = reference.masked_block(x, m, b.dwconv.weight, b.dwconv.bias, b.norm.weight, b.norm.bias,
                                       b.pwconv1.weight, b.pwconv1.bias, b.grn.gamma, b.grn.beta,
                                       b.pwconv2.weight, b.pwconv2.bias)
    return x


def _grads(out, g, leaves):
    return torch.autograd.grad((out * g).sum(), leaves)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_sparse_encoder_matches_dense_masked_float64(backend):
    model = _tiny(torch.float64)
    enc = model.encoder
    imgs = torch.randn(3, 3, 64, 96, dtype=torch.float64, requires_grad=True)  # a 2x3 patch grid
    mask, stages = model.make_mask_and_stages(imgs)
    visible = stages[0].mask
    leaves = [imgs, *enc.parameters()]
    with engine.use_backend(backend):
        sparse_out = enc(imgs, stages)
        g = torch.randn_like(sparse_out)
        sparse_grads = _grads(sparse_out, g, leaves)
        dense_out = enc.forward_dense(imgs, visible)
        dense_grads = _grads(dense_out, g, leaves)
    ref_out = _reference_encoder(enc, imgs, visible)
    ref_grads = _grads(ref_out, g, leaves)
    removed = upsample_mask(mask, (2, 3), 1).bool()                         # stage-4 sites = patches
    assert sparse_out.shape == (3, 2, 3, 14) and (sparse_out[removed] == 0).all()
    assert sparse_out[~removed].abs().min() > 0                              # visible sites computed
    for name, out, grads in (("sparse", sparse_out, sparse_grads), ("dense-masked", dense_out, dense_grads)):
        testing.assert_close(out, ref_out, torch.float64, f"{name} output")
        for (pname, _), a, e in zip([("imgs", None), *enc.named_parameters()], grads, ref_grads):
            testing.assert_close(a, e, torch.float64, f"{name} d{pname}")
    assert all(gr.abs().sum() > 0 for gr in sparse_grads)                   # every parameter gets gradient


def test_nothing_leaks_from_removed_patches():
    model = _tiny()
    imgs = torch.randn(2, 3, 96, 96)
    mask = random_mask(2, (3, 3), 0.6, generator=torch.Generator().manual_seed(0))
    removed = upsample_mask(mask, (3, 3), 32)[:, None].bool().expand_as(imgs)
    noisy = torch.where(removed, torch.randn_like(imgs) * 100, imgs)
    loss_a, pred_a, _ = model(imgs, mask=mask)
    loss_b, pred_b, _ = model(noisy, mask=mask)
    torch.testing.assert_close(pred_b, pred_a, rtol=0, atol=0)              # the encoder never saw them
    assert not torch.isclose(loss_a, loss_b)                                # ...but they are the targets


def test_decoder_sees_mask_tokens_exactly_at_removed_patches():
    model = _tiny(torch.float64)
    imgs = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.float64)
    seen = []
    model.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model(imgs, mask=mask)
    _, stages = model.make_mask_and_stages(imgs, mask)
    latent = model.proj(model.encoder(imgs, stages).permute(0, 3, 1, 2))       # (N, D, 2, 3)
    x, removed = seen[0], mask.bool().view(2, 1, 2, 3).expand_as(seen[0])
    torch.testing.assert_close(x[removed], model.mask_token.expand_as(x)[removed], rtol=0, atol=0)
    torch.testing.assert_close(x[~removed], latent[~removed], rtol=0, atol=0)


# ---- masking ----

@pytest.mark.parametrize("grid, ratio", [((7, 7), 0.6), ((3, 3), 0.6), ((2, 2), 0.6), ((4, 5), 0.75),
                                         ((7, 7), 0.0)])
def test_random_mask_removes_the_official_count_per_sample(grid, ratio):
    L = grid[0] * grid[1]
    mask = random_mask(4000, grid, ratio, generator=torch.Generator().manual_seed(0))
    removed = L - int(L * (1 - ratio))  # official gen_random_mask: keeps int(L * (1 - ratio))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(dim=1) == removed).all()
    if 0 < removed < L:
        assert mask.unique(dim=0).shape[0] > 1                              # per sample, not one mask
        freq = mask.mean(dim=0)                                             # every patch equally likely
        assert (freq - removed / L).abs().max() < 0.05


def test_mask_at_224_removes_30_of_49():
    assert (random_mask(8, (7, 7), 0.6).sum(dim=1) == 30).all()             # int(49 * 0.4) = 19 kept


def test_stage_masks_are_the_patch_mask_upsampled():
    model = _tiny()
    imgs = torch.randn(3, 3, 128, 96)                                       # a 4x3 grid
    mask, stages = model.make_mask_and_stages(imgs)
    assert mask.shape == (3, 12) and (mask.sum(dim=1) == 12 - int(12 * 0.4)).all()
    keep = 12 - int(mask[0].sum())
    for i, st in enumerate(stages):
        scale = 8 >> i                                                      # 8x8, 4x4, 2x2, 1x1 per patch
        assert st.shape == (3, 128 // (4 << i), 96 // (4 << i))
        assert torch.equal(st.mask, upsample_mask(mask, (4, 3), scale) == 0)
        assert st.rows_per_sample == keep * scale * scale                   # FCMAE: uniform rows per sample


def test_bad_inputs():
    model = _tiny()
    testing.expect_error(ValueError, lambda: model(torch.randn(1, 3, 48, 64)), "multiple of the patch size")
    testing.expect_error(ValueError, lambda: model(torch.randn(2, 3, 64, 64), mask=torch.zeros(2, 3)), "mask", "(2, 4)")
    testing.expect_error(ValueError, lambda: FCMAE(patch_size=16), "patch_size", "32")
    testing.expect_error(ValueError, lambda: FCMAE(mask_ratio=1.0), "mask_ratio")


# ---- the loss ----

def _patches(imgs, p=32):
    """(N, L, p*p*C) in (p, q, c) order, by unfold (independent of models.mae.patchify)."""
    N, C = imgs.shape[:2]
    cols = F.unfold(imgs, p, stride=p)                                      # (N, C*p*p, L) in (c, p, q) order
    return cols.reshape(N, C, p, p, -1).permute(0, 4, 2, 3, 1).reshape(N, cols.shape[-1], -1)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_mse_on_removed_patches_only(norm_pix):
    model = _tiny(torch.float64, norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.float64)
    pred = torch.randn(2, 6, 3072, dtype=torch.float64, requires_grad=True)
    loss = model.forward_loss(imgs, pred, mask)
    t = _patches(imgs)
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - t) ** 2).mean(-1)
    testing.assert_close(loss, per_patch[mask.bool()].mean(), torch.float64)
    (dpred,) = torch.autograd.grad(loss, pred)
    assert (dpred[~mask.bool()] == 0).all() and (dpred[mask.bool()] != 0).all()
    full_loss, full_pred, full_mask = model(imgs, mask=mask)
    assert full_pred.shape == (2, 6, 3072) and torch.equal(full_mask, mask)
    testing.assert_close(full_loss, model.forward_loss(imgs, full_pred, mask), torch.float64)


# ---- official checkpoint layout ----

def test_official_layout_round_trip_and_load():
    model = _tiny()
    sd = model.state_dict()
    off = fcmae_official.to_official(sd)
    assert off["encoder.stages.0.0.dwconv.kernel"].shape == (49, 6)
    assert off["encoder.stages.0.0.dwconv.bias"].shape == (1, 6)
    assert off["encoder.stages.1.1.pwconv1.linear.weight"].shape == (40, 10)
    assert off["encoder.stages.0.0.norm.ln.weight"].shape == (6,)
    assert off["encoder.stages.0.0.grn.gamma"].shape == (1, 24)
    assert off["encoder.downsample_layers.1.0.ln.bias"].shape == (6,)
    assert off["encoder.downsample_layers.1.1.kernel"].shape == (4, 6, 10)
    assert off["encoder.downsample_layers.1.1.bias"].shape == (1, 10)
    for k in ("encoder.downsample_layers.0.0.weight", "encoder.downsample_layers.0.1.weight", *DECODER_KEYS):
        assert torch.equal(off[k], sd[k])                                   # dense in both layouts
    back = fcmae_official.from_official(off)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # The official conversion's tap order: Minkowski tap a * k + b is weight[..., b, a].
    w = fcmae_official.from_official({"x.dwconv.kernel": torch.arange(49.0)[:, None]})["x.dwconv.weight"]
    assert w[0, 0, 2, 5] == 5 * 7 + 2
    other = FCMAE(depths=(1, 2, 1, 1), dims=(6, 10, 12, 14), decoder_embed_dim=16)
    other.load_state_dict(off)                                              # strict: the hook converts it
    x, mask = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    torch.testing.assert_close(other(x, mask=mask)[0], model(x, mask=mask)[0], rtol=0, atol=0)


# ---- FLOPs ----

def test_macs_formula_matches_the_flop_counter():
    with torch.device("meta"):
        fc = models.create_model("fcmae_convnextv2_atto", mask_ratio=0.0)
        plain = models.create_model("convnextv2_atto", num_classes=0)
    dec = torch.nn.Sequential(fc.proj, fc.decoder, fc.pred)
    expected = models.count_flops(plain, (1, 3, 224, 224)) + models.count_flops(dec, (1, 320, 7, 7))
    assert macs(fc, 224) == pytest.approx(expected, rel=1e-9)
    fc.mask_ratio = 0.6                                                     # 19 of 49 patches visible
    assert macs(fc, 224) < 0.6 * expected


def test_count_flops_of_the_fcmae_model_is_its_macs():
    # The meta device cannot build the sparse stages (torch.nonzero): count_flops falls back to a CPU run,
    # and counts the sparse depthwise convs through kfe::sparse_dwconv2d_rows's formula (7*7*C per row).
    with torch.device("meta"):
        fc = models.create_model("fcmae_convnextv2_atto")
    assert models.count_flops(fc, (1, 3, 224, 224)) == pytest.approx(macs(fc, 224), rel=1e-9)   # 19 of 49 kept
    small = _tiny()
    assert models.count_flops(small, (2, 3, 96, 96), device="cpu") == pytest.approx(2 * macs(small, 96), rel=1e-9)


def test_sparse_dwconv_flop_formulas():
    from torch.utils.flop_counter import FlopCounterMode

    from engine.ops.sparse_conv.op import sparse_dwconv2d

    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 6, 6, 5, generator=gen), torch.randn(5, 1, 3, 3, generator=gen), torch.zeros(5)
    visible = torch.rand(2, 6, 6, generator=gen) < 0.5
    n = int(visible.sum())
    x.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        y = sparse_dwconv2d(x, w, b, visible)
    assert counter.get_total_flops() == 2 * n * 5 * 9                      # dense layout: visible sites only
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    assert counter.get_total_flops() == 2 * 2 * n * 5 * 9                  # dx and dw
    stages = engine.sparse.build_stages(visible, num_stages=1, kernel_size=3)
    rows = stages[0].gather(x.detach()).feats.requires_grad_(True)          # (n, 5)
    with FlopCounterMode(display=False) as counter:
        out = engine.ops.sparse_conv.op.sparse_dwconv2d_rows(rows, stages[0].neighbours, w, b)
        out.sum().backward()
    assert counter.get_total_flops() == 3 * 2 * n * 5 * 9                  # forward + backward, one row per site


# ---- torch.compile ----

def test_compile_after_masking_fullgraph_matches_eager():
    model = _tiny()
    imgs = torch.randn(2, 3, 64, 64)
    mask, stages = model.make_mask_and_stages(imgs)                         # eager by design

    def step(x):
        return model.forward_with_stages(x, mask, stages)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = imgs.clone().requires_grad_(), imgs.clone().requires_grad_()
    got, want = compiled(x1), step(x2)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ---- `kfe bench fcmae` ----

def test_bench_providers_agree_and_run(monkeypatch):
    from engine.bench import core
    from models import fcmae_bench

    monkeypatch.setenv("KFE_BENCH_FCMAE_MODEL", "fcmae_convnextv2_atto")
    (case,) = fcmae_bench.cases(torch.device("cpu"), sizes=[(2, 64)], ratios=(0.6,),
                                model_kwargs={"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)})
    inputs = case.make_inputs()
    outs = {name: fn(*inputs) for name, fn in case.providers.items()}
    assert set(outs) == {"reference", "kfe-dense", "kfe-sparse", "kfe-sparse+stages"}
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["reference"], rtol=1e-4, atol=1e-4, msg=name)
    records = core.run([case], ["fwd+bwd"], warmup=0, repeats=1, providers=["kfe-sparse"])
    assert {r["provider"] for r in records} == {"reference", "kfe-sparse"}
    assert all("error" not in r and r["tflops"] > 0 for r in records), records


# ---- GPU (skipped here) ----

@pytest.mark.gpu
def test_gpu_sparse_encoder_matches_dense_masked_and_trains_in_bf16(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = models.create_model("fcmae_convnextv2_atto").cuda()
    for p in model.parameters():  # GRN away from its zero init
        if p.dim() == 4 and p.shape[:3] == (1, 1, 1):
            torch.nn.init.normal_(p, std=0.5)
    imgs = torch.randn(16, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    mask, stages = model.make_mask_and_stages(imgs)
    assert (mask.sum(dim=1) == 30).all()
    with torch.no_grad():
        sparse_out = model.encoder(imgs, stages)
        dense_out = model.encoder.forward_dense(imgs, stages[0].mask)
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-4, atol=1e-4)
    # The bf16 training step against the same model, mask and images in float64 on the CPU's reference
    # path: the loss to bf16's 1e-2 of itself, and the whole gradient (every parameter, concatenated)
    # to 5e-2 of its norm (autocast rounds the activations of 12 blocks; a broken or zeroed kernel
    # gradient is off by O(1)).
    spec = copy.deepcopy(model).double().cpu().to(memory_format=torch.contiguous_format)
    with torch.autocast("cuda", dtype=torch.bfloat16), engine.backend.record_backends() as ran:
        loss, pred, _ = model(imgs, mask=mask)
        loss.backward()
    assert set(ran) >= {"grn", "sparse_dwconv2d"} and all(b == {"triton"} for b in ran.values()), ran
    assert pred.shape == (16, 49, 3072)
    with engine.use_backend("reference"):
        want, _, _ = spec(imgs.double().cpu().contiguous(), mask=mask.cpu())
        want.backward()
    testing.assert_close(loss.float(), want, torch.bfloat16, name="bf16 loss")
    got = torch.cat([p.grad.double().cpu().flatten() for p in model.parameters()])
    ref = torch.cat([p.grad.flatten() for p in spec.parameters()])
    err = (got - ref).norm() / ref.norm()
    assert ref.norm() > 0 and err < 5e-2, f"gradient off by {err:.3g} of its norm"


def test_grn_off_removes_grn_from_the_encoder_blocks_and_loads_into_convnextv2_without_grn():
    """grn=False (the paper's Sec. 3.2 / Table 2 ablation): no grn.* key in the encoder; the sparse encoder,
    its dense-masked twin and the dense ConvNeXt V2 built with grn=False all compute the block without GRN,
    which is the GRN model's function with GRN at its zero init (GRN(x) = x), and not with a trained GRN."""
    with_grn, no_grn = _tiny(torch.float64), _tiny(torch.float64, grn=False)
    enc_keys = [k for k in no_grn.encoder.state_dict()]
    assert not [k for k in enc_keys if ".grn." in k] and any(".grn." in k for k in with_grn.encoder.state_dict())
    no_grn.load_state_dict({k: v for k, v in with_grn.state_dict().items() if not k.startswith("encoder.")
                            or ".grn." not in k})  # strict: every other key matches
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask, stages = no_grn.make_mask_and_stages(imgs)
    out = no_grn.encoder(imgs, stages)
    testing.assert_close(no_grn.encoder.forward_dense(imgs, stages[0].mask), out, torch.float64, "dense-masked")
    assert not torch.allclose(with_grn.encoder(imgs, stages), out)           # a trained GRN changes it
    with torch.no_grad():
        for k, p in with_grn.encoder.named_parameters():
            if ".grn." in k:
                p.zero_()
    testing.assert_close(with_grn.encoder(imgs, stages), out, torch.float64, "GRN at zero = no GRN")
    dense = models.create_model("convnextv2_atto", grn=False, depths=(1, 2, 1, 1), dims=(6, 10, 12, 14),
                                num_classes=0).to(torch.float64)
    missing, unexpected = dense.load_state_dict(no_grn.encoder.state_dict(), strict=False)
    assert not unexpected and set(missing) <= HEAD_KEYS
    x = imgs
    for down, stage in zip(dense.downsample_layers, dense.stages):
        x = stage(down(x))
    testing.assert_close(x.permute(0, 2, 3, 1), no_grn.encoder.forward_dense(imgs), torch.float64,
                         "dense ConvNeXt V2 without GRN")
