"""Input checks and conversions shared by the metrics.

Every metric takes images as float tensors ``N x 3 x H x W`` in ``[-1, 1]`` (the generator's tanh
range). Passing ``[0, 1]`` or ``[0, 255]`` images by mistake would silently change SSIM's luminance
term and the feature networks' inputs, so values outside ``[-1, 1]`` (beyond a small tolerance) are
refused rather than guessed at.
"""
from __future__ import annotations

import torch

RANGE_TOL = 1e-3


def check_images(x: torch.Tensor, name: str = "images", *, min_size: int = 1) -> torch.Tensor:
    """Validate an ``N x 3 x H x W`` float batch in ``[-1, 1]`` and return it detached."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected shape N x 3 x H x W, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [-1, 1], got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    if min(x.shape[2], x.shape[3]) < min_size:
        raise ValueError(f"{name}: images are {x.shape[2]}x{x.shape[3]}, this metric needs at least "
                         f"{min_size}x{min_size}")
    x = x.detach()
    lo, hi = float(x.min()), float(x.max())
    if not (lo == lo and hi == hi) or lo in (float("inf"), float("-inf")) or hi in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: contains NaN or inf")
    if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
        raise ValueError(f"{name}: values span [{lo:.3g}, {hi:.3g}]; metrics expect [-1, 1] "
                         f"(the generator's range); convert with x * 2 - 1 from [0, 1]")
    return x


def to_255(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 255] float (no rounding)."""
    return (x.float() + 1.0) * 127.5


def resolve_device(device, fallback: torch.Tensor) -> torch.device:
    return torch.device(device) if device is not None else fallback.device
