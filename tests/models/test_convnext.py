"""ConvNeXt / ConvNeXt V2: exact parameter counts, MACs, official keys, training step, compile."""
import pytest
import torch

import models

PARAMS = {  # with the 1000-class head (issue 7; the official model cards)
    "convnext_tiny": 28_589_128, "convnext_small": 50_223_688, "convnext_base": 88_591_464,
    "convnext_large": 197_767_336, "convnext_xlarge": 350_196_968,
    "convnextv2_atto": 3_708_400, "convnextv2_femto": 5_233_240, "convnextv2_pico": 9_066_280,
    "convnextv2_nano": 15_623_800, "convnextv2_tiny": 28_635_496, "convnextv2_base": 88_717_800,
    "convnextv2_large": 197_956_840, "convnextv2_huge": 660_289_640,
}
GMACS_224 = {"convnext_tiny": 4.47, "convnextv2_atto": 0.55, "convnextv2_huge": 115.0}


def _meta(name, **kw):
    with torch.device("meta"):
        return models.create_model(name, **kw)


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_count_is_exact(name):
    assert sum(p.numel() for p in _meta(name).parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", GMACS_224)
def test_macs_at_224_within_one_percent(name):
    macs = models.count_flops(_meta(name), (1, 3, 224, 224)) / 1e9
    assert macs == pytest.approx(GMACS_224[name], rel=0.01)


def test_registry_lists_and_refuses_unknown_names():
    assert models.list_models("convnextv2_*") == sorted(n for n in PARAMS if n.startswith("convnextv2_"))
    with pytest.raises(ValueError, match="unknown model 'convnextv3_atto'"):
        models.create_model("convnextv3_atto")


def test_official_key_names():
    v1, v2 = _meta("convnext_tiny").state_dict(), _meta("convnextv2_atto").state_dict()
    for key in ("downsample_layers.0.0.weight", "downsample_layers.0.1.weight", "downsample_layers.3.1.bias",
                "stages.0.0.dwconv.weight", "stages.0.0.norm.weight", "stages.0.0.pwconv1.weight",
                "stages.3.1.pwconv2.bias", "norm.weight", "head.weight", "head.bias"):
        assert key in v1 and key in v2, key
    assert "stages.0.0.gamma" in v1 and v1["stages.0.0.gamma"].shape == (96,)
    assert v2["stages.0.0.grn.gamma"].shape == (1, 1, 1, 160) and "stages.0.0.gamma" not in v2


@pytest.mark.parametrize("name", ["convnext_tiny", "convnextv2_atto"])
def test_train_step_on_small_input(name):
    torch.manual_seed(0)
    small = {"depths": (1, 1, 1, 1)} if name == "convnext_tiny" else {}  # keep the CPU cost small: one block a stage
    model = models.create_model(name, num_classes=5, drop_path_rate=0.1, **small)
    assert model.stages[3][-1].drop_path.p == pytest.approx(0.1)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_convnext_v1_drop_path_drops_whole_residuals_per_sample():
    torch.manual_seed(0)
    model = models.create_model("convnext_tiny", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), drop_path_rate=0.6,
                                layer_scale_init_value=1.0)
    rates = [stage[0].drop_path.p for stage in model.stages]
    assert rates == pytest.approx([0.0, 0.2, 0.4, 0.6])              # linear in the block index
    block, x = model.stages[3][0], torch.randn(64, 32, 2, 2)
    residual = block.eval()(x) - x
    delta = block.train()(x) - x                                      # per sample: dropped (0) or residual / (1 - p)
    dropped = delta.flatten(1).abs().amax(1) == 0
    kept = ~dropped
    torch.testing.assert_close(delta[kept], residual[kept] / 0.4)
    assert 10 < int(dropped.sum()) < 60                               # about 60% of 64 samples
    out = model.train()(torch.randn(4, 3, 32, 32))                    # and through the whole model with grads
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_head_init_scale_and_layer_scale():
    model = models.create_model("convnext_tiny", head_init_scale=0.0, layer_scale_init_value=0.5)
    assert model.head.weight.abs().max() == 0
    assert torch.all(model.stages[0][0].gamma == 0.5)
    assert models.create_model("convnext_tiny", layer_scale_init_value=0).stages[0][0].gamma is None


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = models.create_model("convnextv2_atto", num_classes=4).eval()
    for p in model.parameters():  # GRN starts as the identity; randomise so it matters
        if p.dim() == 4 and p.shape[:3] == (1, 1, 1):
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
