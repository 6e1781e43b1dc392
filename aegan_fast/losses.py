"""Adversarial losses on raw logits: vanilla (BCE, the paper's), hinge and least squares.
Always computed in fp32, whatever the logits' dtype (bf16/fp16 steps keep their losses in fp32)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: push real up, fake down."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "bce":  # softplus(-r) = BCE(σ(r), 1); softplus(f) = BCE(σ(f), 0)
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "lsgan":
        return 0.5 * ((real_logits - 1) ** 2).mean() + 0.5 * (fake_logits ** 2).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}")


def g_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss (non-saturating for BCE)."""
    fake_logits = fake_logits.float()
    if kind == "bce":
        return F.softplus(-fake_logits).mean()
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "lsgan":
        return 0.5 * ((fake_logits - 1) ** 2).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}")
