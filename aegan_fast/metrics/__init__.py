"""Sample-quality metrics that run offline.

Images everywhere in this package are float tensors ``N x 3 x H x W`` with values in ``[-1, 1]``
(the generator's tanh range); other ranges are refused with a ValueError.

=====================  ===========================================================  =========
metric                 what                                                         better
=====================  ===========================================================  =========
``swd``                PGGAN's sliced Wasserstein distance on Laplacian-pyramid      lower
                       7x7 patches, x1e3, per level (``swd_64`` ...) and average
``msssim``             PGGAN's MS-SSIM diversity: mean MS-SSIM of random pairs of    closer to
                       the fake set (``msssim_real``: the same on the real set)      real's
``fid_efflite``        Fréchet distance on EfficientNet-Lite0 features (NOT          lower
                       Inception FID; compare within this project only)
``kid_efflite``        KID (unbiased cubic MMD^2, subsets) on the same features      lower
``fid_inception``,     the standard metrics from the user's pt_inception weights     lower
``kid_inception``      via torch-fidelity (optional extra)
``l1``, ``psnr``       reconstruction error, ``fake[i]`` is the reconstruction of    lower /
                       ``real[i]``                                                   higher
=====================  ===========================================================  =========
"""
from __future__ import annotations

import os

import torch

from ..errors import UserError
from .fid import (EffLiteFeatures, efflite_features, fid_efflite, fid_from_features, feature_statistics,
                  frechet_distance, inception_fid_kid, kid_efflite, kid_from_features,
                  polynomial_mmd2_unbiased, torch_fidelity_available)
from .msssim import msssim, msssim_diversity
from .recon import psnr, recon_l1
from .swd import laplacian_pyramid, swd

METRICS = ("swd", "msssim", "msssim_real", "fid_efflite", "kid_efflite", "fid_inception", "kid_inception",
           "l1", "psnr")
DEFAULT_METRICS = ("swd", "msssim", "fid_efflite", "kid_efflite")

__all__ = ["METRICS", "DEFAULT_METRICS", "evaluate", "swd", "laplacian_pyramid", "msssim", "msssim_diversity",
           "fid_efflite", "kid_efflite", "efflite_features", "EffLiteFeatures", "feature_statistics",
           "frechet_distance", "fid_from_features", "kid_from_features", "polynomial_mmd2_unbiased",
           "inception_fid_kid", "torch_fidelity_available", "psnr", "recon_l1"]


def parse_metrics(spec) -> list[str]:
    """'swd,fid_efflite' or an iterable -> validated list (UserError on an unknown name)."""
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def evaluate(real: torch.Tensor, fake: torch.Tensor, metrics=DEFAULT_METRICS, *, seed: int = 0,
             inception_weights: str | os.PathLike | None = None, device=None, batch_size: int = 64,
             kid_subset_size: int = 1000, kid_subsets: int = 100) -> dict[str, float]:
    """Compute the named metrics between a real and a fake set; returns a flat ``{name: float}`` dict.

    Args:
        real, fake: ``N x 3 x H x W`` float tensors in ``[-1, 1]``. ``swd`` needs equal shapes; ``l1``
            and ``psnr`` treat ``fake[i]`` as the reconstruction of ``real[i]``.
        metrics: names from ``METRICS`` (list or comma-separated string).
        inception_weights: path of a pt_inception-2015-12-05 file, needed by ``fid_inception`` /
            ``kid_inception`` (UserError without it).

    Keys: ``swd`` adds ``swd_<res>`` per level and ``swd``; ``kid_*`` add ``kid_*_std``; the others
    add their own name. EfficientNet features and the Inception pass are computed once when both
    the FID and KID of a family are asked for.
    """
    names = parse_metrics(metrics)
    out: dict[str, float] = {}
    if "swd" in names:
        out.update(swd(real, fake, seed=seed))
    if "msssim" in names:
        out["msssim"] = msssim_diversity(fake, seed=seed)
    if "msssim_real" in names:
        out["msssim_real"] = msssim_diversity(real, seed=seed)
    if "fid_efflite" in names or "kid_efflite" in names:
        fr = efflite_features(real, batch_size=batch_size, device=device)
        ff = efflite_features(fake, batch_size=batch_size, device=device)
        if "fid_efflite" in names:
            out["fid_efflite"] = fid_from_features(fr, ff)
        if "kid_efflite" in names:
            out["kid_efflite"], out["kid_efflite_std"] = kid_from_features(
                fr, ff, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    if "fid_inception" in names or "kid_inception" in names:
        if inception_weights is None:
            raise UserError("fid_inception/kid_inception need an Inception weights file "
                            "(pt_inception-2015-12-05 format): pass --inception-weights PATH")
        res = inception_fid_kid(real, fake, inception_weights, kid_subsets=kid_subsets,
                                kid_subset_size=kid_subset_size, batch_size=batch_size, device=device, seed=seed)
        if "fid_inception" in names:
            out["fid_inception"] = res["fid_inception"]
        if "kid_inception" in names:
            out["kid_inception"], out["kid_inception_std"] = res["kid_inception"], res["kid_inception_std"]
    if "l1" in names:
        out["l1"] = recon_l1(real, fake)
    if "psnr" in names:
        out["psnr"] = psnr(real, fake)
    return out
