"""What every trained-model CLI shares (interpolate, encode, decode, reconstruct, project): the flags
that name and load the model, and reading and writing the small files they exchange. Each CLI stays a
thin layer over ``trained.TrainedModel``."""
from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import resolve_checkpoint
from .errors import UserError
from .files import atomic_write_bytes
from .precision import PRECISIONS
from .sampling import BACKENDS


FITS = ("crop", "pad")


def parser(prog: str, doc: str, *, sampler: bool = False, images: bool = False) -> argparse.ArgumentParser:
    """An argument parser with --ckpt, --device and --no-ema (the Sampler's --backend and --precision
    where the CLI samples z; the image arguments and --fit where it reads real images)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run directory (its sampling default) or a checkpoint file")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    if images:
        p.add_argument("images", nargs="+", help="image files or folders of them")
        p.add_argument("--fit", choices=FITS, default="crop",
                       help="make a non-square image square by a centre crop (default, as training) or by padding")
    if sampler:
        p.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="the Sampler that renders z (default auto: the fastest that runs here)")
        p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the Sampler's precision")
    return p


def load_model(args):
    """The TrainedModel the flags name; a missing run or a file that is no checkpoint is a UserError."""
    from .export import path_kind
    from .trained import TrainedModel
    if path_kind(Path(args.ckpt)) != "checkpoint":
        raise UserError(f"--ckpt {args.ckpt}: this needs a run directory or a training checkpoint; an exported "
                        f"model holds only the sampling chain (no encoder H, no embedding)")
    resolve_checkpoint(args.ckpt)
    return TrainedModel(args.ckpt, args.device, use_ema=not args.no_ema,
                        backend=getattr(args, "backend", "auto"), precision=getattr(args, "precision", "auto"))


def read_user_images(model, paths, fit: str):
    """``data.read_images`` at the model's resolution; one stderr line per file that could not be used,
    a UserError when none could. ``check_failures`` afterwards turns the failures into exit 2."""
    from .data import read_images
    read = read_images(paths, model.resolution, fit)
    for name, why in read.failed:
        print(f"error: {name}: {why}", file=sys.stderr)
    if not read.names:
        raise UserError("none of the images could be used")
    return read


def check_failures(read) -> None:
    """After the usable images were processed and written: exit 2 if any file could not be used."""
    if read.failed:
        raise UserError(f"{len(read.failed)} of {len(read.failed) + len(read.names)} files could not be used (above)")


def output(out: str, suffix: str) -> Path:
    """``--out`` as a Path, a UserError unless it ends in ``suffix``: checked before any work."""
    path = Path(out)
    if path.suffix.lower() != suffix:
        raise UserError(f"--out {out}: give a {suffix} file")
    return path


def write_npz(path: Path, **arrays) -> None:
    """An .npz written whole or not at all."""
    if path.suffix != ".npz":
        raise UserError(f"--out {path}: give a .npz file")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """An .npz of encode or project; anything else is a UserError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"no file at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise UserError(f"{path} is not an .npz written by encode or project ({type(e).__name__})") from None


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def check_image_out(out: str) -> tuple[Path, bool]:
    """(path, as a folder): ``--out grid.png``, or ``DIR/`` (or an existing folder) for one PNG per image."""
    path = Path(out)
    as_folder = out.endswith(("/", "\\")) or path.is_dir()
    if not as_folder and path.suffix.lower() != ".png":
        raise UserError(f"--out {out}: give a .png file for a grid, or a folder ending in / for one PNG per image")
    return path, as_folder


def write_images(images: torch.Tensor, out: Path, as_folder: bool, names: list[str],
                 labels: list[str] | None = None, nrow: int | None = None) -> str:
    """A grid PNG (``labels`` in its cells), or one ``<name>.png`` per image in the folder; says what it wrote."""
    from .data import to_uint8
    from .viz import save_grid, save_png
    if as_folder:
        out.mkdir(parents=True, exist_ok=True)
        for name, img in zip(names, to_uint8(images)):
            save_png(img, out / f"{name}.png")
        return f"wrote {len(images)} images to {out}/"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out, nrow=nrow, labels=labels)
    return f"wrote a grid of {len(images)} images to {out}"
