"""`kfe sample dit`: draw images from a DiT checkpoint with classifier-free guidance, as a PNG grid.

    kfe sample dit --ckpt runs/dit-shapes --out grid.png [--steps 250 --sampler ddpm|ddim --eta 0
                   --cfg-scale 4 --classes red,blue|0,3 --per-class 4 --seed 0 --upscale 4]

The model is rebuilt from the checkpoint alone (sizes from the state dict, the rest from the saved
config). Weights: the EMA ones once the EMA has caught up, i.e. the initialisation's share in it,
ema_decay ** step, is below 5% (DiT's 0.9999 needs ~30K steps); before that the raw weights, with a
warning (a short run's EMA is still mostly the random initialisation: pure noise). `--ema` / `--no-ema`
force either. `--vae DIR` decodes latent samples to pixels with that diffusers AutoencoderKL.
Sampling runs on `--steps` evenly spaced timesteps of the training process (iDDPM respacing): DDPM
ancestral steps with the learned variance, or DDIM (eta 0: deterministic). Guidance follows DiT:
eps = eps(x | null) + s (eps(x | y) - eps(x | null)) on every epsilon channel (the official sampler
guides only the first 3 of 4 latent channels; with pixels both are the same); s = 1 is unguided.

Output: the grid (one row per class, `--per-class` columns, 2 px gaps) and `<out stem>.txt`, a
caption file naming each row's class and the settings. For latent checkpoints the raw samples
(divided by latent_scale, ready for a VAE decoder) are also saved as `<out stem>.npy`, and the grid
shows their first three channels, each image min-max scaled.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

GAP = 2


def _class_ids(text: str | None, names: list[str] | None, num_classes: int) -> list[int]:
    if not text:
        return list(range(min(num_classes, 16)))
    out = []
    for tok in (s.strip() for s in text.split(",") if s.strip()):
        if tok.isdigit():
            k = int(tok)
        elif names and tok in names:
            k = names.index(tok)
        else:
            raise ValueError(f"--classes: {tok!r} is neither a class index nor a class name"
                             + (f" ({', '.join(names)})" if names else ""))
        if not 0 <= k < num_classes:
            raise ValueError(f"--classes: {k} is out of range (the model has {num_classes} classes)")
        out.append(k)
    return out


def _class_names(cfg) -> list[str] | None:
    """The training data's class names when they can be known without the data (shapes) or it is still
    there (an ImageFolder); None otherwise (rows are then named by index)."""
    from train.data import kind_of
    from train.data import latents as latents_mod
    from train.data.shapes import class_names

    if kind_of(cfg.data) == "shapes":
        return class_names(cfg.shapes.label)
    if latents_mod.is_latent_spec(cfg.data):
        return None
    if os.path.isdir(os.path.join(cfg.data, "train")) or os.path.isdir(cfg.data):
        try:
            from train.data.folder import ImageFolder

            root = os.path.join(cfg.data, "train") if os.path.isdir(os.path.join(cfg.data, "train")) else cfg.data
            return ImageFolder(root).class_names
        except (FileNotFoundError, ValueError):
            return None
    return None


CAUGHT_UP = 0.05  # the EMA is used once the initialisation's share in it is below this (step > 3 / (1 - decay))


def init_share(decay: float, step: int, warmup: bool = False) -> float:
    """What is left of the random initialisation in the EMA after `step` updates."""
    if warmup:
        from train.optim import ema_decay_at

        return math.prod(ema_decay_at(decay, s) for s in range(1, step + 1))
    return decay ** step


def choose_ema(has_ema: bool, decay: float, step: int, ema: bool | None, warmup: bool = False) -> bool:
    """ema None = auto. Warns when the EMA has not caught up with training (whichever is used)."""
    import warnings

    if not has_ema:
        if ema:
            warnings.warn("the checkpoint has no EMA weights (the run had ema = false): using the raw weights")
        return False
    share = init_share(decay, step, warmup)
    if share < CAUGHT_UP or ema is False:
        return bool(ema is not False)
    caught = f"step {step}: {share:.0%} of the EMA (decay {decay}) is still the random initialisation"
    if ema:
        warnings.warn(f"--ema at {caught}; its samples will be mostly noise")
        return True
    warnings.warn(f"using the raw weights: at {caught} (--ema to use it anyway)")
    return False


def load_model(path: str, ema: bool | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode, cfg, used_ema, step) rebuilt from a `kfe train dit` checkpoint (ema: None =
    auto, see choose_ema)."""
    from train import checkpoint as ckpt_mod
    from train import config as config_mod
    from train.recipes import dit
    from train.run import _checkpoint_path

    ckpt = ckpt_mod.load(_checkpoint_path(path))
    if ckpt["recipe"] != "dit":
        raise ValueError(f"{path} is a {ckpt['recipe']!r} checkpoint, not a dit one")
    cfg = config_mod.from_dict(dit.DiTConfig, ckpt["config"])
    used_ema = choose_ema(ckpt.get("ema") is not None, cfg.ema_decay, ckpt["step"], ema, cfg.ema_warmup)
    sd = ckpt_mod.clean_state_dict(ckpt["ema"] if used_ema else ckpt["model"])
    w = sd["x_embedder.proj.weight"]                             # (hidden, C, p, p)
    channels, patch = w.shape[1], w.shape[2]
    size = math.isqrt(sd["pos_embed"].shape[1]) * patch            # pos_embed (1, (size / p)^2, hidden)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]      # classes (+ 1 null class)
    model = dit.build_model(cfg, channels, size, rows - int(cfg.class_dropout > 0))
    model.load_state_dict(sd)
    return model.to(device).eval(), cfg, used_ema, ckpt["step"]


