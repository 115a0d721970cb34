"""Optimizer pieces: no-decay groups, the warmup + cosine schedule, EMA."""
import math

import pytest
import torch

import models
from train.optim import EMA, WarmupCosine, param_groups


def test_no_weight_decay_on_norms_biases_and_grn():
    model = models.create_model("convnextv2_atto", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "stages.0.0.grn.gamma" in nd and "stages.0.0.grn.beta" in nd and "stages.0.0.norm.weight" in nd
    assert "head.bias" in nd and "head.weight" in d and "stages.0.0.dwconv.weight" in d
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(nd) + len(d) == len(list(model.parameters()))


def test_warmup_then_cosine():
    f = WarmupCosine(total=110, warmup=10, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)     # half way through the cosine
    assert f(110) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert WarmupCosine(5, 0, 0.0)(0) == 1.0 and math.isclose(WarmupCosine(5, 0, 0.0)(5), 0.0, abs_tol=1e-12)


def test_ema_tracks_weights():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.75)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(4.0)
    ema.update(net)
    torch.testing.assert_close(ema.module.weight, start + 1.0)  # 0.75 * w0 + 0.25 * (w0 + 4)
    assert not ema.module.weight.requires_grad
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(net, 1.0)
