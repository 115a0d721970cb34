"""Scaled dot-product attention (Vaswani et al. 2017, arXiv 1706.03762, Eq. 1): the spec.

For q (B, H, N, D) and k, v (B, H, M, D):

    S   = scale * q @ k^T                     (B, H, N, M), scale defaults to D ** -0.5
    P   = softmax(S + mask, dim=-1)            mask = -inf where a causal query may not look
    out = P @ v                                (B, H, N, D)

Causal masking follows torch SDPA's `is_causal=True`: the mask is top-left aligned, so query i sees
keys j <= i for any N and M (for N > M the last N - M queries see every key; every query sees at
least key 0, so no row of P is empty). flash-attn instead aligns bottom-right when N != M.

`forward` also returns LSE = logsumexp(S + mask, dim=-1) (B, H, N), and `backward` recomputes P from
it, as FlashAttention-2 does (Dao 2023, arXiv 2307.08691, Alg. 2):

    P  = exp(S - LSE)          dV = P^T dO            dP = dO V^T
    Delta = rowsum(dO * out)   dS = P * (dP - Delta)   dQ = scale dS K    dK = scale dS^T Q

Arithmetic runs in float32 (float64 for float64 input).
"""
from __future__ import annotations

import torch


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def causal_mask(N: int, M: int, device: torch.device) -> torch.Tensor:
    """(N, M) bool, True where query i may attend key j (j <= i, top-left aligned as torch SDPA)."""
    return torch.ones(N, M, dtype=torch.bool, device=device).tril()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """softmax(scale q k^T [+ causal mask]) v; differentiable (autograd is the spec)."""
    acc = _acc_dtype(q)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale  # (B, H, N, M)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.to(acc)).to(q.dtype)


# The two functions below are the reference *backend* of kfe::attention: the same math, split the way
# the fast paths split it (forward saves LSE, backward recomputes P from it).
def _scores(q, k, causal, scale):
    acc = _acc_dtype(q)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale  # (B, H, N, M)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return s


def forward(q, k, v, causal: bool, scale: float):
    """(out (B, H, N, D) in q's dtype, lse (B, H, N) in the accumulation dtype)."""
    s = _scores(q, k, causal, scale)
    m = s.amax(dim=-1, keepdim=True)          # (B, H, N, 1), finite: every query sees key 0
    e = torch.exp(s - m)                      # one exp pass serves both outputs
    denom = e.sum(dim=-1, keepdim=True)
    # (e @ v) / denom rather than exp(s - lse) @ v: at large logits lse's own rounding costs accuracy.
    out = (e @ v.to(s.dtype)) / denom
    lse = (m + denom.log()).squeeze(-1)       # (B, H, N)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) in the dtypes of q, k, v."""
    s = _scores(q, k, causal, scale)
    acc = s.dtype
    p = torch.exp(s - lse.to(acc)[..., None])                    # (B, H, N, M)
    do = dout.to(acc)
    dv = p.transpose(-2, -1) @ do                                 # (B, H, M, D)
    dp = do @ v.to(acc).transpose(-2, -1)                         # (B, H, N, M)
    delta = (do * out.to(acc)).sum(dim=-1, keepdim=True)          # (B, H, N, 1)
    ds = p * (dp - delta)
    dq = (ds @ k.to(acc)) * scale
    dk = (ds.transpose(-2, -1) @ q.to(acc)) * scale
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous())