def guided(model, y: torch.Tensor, scale: float):
    """model_fn(x, t) for the sampler: conditional, or classifier-free guided with the null class."""
    if scale == 1.0:
        return lambda x, t: model(x, t, y)
    if model.y_embedder.dropout_prob <= 0:
        raise ValueError("--cfg-scale != 1 needs a model trained with class dropout (it has no null class)")
    null = torch.full_like(y, model.num_classes)

    def fn(x, t):
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), scale,
                                     cfg_channels=model.in_channels)
        return out[: len(x)]  # (B, out_channels, H, W): guided eps, the conditional variance
    return fn


def grid(images: np.ndarray, rows: int, upscale: int = 1) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows (H + GAP) + GAP, cols (W + GAP) + GAP, 3) image, times upscale."""
    n, h, w, _ = images.shape
    cols = math.ceil(n / rows)
    out = np.zeros((rows * (h + GAP) + GAP, cols * (w + GAP) + GAP, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[GAP + r * (h + GAP): GAP + r * (h + GAP) + h, GAP + c * (w + GAP): GAP + c * (w + GAP) + w] = img
    return out.repeat(upscale, 0).repeat(upscale, 1) if upscale > 1 else out


def _to_uint8(x: torch.Tensor, pixels: bool) -> np.ndarray:
    """(N, C, H, W) samples -> (N, H, W, 3) uint8: pixels from [-1, 1]; latents' first 3 channels min-max."""
    x = x.float().cpu()
    if pixels:
        x = (x.clamp(-1, 1) + 1) * 127.5
    else:
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8) * 255
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def default_out(ckpt: str) -> str:
    """`<run dir>/samples.png`: beside the checkpoint, not in the working directory."""
    return os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt)), "samples.png")


