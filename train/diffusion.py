"""Gaussian diffusion as DiT trains and samples it (Peebles & Xie, arXiv 2212.09748, Sec. 3.1).

DDPM (Ho et al., arXiv 2006.11239) with the learned variances and hybrid loss of improved DDPM
(Nichol & Dhariwal, arXiv 2102.09672), written from the papers' equations:

  forward     q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                        DDPM Eq. 4
  posterior   q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I),                  DDPM Eq. 6-7
              c1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t), c2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
              beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t  (beta~_0 = 0 is clipped to beta~_1 in logs)
  model       epsilon and v per channel; Sigma = exp(v' log beta_t + (1 - v') log beta~_t), v' = (v + 1) / 2
                                                                                       iDDPM Eq. 15
  loss        L_hybrid = L_simple + lambda L_vlb, lambda = 0.001 (iDDPM Eq. 16). With t uniform over T steps
              L_vlb is estimated by T * L_t, so lambda L_vlb = L_t at T = 1000; L_simple is the per-element
              MSE of epsilon and L_t the per-element KL(q posterior || p) in bits (t > 0), or at t = 0 the
              discretised Gaussian decoder NLL (DDPM Eq. 13). L_t sees the mean through a stop-gradient:
              it trains the variance only (iDDPM Sec. 3.1), as the official code does.
  sampling    ancestral DDPM (x_{t-1} = mu + Sigma^1/2 z) or DDIM (Song et al., arXiv 2010.02502, Eq. 12),
              on a subset of K timesteps: the subsequence's betas are 1 - abar_{t_i} / abar_{t_{i-1}}
              (iDDPM Sec. 4), the learned variance is re-interpolated between them, and the model is fed
              the original timestep indices.

Schedule tables are float64 (as the official code keeps them); per-sample values are gathered at t
and cast to the input's dtype.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, model timesteps) -> output


def linear_betas(steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule (Sec. 4), scaled by 1000 / steps so other lengths keep the same shape."""
    scale = 1000.0 / steps
    return torch.linspace(scale * start, scale * end, steps, dtype=torch.float64)


