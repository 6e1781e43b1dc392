"""Scoring a run's nets: the metrics of aegan_fast.metrics on its sampling chain and autoencoder.

Library code shared by the trainer (stage-end evaluation), the eval CLI and the experiments.
"""
from __future__ import annotations

import torch

from .data import ImageSet
from .metrics import evaluate, parse_metrics
from .models import SamplingChain

RECONSTRUCTION = ("l1", "psnr")


def scoring_reference(data: ImageSet, trained_on: bool) -> tuple[ImageSet, str]:
    """(real images to score against, what they are): data's held-out split, else all of data, which
    for the run's own data (``trained_on``) means training images, warned about."""
    if not data.holdout and not trained_on:
        return data, f"real images of {data.origin} (another data set, none held out)"
    what = (f"held-out real images of {data.origin}" if data.holdout else
            f"real images of {data.origin} (no held-out split: the run trained on them)")
    return data.reference(), what


@torch.no_grad()
def reconstruct(nets, real: torch.Tensor, device, batch: int = 64) -> torch.Tensor:
    return torch.cat([nets["F"](nets["H"](real[i:i + batch].to(device))).cpu() for i in range(0, len(real), batch)])


def evaluate_run(nets, reference: ImageSet, metrics, n: int, seed: int, device,
                 inception_weights=None, truncation: float = 1.0) -> dict[str, float]:
    """The named metrics for nets (eval mode; a mapping with H, F, G_E, phi) against n real images
    spread through ``reference`` (``ImageSet.reference()``: the held-out images, never trained on):
    generated images from their SamplingChain (z truncated by ψ = ``truncation``, models.truncate),
    reconstructions from F(H(x))."""
    names = parse_metrics(metrics)
    n = min(n, len(reference))
    real = reference.spread(n, "cpu")
    results: dict[str, float] = {}
    generative = [m for m in names if m not in RECONSTRUCTION]
    if generative:
        fake = SamplingChain.of(nets).sample(n, seed, truncation=truncation)
        results.update(evaluate(real, fake, generative, seed=seed, inception_weights=inception_weights,
                                device=device, kid_subset_size=min(1000, n)))
    recon = [m for m in names if m in RECONSTRUCTION]
    if recon:
        results.update(evaluate(real, reconstruct(nets, real, device), recon))
    return results
