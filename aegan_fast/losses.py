"""Adversarial losses on raw logits: vanilla (BCE, the paper's), hinge and least squares.
Always computed in fp32, whatever the logits' dtype (bf16/fp16 steps keep their losses in fp32)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



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


def r1_penalty(D: nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D's logits on real, R1 = the batch mean of ‖∇ₓ Σ D(x)‖² at the real inputs), as in
    StyleGAN2 (Mescheder et al. 2018) but every step, not lazily. The penalty's backward is a
    double backward through D. D's forward runs on the fused kernels; their backward, asked here for
    a graph, takes its differentiable form (ops/library.py, ``_differentiable_grads``). D runs
    eagerly: ``D.forward`` bypasses a compiled ``__call__``, whose graph has no double backward. D's
    BatchNorm normalises real images by their batch's statistics, so each sample's gradient also
    reaches the others: the penalty smooths D around the real batch, not around each image alone."""
    real = real.detach().requires_grad_(True)
    logits = D.forward(real)
    (grad,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
    return logits, grad.float().square().flatten(1).sum(1).mean()
