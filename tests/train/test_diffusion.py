"""The diffusion math of train/diffusion.py against closed forms and brute force (float64)."""
import math

import pytest
import torch

from train.diffusion import (GaussianDiffusion, discretized_gaussian_log_likelihood, linear_betas, normal_kl,
                             spaced_timesteps)

T = 1000


@pytest.fixture(scope="module")
def diff():
    return GaussianDiffusion.linear(T)


def test_linear_schedule_endpoints_and_cumulative_product(diff):
    b = linear_betas(T)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02) and len(b) == T
    abar = diff.tables["abar"]
    running, expect = 1.0, []
    for beta in b.tolist():
        running *= 1 - beta
        expect.append(running)
    assert torch.allclose(abar, torch.tensor(expect, dtype=torch.float64), rtol=1e-10)
    assert 3e-5 < float(abar[-1]) < 5e-5   # x_T is nearly pure noise (DDPM's schedule: ~4.0e-5)


def test_q_sample_statistics(diff):
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.7, -0.3, 0.0], dtype=torch.float64).repeat(200_000, 1)  # (N, 3) as (B, C)
    for step in (0, 100, 500, 999):
        t = torch.full((len(x0),), step)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xt = diff.q_sample(x0, t, noise)
        abar = float(diff.tables["abar"][step])
        assert torch.allclose(xt.mean(0), math.sqrt(abar) * x0[0], atol=6e-3)
        assert torch.allclose(xt.var(0), torch.full((3,), 1 - abar, dtype=torch.float64), rtol=1.5e-2)


def test_posterior_matches_gaussian_conditioning(diff):
    """q(x_{t-1} | x_t, x_0) by conditioning the joint Gaussian (x_{t-1}, x_t) given x_0 directly."""
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 998, 999])
    mean, var, logvar = diff.q_posterior(x0, xt, t)
    b, abar = diff.tables["betas"][t], diff.tables["abar"][t]
    abar_prev = diff.tables["abar"][t - 1]
    # x_{t-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev); x_t = sqrt(1 - b) x_{t-1} + sqrt(b) e
    cov = (1 - b).sqrt() * (1 - abar_prev)
    cond_mean = abar_prev.sqrt()[:, None] * x0 + (cov / (1 - abar))[:, None] * (xt - abar.sqrt()[:, None] * x0)
    cond_var = (1 - abar_prev) - cov ** 2 / (1 - abar)
    assert torch.allclose(mean, cond_mean, rtol=1e-9, atol=1e-12)
    assert torch.allclose(var.squeeze(1), cond_var, rtol=1e-9)
    assert torch.allclose(logvar.squeeze(1), cond_var.log(), rtol=1e-9)
    # t = 0: the posterior is a point mass on x_0; the log variance is clipped to beta~_1's
    m0, v0, lv0 = diff.q_posterior(x0[:1], xt[:1], torch.tensor([0]))
    assert torch.allclose(m0, x0[:1]) and float(v0) == 0 and float(lv0) == pytest.approx(math.log(diff.tables["post_var"][1]))


def test_learned_variance_interpolates_between_the_bounds(diff):
    xt = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([5, 400, 999])
    for v, name in ((1.0, "log_betas"), (-1.0, "post_logvar")):
        out = torch.cat([torch.zeros_like(xt), torch.full_like(xt, v)], 1)
        lv = diff.p_mean_variance(out, xt, t)["log_variance"]
        assert torch.allclose(lv[:, 0, 0, 0], diff.tables[name][t])
    out = torch.cat([torch.zeros_like(xt), torch.zeros_like(xt)], 1)  # v = 0: the geometric mean
    lv = diff.p_mean_variance(out, xt, t)["log_variance"][:, 0, 0, 0]
    assert torch.allclose(lv, (diff.tables["log_betas"][t] + diff.tables["post_logvar"][t]) / 2)


def test_vlb_kl_term_matches_torch_distributions(diff):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    out = torch.randn(4, 6, 5, 5, generator=g, dtype=torch.float64).clamp(-1, 1)
    t = torch.tensor([1, 50, 500, 999])
    vb = diff.vb_terms(out, x0, xt, t)
    true_mean, _, true_logvar = diff.q_posterior(x0, xt, t)
    p = diff.p_mean_variance(out, xt, t)
    q_dist = torch.distributions.Normal(true_mean, (0.5 * true_logvar).exp().expand_as(true_mean))
    p_dist = torch.distributions.Normal(p["mean"], (0.5 * p["log_variance"]).exp())
    brute = torch.distributions.kl_divergence(q_dist, p_dist).mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(vb.double(), brute, rtol=1e-5)
    m1, m2, l1, l2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (l1 / 2).exp()),
                                            torch.distributions.Normal(m2, (l2 / 2).exp()))
    assert torch.allclose(normal_kl(m1, l1, m2, l2), ref, rtol=1e-10)


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.3, -5.0), (-0.99, -1.0), (0.995, -6.0), (0.0, 1.0),
                                             (0.5, -9.0)])
def test_discretized_decoder_probabilities_sum_to_one(mean, log_scale):
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
    assert torch.isfinite(logp).all()
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # a bin's mass is the Gaussian's mass on [x - 1/255, x + 1/255] (middle levels)
    normal = torch.distributions.Normal(mean, math.exp(log_scale))
    k = 128
    direct = normal.cdf(levels[k] + 1 / 255) - normal.cdf(levels[k] - 1 / 255)
    assert float(logp[k].exp()) == pytest.approx(float(direct), rel=1e-6, abs=1e-300)


