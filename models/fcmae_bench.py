"""`kfe bench fcmae`: the FCMAE encoder (ConvNeXt V2, arXiv 2301.00808, Sec. 3.1) forward / backward on
the sparse path against the dense-masked computation, at mask ratios 0 and 0.6.

Sizes are BATCHxRESOLUTION (default: 4x224 on the CPU, 64x224 on a GPU) of fcmae_convnextv2_atto's
encoder (KFE_BENCH_FCMAE_MODEL=fcmae_convnextv2_base for another). Providers, the same function
(outputs (N, H/32, W/32, C), 0 at removed patches; gradients for the image and every parameter):
  reference          dense-masked encoder on engine.ops.sparse_conv.reference (masked_block /
                     masked_downsample, the spec), eager
  kfe-dense          SparseConvNeXtV2.forward_dense: dense-masked on kfe::sparse_dwconv2d and kfe::grn
  kfe-sparse         SparseConvNeXtV2.forward on the visible rows, the 4 stages built beforehand
  kfe-sparse+stages  the same plus building the stages from the mask (what a training step pays)
Useful FLOPs count visible sites only (models.fcmae.encoder_macs, 2 per MAC; bwd 2x fwd).
"""
from __future__ import annotations

import os

import torch
from torch import nn

import models
from engine.bench.core import Case
from engine.ops.sparse_conv import reference
from models.fcmae import encoder_macs, random_mask

RATIOS = (0.0, 0.6)


def _reference(enc, imgs, m):
    x = torch.where(m[..., None], enc.stem(imgs), 0)
    for i in range(4):
        if i > 0:
            d = enc.downsample_layers[i]
            x, m = reference.masked_downsample(x, m, d[0].weight, d[0].bias, d[1].weight, d[1].bias)
        for b in enc.stages[i]:
            x = reference.masked_block(x, m, b.dwconv.weight, b.dwconv.bias, b.norm.weight, b.norm.bias,
                                       b.pwconv1.weight, b.pwconv1.bias, b.grn.gamma, b.grn.beta,
                                       b.pwconv2.weight, b.pwconv2.bias)
    return x


class _Run(nn.Module):
    """One provider as a module over the encoder, so functional_call can feed it the (leaf) parameters."""

    def __init__(self, model, body):
        super().__init__()
        self.model, self.body = model, body

    def forward(self, imgs, mask, stages):
        return self.body(self.model, imgs, mask, stages)


def _providers(model) -> dict:
    bodies = {
        "reference": lambda m, x, mask, st: _reference(m.encoder, x, st[0].mask),
        "kfe-dense": lambda m, x, mask, st: m.encoder.forward_dense(x, st[0].mask),
        "kfe-sparse": lambda m, x, mask, st: m.encoder(x, st),
        "kfe-sparse+stages": lambda m, x, mask, st: m.encoder(x, m.make_mask_and_stages(x, mask)[1]),
    }
    names = [f"model.encoder.{n}" for n, _ in model.encoder.named_parameters()]

    def provider(body):
        run = _Run(model, body)
        return lambda imgs, mask, stages, *params: torch.func.functional_call(
            run, dict(zip(names, params)), (imgs, mask, stages), strict=False)
    return {name: provider(body) for name, body in bodies.items()}


def cases(device: torch.device, sizes=None, dtypes=None, ratios=RATIOS, model_kwargs=None) -> list[Case]:
    name = os.environ.get("KFE_BENCH_FCMAE_MODEL", "fcmae_convnextv2_atto")
    sizes = sizes or ([(64, 224)] if device.type == "cuda" else [(4, 224)])
    dtypes = dtypes or [torch.float32]
    out = []
    for size in sizes:
        if len(size) != 2:
            raise ValueError(f"fcmae sizes are BATCHxRESOLUTION, got {'x'.join(map(str, size))}")
        N, R = size
        for dtype in dtypes:
            for ratio in ratios:
                torch.manual_seed(0)
                model = models.create_model(name, mask_ratio=ratio, **(model_kwargs or {})).to(device=device, dtype=dtype)
                g = R // 32
                mask = random_mask(N, (g, g), ratio, generator=torch.Generator().manual_seed(0)).to(device)
                keep = 1 - float(mask[0].mean())

                def inputs(model=model, mask=mask, N=N, R=R, dtype=dtype):
                    gen = torch.Generator().manual_seed(1)
                    imgs = torch.randn(N, 3, R, R, generator=gen).to(device=device, dtype=dtype)
                    params = [p.detach().clone() for p in model.encoder.parameters()]
                    return (imgs, mask, model.make_mask_and_stages(imgs, mask)[1], *params)

                flops = 2 * N * encoder_macs(model.encoder, R, keep)
                out.append(Case(f"{name}.encoder", f"{N}x{R} mask {ratio:.2f}", dtype, device, inputs,
                                _providers(model), bytes={},
                                flops={"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops},
                                grad_inputs=(0, *range(3, 3 + len(list(model.encoder.parameters()))))))
    return out
