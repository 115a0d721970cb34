"""`kfe latents encode`: images -> VAE latent shards that `kfe train dit` reads, and the decoder for samples.

    kfe latents encode --vae sd-vae-ft-ema/ --data /data/imagenet --out latents/ --resolution 256

The VAE is a diffusers `AutoencoderKL` loaded from a local directory in the layout of stabilityai's
sd-vae-ft-mse / sd-vae-ft-ema (config.json + diffusion_pytorch_model.safetensors); nothing is
downloaded. Images get the evaluation transform (resize + centre crop to --resolution), are scaled to
[-1, 1] and encoded; each shard `<out>/<00000>.npz` holds the raw latents (a sample of the posterior, as
DiT's extract_features.py stores them), the labels and `latent_scale`: the VAE's `scaling_factor`
(0.18215 for SD-VAE), which `kfe train dit` multiplies by, so the scale cannot be forgotten. Shards are
written to a temporary name and renamed; a re-run skips the shards already written.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

SHARD_FMT = "{:05d}.npz"


def load_vae(path: str, device: torch.device | str = "cpu"):
    """diffusers AutoencoderKL from a local directory (no network), in eval mode."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--vae {path!r}: not a diffusers AutoencoderKL directory (no config.json; expected the "
                         "sd-vae-ft-* layout: config.json + diffusion_pytorch_model.safetensors)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError("--vae needs diffusers: pip install 'kfe[vae]' (or pip install diffusers)") from None

    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--vae {path!r}: cannot load an AutoencoderKL: {str(err).splitlines()[0]}") from None
    return vae.to(device).eval()


def scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents (already divided by latent_scale) -> images in [-1, 1]."""
    return vae.decode(latents.to(next(vae.parameters()).device, torch.float32)).sample.clamp(-1, 1)


@torch.no_grad()
def encode(vae_dir: str, data: str, out: str, resolution: int = 256, batch: int = 32, shard_size: int = 1024,
           seed: int = 0, device: str = "auto", progress: bool = True, limit: int = 0) -> dict:
    """Encode the training split of `data` (shapes or an ImageFolder; its first `limit` images when > 0)
    into latent shards in `out`."""
    from train.data import DataError, eval_batches, normalize, open_split

    if resolution % 8 or batch < 1 or shard_size < 1:
        raise ValueError("--resolution must be a multiple of 8, --batch and --shard-size >= 1")
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(vae_dir, dev)
    split = open_split(data, "train", resolution=resolution, fields=("image", "label"), augment="none", seed=seed)
    if split is None or split.size is None:
        raise DataError(f"--data {data!r}: kfe latents encode reads shapes or an ImageFolder (a finite split)")
    os.makedirs(out, exist_ok=True)
    scale, n, done = scaling_factor(vae), min(split.size, limit) if limit > 0 else split.size, 0
    shards = -(-n // shard_size)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="img", desc="encode", file=sys.stderr)
    gen = torch.Generator(device=dev).manual_seed(seed)
    for s in range(shards):
        path = os.path.join(out, SHARD_FMT.format(s))
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        if os.path.exists(path):  # written by an earlier run (atomically: it is whole)
            done += hi - lo
            bar and bar.update(hi - lo)
            continue
        lat, lab = [], []
        for b in eval_batches(_Range(split.dataset, lo, hi), batch, 0, 1):
            x = normalize(b["image"], dev, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
            post = vae.encode(x).latent_dist
            lat.append((post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=dev)).cpu())
            lab.append(b["label"])
            bar and bar.update(len(x))
        tmp = f"{path}.tmp{os.getpid()}.npz"
        try:
            np.savez(tmp, latents=torch.cat(lat).numpy().astype(np.float32), labels=torch.cat(lab).numpy(),
                     latent_scale=np.float64(scale))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        done += hi - lo
    if bar:
        bar.close()
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    return {"out": out, "images": done, "shards": shards, "latent_scale": scale,
            "shape": (vae.config.latent_channels, side, side)}


class _Range(torch.utils.data.Dataset):
    """Samples lo..hi-1 of a Transformed dataset, keyed (epoch, i) as eval_batches' sampler keys them."""

    def __init__(self, dataset, lo: int, hi: int):
        self.dataset, self.lo, self.hi = dataset, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, key):
        return self.dataset[(0, self.lo + key[1])]


def encode_command(args: argparse.Namespace) -> int:
    from train.data import DataError

    try:
        res = encode(args.vae, args.data, args.out, args.resolution, args.batch, args.shard_size, args.seed,
                     args.device, not args.quiet, args.limit)
    except (ValueError, DataError) as err:
        print(f"kfe latents encode: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from train.cli_train import os_error

        print(f"kfe latents encode: error: {os_error(err)}", file=sys.stderr)
        return 1
    print(f"wrote {res['images']} latents {res['shape']} in {res['shards']} shard(s) to {res['out']} "
          f"(latent_scale {res['latent_scale']}; train with: kfe train dit --data {res['out']})")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latents", help="encode images into VAE latent shards for kfe train dit",
                       description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="latents_action", metavar="action")
    p.set_defaults(func=lambda _: (p.print_help(), 2)[1])
    e = actions.add_parser("encode", help="images -> latent shards (.npz with latents, labels, latent_scale)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--vae", required=True, metavar="DIR", help="local diffusers AutoencoderKL (sd-vae-ft-* layout)")
    e.add_argument("--data", required=True, help="shapes or an ImageFolder (its train/ split when present)")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder of shards")
    e.add_argument("--resolution", type=int, default=256, help="image side (DiT: 256 -> 32x32 latents)")
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--shard-size", type=int, default=1024, help="latents per shard")
    e.add_argument("--seed", type=int, default=0, help="posterior sampling noise")
    e.add_argument("--limit", type=int, default=0, help="encode only the first N images (0 = all; shapes has 100000)")
    e.add_argument("--device", default="auto")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=encode_command)
