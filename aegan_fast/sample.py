"""Sample images from a trained run: ``python -m aegan_fast.sample --ckpt RUN_DIR --out grid.png``.

z ~ U(-1, 1) → G_E → F → φ, in eval mode, with the EMA weights when the run kept them. ``--out``
ending in ``/`` (or naming an existing folder) writes one PNG per image instead of a grid.
``--seeds 0-63`` (lists and ranges: ``3,7,100-110``) samples one image per seed, the same image for
a seed on every backend, at any batch size and in any order of the list; ``--labels`` writes each
seed into its grid cell, and a folder gets ``seedNNNNNN.png`` per seed. ``--truncation 0.7`` pulls
every z toward the mean (``models.truncate``): more typical images, less variety.
``--ckpt`` also takes an exported ``.onnx``, an OpenVINO ``.xml`` or a TensorRT ``.plan``; every
backend runs through ``aegan_fast.sampling.Sampler``, by default the fastest that runs here
(``--backend auto``, which logs its choice).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .checkpoint import resolve_checkpoint
from .errors import UserError, cli
from .model_cli import check_image_out, write_images
from .models import check_truncation
from .precision import PRECISIONS
from .sampling import BACKENDS, Sampler, parse_seeds, path_kind


@cli
def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="aegan-sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True,
                   help="run directory (its latest checkpoint), a checkpoint file, an exported .onnx, an OpenVINO "
                        ".xml or a TensorRT .plan")
    p.add_argument("--n", type=int, help="number of images, drawn from one --seed (default 64)")
    p.add_argument("--seed", type=int, help="the seed the --n images are drawn from (default 0)")
    p.add_argument("--seeds", help="one image per seed instead: a list with ranges, e.g. 0-63 or 3,7,100-110")
    p.add_argument("--labels", action="store_true", help="write each image's seed into its grid cell")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI",
                   help="pull z toward its mean by PSI in [0, 1]: lower is more typical and less varied "
                        "(default 1: none; a seed keeps its image's identity)")
    p.add_argument("--out", required=True, help="grid.png, or DIR/ for one PNG per image")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default: the file's runtime, or for a checkpoint the fastest that runs here), torch "
                        "(eager), compile (torch.compile), onnxruntime (exports a checkpoint on the fly), openvino "
                        "(CPU; exports a checkpoint once, beside it), tensorrt")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="what the backend computes in, in training's words: auto (bf16 for openvino where the CPU "
                        "has it, an exported file's own, else fp32) or fp32/bf16/fp16 where the backend runs it")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    p.add_argument("--no-denoise", action="store_true", help="skip φ: show F(G_E(z)) as the denoiser sees it")
    args = p.parse_args(argv)
    seeds = None
    if args.seeds is not None:
        if args.n is not None or args.seed is not None:
            raise UserError("--seeds names every image; drop --n and --seed")
        seeds = parse_seeds(args.seeds)
    n, seed = (64 if args.n is None else args.n, args.seed or 0) if seeds is None else (len(seeds), None)
    if n < 1:
        raise UserError("--n must be ≥ 1")
    if args.batch < 1:
        raise UserError("--batch must be ≥ 1")
    check_truncation(args.truncation)
    out, as_folder = check_image_out(args.out)
    if path_kind(Path(args.ckpt)) == "checkpoint":
        resolve_checkpoint(args.ckpt)  # a clear error for a missing run before any backend loads
    elif args.no_ema:
        raise UserError("--no-ema applies to checkpoints; an exported model has its weights baked in")

    sampler = Sampler.load(args.ckpt, backend=args.backend, device=args.device, use_ema=not args.no_ema,
                           denoise=not args.no_denoise, precision=args.precision)
    if seeds is None:
        images = sampler.sample(n, seed, args.batch, progress=True, truncation=args.truncation)
        names = [f"seed{seed}-{i:05d}" for i in range(n)]
        labels = [f"{seed}:{i}" for i in range(n)]
    else:
        images = sampler.sample(batch=args.batch, progress=True, seeds=seeds, truncation=args.truncation)
        names = [f"seed{s:06d}" for s in seeds]
        labels = [str(s) for s in seeds]
    print(write_images(images, out, as_folder, names, labels if args.labels else None))


if __name__ == "__main__":
    main()
