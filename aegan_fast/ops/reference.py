"""Plain-PyTorch definitions of the fused ops: the meaning of "correct" and the fallback backend.

Every fast kernel is tested against these functions. Running statistics are updated in place by
``F.batch_norm`` itself, so the reference matches ``nn.BatchNorm2d`` by construction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import activations


def activate(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    return activations.get(activation).fn(y, negative_slope)


def bn_act(x, running_mean, running_var, weight, bias, training: bool, momentum: float, eps: float,
           activation: str = "relu", negative_slope: float = 0.01):
    """act(BatchNorm2d(x)). With training=True batch statistics are used and the running ones
    updated (unbiased variance, like nn.BatchNorm2d); with training=False the running ones are used."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return activate(y, activation, negative_slope)


def bn_add_act(x, residual, running_mean, running_var, weight, bias, training: bool, momentum: float,
               eps: float, activation: str = "identity", negative_slope: float = 0.01):
    """act(BatchNorm2d(x) + residual): the end of a residual block."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return activate(y + residual, activation, negative_slope)


def resize_conv3x3(x, weight, bias):
    """conv3×3(reflect_pad(nearest×2(x))): models.ResizeConv2d as a plain port writes it."""
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    with torch.autocast(x.device.type, enabled=False):  # keeps x's dtype (CPU autocast pads in fp32)
        up = F.pad(up, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(up, weight, bias)
