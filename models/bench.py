"""`kfe bench model [NAME ...]`: a model's training-step throughput, eager vs compiled (vs timm).

One step = forward + loss + backward + AdamW step on one batch held on the device (no data loading),
timed after warm-up (which absorbs torch.compile's compilation; the first step's time is reported as
`first s`) as the median of repeats (CUDA events on a GPU). Losses: cross-entropy on random labels for
classifiers, the model's own loss for MAE-style models (forward -> (loss, ...)), epsilon MSE at random
timesteps / labels for DiT, the contrastive loss on random tokens for CLIP, and for MaskFeat the MSE
against the HOG of the masked tokens of a fixed block-wise mask (clips (B, 3, T, H, W) when the model
takes video, e.g. --model-kwargs '{"num_frames": 4}'; the HOG targets are part of the step).

Providers (`--providers` picks some; default: all that apply, without the compile ones on the CPU,
where inductor's C++ build of a training step takes minutes on a small machine):
  eager, compile              the KFE model as built / under torch.compile (inductor)
  eager-cl, compile-cl        channels-last weights and input (convolutional models: ConvNeXt)
  timm, timm-compile          timm's model of the same architecture under the same settings, when timm is
                              importable and has one (otherwise the row says why it was skipped): ConvNeXt
                              and ConvNeXt V2 names are timm's, vit_<size>_patch<p> is timm's
                              vit_<size>_patch<p>_224 built at --img-size; MAE, FCMAE, MaskFeat, CLIP /
                              SLIP and DiT have no timm peer (see timm_name)
Models: the names given (default: convnextv2_atto on the CPU; convnextv2_base and dit_xl_2 on a GPU).
Settings: --batch B, --img-size S (for DiT: the latent side, 32 = 256 px images), --dtype bfloat16 (bf16
autocast; the default on a GPU) or float32 (the CPU default), --model-kwargs JSON (create_model
overrides), --warmup / --repeats, --json PATH. TFLOP/s counts useful FLOPs: 2 x models.count_flops MACs
per image, x3 for forward + backward (models whose forward needs values, FCMAE, are counted by a CPU run); MFU divides by the datasheet bf16 peak of engine.bench.machine.SPEC
(known GPUs only).
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import models
from engine.bench import machine
from engine.bench.timing import peak_memory_mb, time_fn

PROVIDERS = ("eager", "compile", "eager-cl", "compile-cl", "timm", "timm-compile")
# Without names: the issue's performance targets on a GPU (ConvNeXt V2-B vs timm, DiT-XL/2's MFU).
DEFAULTS = {False: ["convnextv2_atto"], True: ["convnextv2_base", "dit_xl_2"]}


def build(name: str, res: int, overrides: dict | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The registered model at input side `res` (ViT / MAE img_size, DiT input_size; ConvNeXt any size)."""
    kw = dict(overrides or {})
    with torch.device(device):
        if name.startswith("dit_"):
            return models.create_model(name, **{"input_size": res, **kw})
        try:
            return models.create_model(name, **{"img_size": res, **kw})
        except TypeError:  # size-agnostic models (ConvNeXt) take no img_size
            return models.create_model(name, **kw)