def spaced_timesteps(total: int, steps: int) -> list[int]:
    """`steps` timesteps spread evenly over [0, total - 1], both ends included."""
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}], got {steps}")
    if steps == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (steps - 1)) for i in range(steps)})


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a <= 0, accurate at both ends (Maechler 2012)."""
    a = a.clamp(max=-1e-300 if a.dtype == torch.float64 else -1e-30)
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """log P(x) per element of data on `bins` levels in [-1, 1] under N(means, e^(2 log_scales)) (DDPM Eq. 13).

    A level's bin is [x - 1/(bins-1), x + 1/(bins-1)]; the end bins extend to -inf / +inf, so the
    probabilities of the levels sum to 1. log(Phi(hi) - Phi(lo)) is taken on the side of the tail
    that keeps it accurate (flip to the left tail, then log Phi(hi) + log(1 - Phi(lo)/Phi(hi))).
    """
    half = 1.0 / (bins - 1)
    x, means, log_scales = (v.double() for v in (x, means, log_scales))
    inv = torch.exp(-log_scales)
    hi, lo = inv * (x - means + half), inv * (x - means - half)
    flip = lo > 0  # both in the right tail: P = Phi(-lo) - Phi(-hi)
    hi, lo = torch.where(flip, -lo, hi), torch.where(flip, -hi, lo)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    middle = log_hi + _log1mexp(log_lo - log_hi)
    below = torch.special.log_ndtr(inv * (x - means + half))    # first level: (-inf, x + half]
    above = torch.special.log_ndtr(-inv * (x - means - half))   # last level: [x - half, inf)
    edge = 1.0 - half  # halfway between an end level (+-1) and its neighbour (+-(1 - 2 half))
    return torch.where(x < -edge, below, torch.where(x > edge, above, middle))


class GaussianDiffusion:
    """The schedule tables of a (possibly respaced) diffusion and the losses / samplers on them.

    Args:
        betas: (T,) noise schedule of this process (T = len(betas)).
        learn_sigma: the model outputs 2C channels (epsilon, v); else C channels (epsilon) and the
            fixed "large" variance beta_t (beta~_1 at t = 0), as DiT without learned sigma.
        timestep_map: (T,) the original timestep index of each step, passed to the model (respacing).
    """

    def __init__(self, betas: torch.Tensor, learn_sigma: bool = True, timestep_map: torch.Tensor | None = None):
        b = torch.as_tensor(betas, dtype=torch.float64)
        if b.dim() != 1 or not ((b > 0) & (b <= 1)).all():
            raise ValueError("betas must be a 1-D tensor in (0, 1]")
        self.num_timesteps, self.learn_sigma = len(b), learn_sigma
        self.timestep_map = (torch.arange(len(b)) if timestep_map is None else torch.as_tensor(timestep_map)).long()
        alphas = 1.0 - b
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        self.tables = {
            "betas": b, "log_betas": torch.log(b), "abar": abar, "abar_prev": abar_prev,
            "sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1.0 - abar).sqrt(),
            "sqrt_recip_abar": abar.rsqrt(), "sqrt_recipm1_abar": (1.0 / abar - 1.0).sqrt(),
            "post_var": post_var,
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),  # beta~_0 = 0 -> beta~_1
            "post_c1": b * abar_prev.sqrt() / (1.0 - abar),
            "post_c2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            "fixed_large_logvar": torch.log(torch.cat([post_var[1:2], b[1:]])),
        }
        self._device_tables: dict = {}

    @classmethod
    def linear(cls, steps: int = 1000, learn_sigma: bool = True) -> "GaussianDiffusion":
        return cls(linear_betas(steps), learn_sigma)

    def respaced(self, steps: int) -> "GaussianDiffusion":
        """The same process on `steps` evenly spaced timesteps (iDDPM Sec. 4): betas from abar ratios."""
        keep = spaced_timesteps(self.num_timesteps, steps)
        abar = self.tables["abar"][keep]
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        return GaussianDiffusion(betas, self.learn_sigma, self.timestep_map[keep])

    # ------------------------------------------------------------ tables

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """tables[name][t] as (B, 1, ..., 1) in like's dtype and device."""
        key = (name, like.device)
        if key not in self._device_tables:
            self._device_tables[key] = self.tables[name].to(like.device)
        v = self._device_tables[key][t].to(like.dtype)
        return v.view(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return self.timestep_map.to(t.device)[t]

    # ------------------------------------------------------------ forward process and posterior

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_abar", t, x0) * x0 + self._at("sqrt_1m_abar", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("post_c1", t, xt) * x0 + self._at("post_c2", t, xt) * xt
        return mean, self._at("post_var", t, xt), self._at("post_logvar", t, xt)

    def p_mean_variance(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: bool = False) -> dict:
        """p(x_{t-1} | x_t) from the model's output: mean, log_variance, pred_x0, eps."""
        C = xt.shape[1]
        if self.learn_sigma:
            if out.shape[1] != 2 * C:
                raise ValueError(f"learn_sigma needs 2 x {C} output channels, got {out.shape[1]}")
            eps, v = out[:, :C], out[:, C:]
            frac = (v + 1) / 2  # iDDPM Eq. 15: v in [-1, 1] interpolates log beta~_t .. log beta_t
            log_var = frac * self._at("log_betas", t, xt) + (1 - frac) * self._at("post_logvar", t, xt)
        else:
            eps, log_var = out, self._at("fixed_large_logvar", t, xt).expand_as(xt)
        pred_x0 = self._at("sqrt_recip_abar", t, xt) * xt - self._at("sqrt_recipm1_abar", t, xt) * eps
        if clip:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean = self._at("post_c1", t, xt) * pred_x0 + self._at("post_c2", t, xt) * xt
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    # ------------------------------------------------------------ training

    def vb_terms(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                 clip: bool = False) -> torch.Tensor:
        """L_t in bits per element, (B,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the
        decoder's -log p(x_0 | x_1) at t = 0."""
        true_mean, _, true_logvar = self.q_posterior(x0.double(), xt.double(), t)
        p = self.p_mean_variance(out.double(), xt.double(), t, clip)
        kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl).float()

    def training_losses(self, model: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-sample {"loss", "mse", "vb"} (B,) of L_hybrid at timesteps t (B,); model(x_t, t) -> output."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.model_timesteps(t)).float()
        C = x0.shape[1]
        eps = out[:, :C]
        mse = mean_flat((noise.float() - eps) ** 2)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        frozen = torch.cat([eps.detach(), out[:, C:]], dim=1)  # the VB term trains the variance only
        vb = self.vb_terms(frozen, x0.float(), xt.float(), t) * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, model: ModelFn, noise: torch.Tensor, sampler: str = "ddpm", eta: float = 0.0,
               clip: bool = False, generator: torch.Generator | None = None,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """x_0 from x_T = noise by ancestral DDPM or DDIM steps over this process's timesteps."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        x = noise
        for i in reversed(range(self.num_timesteps)):
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if i > 0 else None
            x = self.step(model, x, i, z, sampler, eta, clip)
            if progress:
                progress(i)
        return x

    @torch.no_grad()
    def step(self, model: ModelFn, x: torch.Tensor, i: int, z: torch.Tensor | None, sampler: str = "ddpm",
             eta: float = 0.0, clip: bool = False) -> torch.Tensor:
        """x_{i-1} from x_i with the standard-normal draw z (None at i = 0: the mean, no noise)."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = self.p_mean_variance(model(x, self.model_timesteps(t)).float(), x, t, clip)
        z = torch.zeros_like(x) if z is None else z
        if sampler == "ddpm":
            return p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
        # DDIM (Eq. 12): epsilon re-derived from the (possibly clipped) x_0 prediction.
        eps = (self._at("sqrt_recip_abar", t, x) * x - p["pred_x0"]) / self._at("sqrt_recipm1_abar", t, x)
        abar, abar_prev = self._at("abar", t, x), self._at("abar_prev", t, x)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        return p["pred_x0"] * abar_prev.sqrt() + (1 - abar_prev - sigma ** 2).sqrt() * eps + sigma * z
