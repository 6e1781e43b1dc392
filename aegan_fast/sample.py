"""Sample images from a trained run: ``python -m aegan_fast.sample --ckpt RUN_DIR --out grid.png``.

z ~ U(-1, 1) → G_E → F → φ, in eval mode, with the EMA weights when the run kept them. ``--out``
ending in ``/`` (or naming an existing folder) writes one PNG per image instead of a grid.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import load_sampling_nets
from .data import to_uint8
from .errors import UserError, cli
from .models import generate, sample_z
from .train import pick_device
from .viz import save_grid, save_png


@torch.no_grad()
def sample_images(nets, n: int, seed: int, z_dim: int, device, batch: int = 64, denoise: bool = True,
                  progress: bool = False) -> torch.Tensor:
    """n images in [-1, 1] (N×3×R×R, on the CPU) for a given seed, generated in batches."""
    z = sample_z(n, z_dim, torch.Generator().manual_seed(seed), device)
    chunks = range(0, n, batch)
    return torch.cat([generate(nets, z[i:i + batch], denoise).cpu()
                      for i in tqdm(chunks, desc="sampling", unit="batch", disable=not progress or len(chunks) < 2)])


@cli
def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="aegan-sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run directory (its latest checkpoint) or a checkpoint file")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="grid.png, or DIR/ for one PNG per image")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    p.add_argument("--no-denoise", action="store_true", help="skip φ: show F(G_E(z)) as the denoiser sees it")
    args = p.parse_args(argv)
    if args.n < 1:
        raise UserError("--n must be ≥ 1")
    if args.batch < 1:
        raise UserError("--batch must be ≥ 1")
    out = Path(args.out)
    as_folder = args.out.endswith(("/", "\\")) or out.is_dir()
    if not as_folder and out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: give a .png file for a grid, or a folder ending in / for one PNG per image")

    device = pick_device(args.device)
    cfg, nets = load_sampling_nets(args.ckpt, device, use_ema=not args.no_ema)
    images = sample_images(nets, args.n, args.seed, cfg.model.z_dim, device, args.batch,
                           denoise=not args.no_denoise, progress=True)
    if as_folder:
        out.mkdir(parents=True, exist_ok=True)
        pixels = to_uint8(images)
        for i, img in enumerate(pixels):
            save_png(img, out / f"seed{args.seed}-{i:05d}.png")
        print(f"wrote {args.n} images to {out}/")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, out)
        print(f"wrote a grid of {args.n} images to {out}")


if __name__ == "__main__":
    main()
