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


def test_param_groups_skip_frozen_and_named_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    net[2].weight.requires_grad_(False)
    pos = torch.nn.Parameter(torch.zeros(1, 3, 4))
    net.register_parameter("pos_embed", pos)
    decay, no_decay = param_groups(net, 0.1, skip=("pos_embed",))
    assert [id(p) for p in decay["params"]] == [id(net[0].weight)]                  # frozen and skipped: not decayed
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias),
                                                   id(net[2].bias), id(pos)}
    assert all(p.requires_grad for g in (decay, no_decay) for p in g["params"])


def test_adamw_decays_only_the_decay_group():
    """One AdamW step on zero gradients moves only the decayed weights, by lr * wd * w (decoupled)."""
    from train.optim import adamw

    net = torch.nn.Linear(3, 2)
    w0, b0 = net.weight.detach().clone(), net.bias.detach().clone()
    opt = adamw(param_groups(net, 0.5), lr=0.1, betas=(0.9, 0.95), device=torch.device("cpu"))
    assert opt.defaults["betas"] == (0.9, 0.95) and not opt.defaults.get("fused")   # fused on CUDA only
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(net.weight.detach(), w0 * (1 - 0.1 * 0.5))
    torch.testing.assert_close(net.bias.detach(), b0)


def test_scheduler_sets_the_lr_each_step():
    from train.optim import scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = scheduler(opt, total=12, warmup=2, lr=2.0, min_lr=0.2)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[1] == pytest.approx(2.0)      # warmup: lr * (s + 1) / W
    assert lrs[7] == pytest.approx(0.2 + 1.8 * 0.5)                           # half way: (lr + min_lr) / 2
    assert lrs[12] == pytest.approx(0.2) and lrs[13] == pytest.approx(0.2)    # min_lr from the last step on
    zero = scheduler(torch.optim.SGD([p], lr=0.0), total=4, warmup=0, lr=0.0, min_lr=0.1)
    assert zero.lr_lambdas[0].min_ratio == 0.0                                # lr 0: no division by zero


def test_warmup_cosine_matches_the_closed_form():
    f = WarmupCosine(total=50, warmup=5, min_ratio=0.1)
    for s in range(60):
        want = (s + 1) / 5 if s < 5 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min((s - 5) / 45, 1.0)))
        assert f(s) == pytest.approx(want, abs=1e-12), s


def test_ema_is_float32_and_copies_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).to(torch.bfloat16)
    ema = EMA(net, decay=0.25)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters()) and not ema.module.training
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
        net[0].weight.add_(2.0)
    w_before = ema.module[0].weight.clone()
    ema.update(net)
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 3.0))     # buffers: copied, not averaged
    torch.testing.assert_close(ema.module[0].weight, 0.25 * w_before + 0.75 * net[0].weight.float())
    sd = ema.state_dict()
    fresh = EMA(net, decay=0.5)
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.module.state_dict().values(), sd.values()))
