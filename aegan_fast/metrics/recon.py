"""Autoencoder reconstruction quality: L1 and PSNR between images and their reconstructions."""
from __future__ import annotations

import math

import torch

from ._common import check_images


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = check_images(x, "images"), check_images(y, "reconstructions")
    if x.shape != y.shape:
        raise ValueError(f"images {tuple(x.shape)} and reconstructions {tuple(y.shape)} differ in shape")
    return x.double(), y.double().to(x.device)


@torch.no_grad()
def recon_l1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean absolute error over all pixels and channels, in the ``[-1, 1]`` units of the images."""
    x, y = _pair(x, y)
    return float((x - y).abs().mean())


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0, reduction: str = "mean"):
    """PSNR in dB, per image pair, ``10 log10(data_range^2 / MSE)``; ``data_range`` = 2 for ``[-1, 1]``.

    An identical pair has MSE 0 and PSNR ``inf`` (returned as ``math.inf``, no division warning);
    ``reduction="mean"`` averages the per-image values (so it is ``inf`` only if some pair is
    identical), ``"none"`` returns the per-pair float64 tensor.
    """
    x, y = _pair(x, y)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    out = torch.full_like(mse, math.inf)
    nz = mse > 0
    out[nz] = 10.0 * torch.log10(data_range ** 2 / mse[nz])
    if reduction == "none":
        return out
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
    return float(out.mean())