def is_conv(model: nn.Module) -> bool:
    """Models with spatial convolutions beyond a patch embedding (depthwise ones: the ConvNeXt family)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def make_inputs(model: nn.Module, batch: int, res: int, device, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "t_embedder"):  # DiT: latents, timesteps, labels
        x = torch.randn(batch, model.in_channels, res, res, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        y = torch.randint(0, model.num_classes, (batch,), generator=g)
        return tuple(v.to(device) for v in (x, t, y))
    if hasattr(model, "forward_target"):  # MaskFeat: images or clips, and block-wise masks (B, L)
        frames = (model.num_frames,) if model.num_frames > 1 else ()
        x = torch.randn(batch, 3, *frames, res, res, generator=g).to(device)
        return x, model.random_mask(batch, generator=g, device=device)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    if hasattr(model, "encode_text"):  # CLIP: images and random token ids
        text = torch.randint(0, model.vocab_size, (batch, model.context_length), generator=g)
        return x, text.to(device)
    return (x,)


def loss_of(model: nn.Module, inputs: tuple) -> torch.Tensor:
    # (torch.compile's wrapper forwards attribute look-ups to the model)
    if hasattr(model, "t_embedder"):
        out = model(*inputs)
        return out[:, : inputs[0].shape[1]].float().square().mean()  # eps MSE against a zero target
    if hasattr(model, "encode_text"):
        return model.clip_loss(model(*inputs))
    if hasattr(model, "forward_target"):  # MaskFeat: dense predictions; HOG targets of the masked tokens
        x, mask = inputs
        return model.forward_loss(model(x, mask), model.forward_target(x, mask), mask)
    out = model(*inputs)
    if isinstance(out, (tuple, list)):   # MAE-style: (loss, pred, mask)
        return out[0]
    if isinstance(out, dict) and "loss" in out:
        return out["loss"]
    if out.dim() == 2:                   # a classifier: cross-entropy on fixed pseudo-labels
        labels = torch.arange(out.shape[0], device=out.device) % out.shape[1]
        return F.cross_entropy(out.float(), labels)
    raise ValueError(f"cannot make a training loss from a {type(out).__name__} of shape {tuple(out.shape)}")


def timm_name(name: str, res: int) -> tuple[str | None, dict]:
    """timm's name for the same architecture and its create_model kwargs at input side `res`, or
    (None, {}) when timm has none. ConvNeXt / ConvNeXt V2 share our names; timm names a ViT by its
    pre-training resolution (vit_base_patch16 -> vit_base_patch16_224) and builds it at any img_size.
    The pre-training models (MAE, FCMAE, MaskFeat, CLIP / SLIP) and DiT are not in timm."""
    if name.startswith(("convnext_", "convnextv2_")):
        return name, {}
    if name.startswith("vit_"):
        return f"{name}_224", {"img_size": res}
    return None, {}


def _timm(name: str, device, channels_last: bool, res: int, overrides: dict | None = None):
    """timm's model of the same architecture, or the reason there is none. --model-kwargs go to timm too
    (its ConvNeXt and ViT take the same depths / dims / embed_dim / depth / num_heads names), so a
    shrunk model is compared with the same shrunk architecture."""
    peer, kwargs = timm_name(name, res)
    kwargs = {**kwargs, **(overrides or {})}
    if peer is None:
        return None, f"timm has no peer of {name!r}"
    try:
        import timm
    except ImportError:
        return None, "timm is not installed"
    if peer not in timm.list_models(peer):
        return None, f"timm has no model {peer!r}"
    try:
        model = timm.create_model(peer, **kwargs).to(device)
    except TypeError as err:  # a --model-kwargs key timm's model does not take (e.g. layer_scale_init_value)
        return None, f"timm's {peer} does not take these --model-kwargs: {err}"
    return (model.to(memory_format=torch.channels_last) if channels_last else model), ""


def measure(name: str, provider: str, batch: int, res: int, device: torch.device, bf16: bool, warmup: int,
            repeats: int, overrides: dict | None = None) -> dict:
    rec = {"model": name, "provider": provider, "batch": batch, "resolution": res,
           "precision": "bf16" if bf16 else "fp32"}
    torch.manual_seed(0)
    cl = provider.endswith("-cl")
    if provider.startswith("timm"):
        probe = build(name, res, overrides, "meta")
        model, why = _timm(name, device, is_conv(probe), res, overrides)
        if model is None:
            return {**rec, "skipped": why}
        cl = is_conv(probe)
    else:
        model = build(name, res, overrides, device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
    inputs = make_inputs(model, batch, res, device)
    if cl:
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    model.train()
    run = torch.compile(model) if "compile" in provider else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True if device.type == "cuda" else None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(run, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rec["first_step_s"] = time.perf_counter() - t0
    ms = time_fn(step, device, max(warmup - 1, 0), repeats)
    rec.update(ms=ms, images_per_s=batch / (ms["p50"] * 1e-3), peak_mem_mb=peak_memory_mb(step, device),
               params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    return rec


def train_flops_per_image(name: str, res: int, overrides: dict | None) -> float | None:
    """3 x forward FLOPs (2 per MAC) of one image, from models.count_flops on the meta device."""
    try:
        meta = build(name, res, overrides, "meta")
        return 6.0 * models.count_flops(meta, inputs=make_inputs(meta, 1, res, "meta"))
    except Exception as err:  # noqa: BLE001 - FLOPs are optional: report the step times anyway
        print(f"  (no FLOP count for {name}: {err!r})", file=sys.stderr)
        return None


def header(meta: dict) -> str:
    return "\n".join([f"device: {meta['device']} | torch {meta['torch']} | git {meta['git']} | {meta['date']}", "",
                      "| model | provider | batch | res | precision | img/s | ms/step p50 | p20-p80 | first s | "
                      "TFLOP/s | MFU | vs eager | peak MB |",
                      "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"])


def row(r: dict) -> str:
    head = f"| {r['model']} | {r['provider']} | {r['batch']} | {r['resolution']} | {r['precision']} |"
    if "skipped" in r or "error" in r:
        return f"{head} {'skipped: ' + r['skipped'] if 'skipped' in r else 'failed: ' + r['error'][:90]} ||||||||"
    ms = r["ms"]
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
    tf = f"{r['tflops']:.3g}" if "tflops" in r else ""
    sp = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else ""
    mem = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else ""
    return (f"{head} {r['images_per_s']:.1f} | {ms['p50']:.1f} | {ms['p20']:.1f}-{ms['p80']:.1f} | "
            f"{r['first_step_s']:.1f} | {tf} | {mfu} | {sp} | {mem} |")


def markdown(records: list[dict], meta: dict) -> str:
    return "\n".join([header(meta)] + [row(r) for r in records])


def providers_for(name: str, chosen: list[str] | None, device: torch.device) -> list[str]:
    conv = is_conv(build(name, 64, None, "meta")) if not name.startswith("dit_") else False
    default = [p for p in PROVIDERS if conv or not p.endswith("-cl")]
    if not chosen:
        # inductor compiles a CPU training step in C++ for minutes on a small machine: opt in on the CPU.
        return [p for p in default if "compile" not in p] if device.type == "cpu" else default
    bad = [p for p in chosen if p not in PROVIDERS]
    if bad:
        raise SystemExit(f"--providers: {bad} not in {', '.join(PROVIDERS)}")
    return [p for p in chosen if p in default or p.startswith("timm")]


def run(args, device: torch.device) -> int:
    from engine.cli import _parse_dtypes

    names = getattr(args, "models", None) or DEFAULTS[device.type == "cuda"]
    unknown = [n for n in names if n not in models.list_models()]
    if unknown:
        raise SystemExit(f"kfe bench model: unknown model(s) {unknown}; see models.list_models()")
    cpu = device.type == "cpu"
    dtypes = _parse_dtypes(args.dtype) or [torch.float32 if cpu else torch.bfloat16]
    batch = args.batch or (8 if cpu else 128)
    res = args.img_size or (64 if cpu else 224)
    overrides = json.loads(args.model_kwargs) if args.model_kwargs else None
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    repeats = args.repeats if args.repeats is not None else (3 if cpu else 20)
    chosen = args.providers.split(",") if args.providers else None
    peak = machine.spec(device).get("bf16_flops")
    from engine.bench.report import write_json

    meta = machine.info(device)
    print(header(meta), flush=True)
    records = []
    for name in names:
        size = res if not name.startswith("dit_") or args.img_size else 32
        flops = train_flops_per_image(name, size, overrides)
        for dtype in dtypes:
            base = None  # eager's img/s: the first provider (PROVIDERS order)
            for provider in providers_for(name, chosen, device):
                print(f"  timing model {name} {provider} batch {batch} res {size} {dtype}", file=sys.stderr, flush=True)
                try:
                    rec = measure(name, provider, batch, size, device, dtype == torch.bfloat16, warmup, repeats,
                                  overrides)
                except Exception as err:  # noqa: BLE001 - a provider that fails is reported, not fatal
                    rec = {"model": name, "provider": provider, "batch": batch, "resolution": size,
                           "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "error": repr(err)[:300]}
                if "images_per_s" in rec and flops:
                    rec.update(train_flops_per_image=flops, tflops=flops * rec["images_per_s"] / 1e12)
                    if peak:
                        rec["mfu"] = flops * rec["images_per_s"] / peak
                if provider == "eager" and "images_per_s" in rec:
                    base = rec["images_per_s"]
                if base and "images_per_s" in rec:
                    rec["speedup_vs_eager"] = rec["images_per_s"] / base
                # one row and the whole JSON per measurement: a run killed by a time limit keeps them
                records.append(rec)
                print(row(rec), flush=True)
                if args.json:
                    write_json([{**meta, **r} for r in records], args.json)
    if cpu and not chosen:
        print("\n(compile providers skipped on the CPU by default: inductor builds a training step in minutes "
              "here; add them with --providers eager,compile,...)")
    if args.json:
        print(f"\nwrote {len(records)} records to {args.json}")
    return 1 if any("error" in r for r in records) else 0


def add_bench_arguments(bench) -> None:
    g = bench.add_argument_group("model suite (kfe bench model NAME ...)")
    g.add_argument("--batch", type=int, help="model: images per step (default 8 on CPU, 128 on GPU)")
    g.add_argument("--img-size", type=int, help="model: input side (default 64 on CPU, 224 on GPU; DiT latents 32)")
    g.add_argument("--model-kwargs", help="model: create_model overrides as JSON, e.g. '{\"depths\": [1,1,1,1]}'")
