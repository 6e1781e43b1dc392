"""Run directories and checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
its final name, and only then does the ``latest`` pointer (itself replaced atomically) name it: a
crash at any moment leaves the previous checkpoint intact and ``latest`` pointing at a whole file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import UserError
from .models import build_nets

LATEST = "latest"
PERIODIC = "ckpt-"  # periodic checkpoints, pruned to the newest few; stage-end ones are kept


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temp file beside path, fsync it, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(run_dir: Path, name: str, state: dict, keep_periodic: int = 3) -> Path:
    """Write a checkpoint, point `latest` at it, then drop all but the newest ``keep_periodic``
    periodic (``ckpt-*``) checkpoints: a long run at R=512 would otherwise fill the disk."""
    folder = run_dir / "checkpoints"
    path = folder / name
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    atomic_write_bytes(folder / LATEST, lambda f: f.write(name.encode() + b"\n"))
    periodic = sorted(folder.glob(f"{PERIODIC}*.pt"))  # names carry a zero-padded image count
    for old in periodic[:max(0, len(periodic) - keep_periodic)]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.exists() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint file."""
    p = Path(path).expanduser()
    if p.is_dir():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise UserError(f"{p} holds no checkpoint (no checkpoints/{LATEST} pointer)")
        return ckpt
    if p.is_file():
        return p
    raise UserError(f"no run directory or checkpoint at {p}")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    ckpt = resolve_checkpoint(path)
    try:
        # weights_only: a checkpoint is plain tensors, numbers and strings; never unpickle code.
        return torch.load(ckpt, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {ckpt}: {type(e).__name__}: {e}") from None


def load_sampling_nets(path: str | Path, device="cpu", use_ema: bool = True):
    """(config, nets in eval mode) from a run directory or checkpoint file, EMA weights when present."""
    state = load_checkpoint(path, map_location=device)
    cfg = TrainConfig.from_dict(state["config"])
    nets = build_nets(cfg.model).to(device)
    nets.load_state_dict(state["nets"])
    if use_ema and state.get("ema"):
        for name, sd in state["ema"].items():
            nets[name].load_state_dict(sd)
    return cfg, nets.eval()