def sample(ckpt: str, out: str | None, steps: int = 250, sampler: str = "ddpm", cfg_scale: float = 4.0,
           classes: str | None = None, per_class: int = 4, seed: int = 0, eta: float = 0.0, ema: bool | None = None,
           device: str = "auto", upscale: int = 1, progress: bool = True, vae: str | None = None) -> dict:
    """Draw per_class samples of each class; write the grid PNG and its caption file. Returns a summary."""
    from PIL import Image

    from train.data import latents as latents_mod
    from train.recipes import dit

    if per_class < 1 or upscale < 1:
        raise ValueError("--per-class and --upscale must be >= 1")
    out = out or default_out(ckpt)
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, used_ema, step = load_model(ckpt, ema, dev)
    names = _class_names(cfg)
    ids = _class_ids(classes, names, model.num_classes)
    y = torch.tensor([k for k in ids for _ in range(per_class)], device=dev)   # row-major: one row per class
    diffusion = dit.diffusion(cfg).respaced(steps)
    # latents: a latent data spec, or (when the data is gone) anything but 3 channels
    pixels = model.in_channels == 3 and not latents_mod.is_latent_spec(cfg.data)
    gen = torch.Generator(device=dev).manual_seed(seed)
    size = model.x_embedder.img_size
    noise = torch.randn(len(y), model.in_channels, size, size, generator=gen, device=dev)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=f"sampling {sampler}", file=sys.stderr)
    x = diffusion.sample(guided(model, y, cfg_scale), noise, sampler, eta=eta, clip=pixels, generator=gen,
                         progress=(lambda i: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    stem = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    scale = 1.0 if pixels else cfg.latent_scale
    if not pixels:
        np.save(stem + ".npy", (x / scale).cpu().numpy())
    if vae is not None:
        if pixels:
            raise ValueError("--vae decodes latents; this checkpoint was trained on pixels")
        from train.latents import decode, load_vae

        x, pixels = decode(load_vae(vae, dev), x / scale), True
    image = grid(_to_uint8(x, pixels), len(ids), upscale)
    Image.fromarray(image).save(out)
    labels = [names[k] if names and k < len(names) else str(k) for k in ids]
    with open(stem + ".txt", "w") as f:
        f.write(f"{out}: {len(ids)} rows x {per_class} samples | checkpoint {ckpt} step {step} "
                f"({'EMA' if used_ema else 'raw'} weights) | {sampler} {steps} steps"
                f"{f' eta {eta}' if sampler == 'ddim' else ''} | cfg scale {cfg_scale} | seed {seed}\n")
        f.writelines(f"row {r}: class {k} ({lab})\n" for r, (k, lab) in enumerate(zip(ids, labels)))
    return {"out": out, "shape": image.shape, "classes": ids, "labels": labels, "ema": used_ema, "step": step,
            "samples": x.cpu()}


def sample_command(args: argparse.Namespace) -> int:
    try:
        res = sample(args.ckpt, args.out, args.steps, args.sampler, args.cfg_scale, args.classes, args.per_class,
                     args.seed, args.eta, args.ema, args.device, args.upscale, not args.quiet, args.vae)
    except (ValueError, FileNotFoundError) as err:
        print(f"kfe sample dit: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {res['out']} ({res['shape'][1]}x{res['shape'][0]} px; rows: {', '.join(res['labels'])}; "
          f"{'EMA' if res['ema'] else 'raw'} weights of step {res['step']}) and {os.path.splitext(res['out'])[0]}.txt")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw images from a trained DiT (kfe sample dit --ckpt RUN --out grid.png)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", choices=["dit"], help="the recipe whose checkpoint samples")
    p.add_argument("--ckpt", required=True, help="a run directory (newest checkpoint) or a ckpt-*.pt file")
    p.add_argument("--out", help="grid PNG (default: <run dir>/samples.png); a caption file <stem>.txt is written "
                                 "beside it")
    p.add_argument("--steps", type=int, default=250, help="sampling steps (respaced; DiT uses 250)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (1 = none; DiT: 1.5 FID, 4 visuals)")
    p.add_argument("--classes", help="comma-separated class indices or names (default: the first 16 classes)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (grid columns)")
    p.add_argument("--seed", type=int, default=0)
    w = p.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="ema", action="store_true", default=None,
                   help="use the EMA weights even before the EMA has caught up (default: auto, see above)")
    w.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights")
    p.add_argument("--vae", metavar="DIR", help="decode latent samples with this diffusers AutoencoderKL "
                                                "(sd-vae-ft-* layout) into a pixel grid")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--upscale", type=int, default=1, help="nearest-neighbour enlargement of the grid")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=sample_command)