def test_vb_at_t0_is_the_decoder_nll(diff):
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 127.5 - 1)
    xt = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out = torch.zeros(2, 6, 4, 4, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    p = diff.p_mean_variance(out, xt, t)
    nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(diff.vb_terms(out, x0, xt, t).double(), nll, rtol=1e-6)


def test_hybrid_loss_gradients_mse_to_eps_vb_to_variance_only(diff):
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    out = (torch.randn(3, 4, 4, 4) * 0.5).requires_grad_(True)
    t = torch.tensor([0, 10, 700])
    terms = diff.training_losses(lambda xt, tt: out * 1.0, x0, t)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_vb[:, :2].abs().max() == 0 and g_vb[:, 2:].abs().max() > 0
    assert g_mse[:, 2:].abs().max() == 0 and g_mse[:, :2].abs().max() > 0
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_respacing_keeps_the_marginals():
    base = GaussianDiffusion.linear(T)
    assert spaced_timesteps(T, 4) == [0, 333, 666, 999] and spaced_timesteps(T, T) == list(range(T))
    same = base.respaced(T)
    assert torch.allclose(same.tables["betas"], base.tables["betas"], rtol=1e-10)
    sub = base.respaced(50)
    keep = torch.tensor(spaced_timesteps(T, 50))
    assert torch.equal(sub.timestep_map, keep)
    assert torch.allclose(sub.tables["abar"], base.tables["abar"][keep], rtol=1e-10)
    with pytest.raises(ValueError, match="steps must be in"):
        base.respaced(0)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("ddpm", 25), ("ddim", 1000), ("ddim", 10)])
def test_sampling_with_the_true_noise_recovers_x0(sampler, steps):
    """A model that knows x_0 returns eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar): every sampler lands on x_0."""
    d = GaussianDiffusion.linear(T).respaced(steps)
    full = GaussianDiffusion.linear(T)
    x0 = torch.rand(4, 3, 6, 6, dtype=torch.float64) * 2 - 1
    seen = []

    def oracle(x, model_t):
        seen.append(int(model_t[0]))
        abar = full.tables["abar"][model_t].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)   # v = 0: any variance works

    g = torch.Generator().manual_seed(0)
    out = d.sample(oracle, torch.randn(x0.shape, dtype=torch.float64, generator=g), sampler,
                   generator=g, eta=0.5 if sampler == "ddim" else 0.0)
    assert torch.allclose(out, x0, atol=1e-6), (out - x0).abs().max()
    assert seen == list(reversed(spaced_timesteps(T, steps)))   # the model sees the original timesteps


def _oracle(full, x0, v=0.0):
    def model(x, model_t):
        abar = full.tables["abar"][model_t].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.full_like(eps, v)], 1)
    return model


@pytest.mark.parametrize("steps", [1000, 40])
def test_one_step_mean_and_variance(steps):
    """x_{t-1} = mean + std * z: DDPM uses the learned (interpolated) variance of the (respaced) process;
    DDIM's sigma at eta = 1 is the posterior's std beta~_t (Song et al., below Eq. 16); eta = 0 is deterministic."""
    full = GaussianDiffusion.linear(T)
    d = full.respaced(steps)
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    zero, one = torch.zeros_like(xt), torch.ones_like(xt)
    for i in (1, steps // 2, steps - 1):
        t = torch.full((2,), i)
        v = 0.3
        frac = (v + 1) / 2
        var = torch.exp(frac * d.tables["log_betas"][i] + (1 - frac) * d.tables["post_logvar"][i])
        post_mean, post_var, _ = d.q_posterior(x0, xt, t)
        mean = d.step(_oracle(full, x0, v), xt, i, zero, "ddpm")
        assert torch.allclose(mean, post_mean, atol=1e-9)
        assert torch.allclose(d.step(_oracle(full, x0, v), xt, i, one, "ddpm") - mean, var.sqrt() * one, atol=1e-9)
        ddim = d.step(_oracle(full, x0), xt, i, zero, "ddim", eta=1.0)
        assert torch.allclose(ddim, post_mean, atol=1e-9)   # eta = 1: the posterior mean ...
        spread = d.step(_oracle(full, x0), xt, i, one, "ddim", eta=1.0) - ddim
        assert torch.allclose(spread, post_var.sqrt().expand_as(spread), atol=1e-9)   # ... and its variance
        half = d.step(_oracle(full, x0), xt, i, one, "ddim", eta=0.5) - d.step(_oracle(full, x0), xt, i, zero, "ddim", eta=0.5)
        assert torch.allclose(half, 0.5 * post_var.sqrt().expand_as(half), atol=1e-9)
        assert torch.equal(d.step(_oracle(full, x0), xt, i, one, "ddim"), d.step(_oracle(full, x0), xt, i, zero, "ddim"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))
    d = GaussianDiffusion.linear(100)
    with pytest.raises(ValueError, match="sampler"):
        d.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), "euler")
    with pytest.raises(ValueError, match="2 x 3 output channels"):
        d.p_mean_variance(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.long))
