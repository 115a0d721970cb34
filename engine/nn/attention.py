"""Multi-head self-attention (ViT, arXiv 2010.11929; MAE 2111.06377; DiT 2212.09748) on kfe::attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.ops import _checks, attention


class Attention(nn.Module):
    """Self-attention over tokens x (B, N, dim): one packed qkv projection, kfe::attention, proj.

    Submodules `qkv` (Linear dim -> 3*dim) and `proj` (Linear dim -> dim) carry the key names of the
    official MAE / timm ViT / DiT checkpoints (`qkv.weight`, `qkv.bias`, `proj.weight`, `proj.bias`),
    which load unchanged. q, k and v are strided views of the qkv output (no copies).

    k_bias=False (with qkv_bias=True): q and v get a bias, k none (BEiT, arXiv 2106.08254; the
    long-sequence MAE's `--no_k_bias_in_vit`, arXiv 2210.07224). A key bias only adds q.b_k to every
    logit of a query, which softmax cancels, so it is a wasted parameter. Layout as the official
    long_seq_mae `AttentionNoKBias` and BEiT: `qkv.weight` without bias plus `q_bias` and `v_bias`
    (dim each), so their pre-training checkpoints load unchanged; the fixed zero k part is built in the
    forward and gets no gradient. A timm-style `qkv.bias` whose k third is zero also loads (and a
    `q_bias`/`v_bias` pair into a model with k_bias=True), as long_seq_mae's convert_model_ckpt_k_bias.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, k_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qv_bias = qkv_bias and not k_bias  # separate q and v biases, no k bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and k_bias)
        if self.qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self._register_load_state_dict_pre_hook(self._convert_bias_layout)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        _checks.tensor("x", x, ndim=3, dtypes=None, layout="(B, N, dim)")
        B, N, C = x.shape
        if C != self.dim:
            raise ValueError(f"x must be (B, N, dim) with dim = {self.dim}, got shape {tuple(x.shape)}")
        if self.qv_bias:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias, requires_grad=False), self.v_bias])
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        q, k, v = qkv.unbind(0)
        out = attention(q, k, v, causal=causal)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def _convert_bias_layout(self, state_dict, prefix, *args) -> None:
        """Load either bias layout: qkv.bias (3 dim) <-> q_bias + v_bias with a zero k part."""
        packed, q, v = prefix + "qkv.bias", prefix + "q_bias", prefix + "v_bias"
        if self.qv_bias and packed in state_dict and q not in state_dict:
            bq, bk, bv = state_dict[packed].chunk(3)
            if bk.count_nonzero():
                raise ValueError(f"{packed} has a non-zero key bias; this Attention was built with k_bias=False")
            del state_dict[packed]
            state_dict[q], state_dict[v] = bq, bv
        elif self.qkv.bias is not None and q in state_dict and v in state_dict and packed not in state_dict:
            bq, bv = state_dict.pop(q), state_dict.pop(v)
            state_dict[packed] = torch.cat([bq, torch.zeros_like(bq), bv])

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
                + (", k_bias=False" if self.qv_bias else ""))
