"""Which device to run on: ``--device auto|cpu|cuda|cuda:N``, with a clear error for one that is not there."""
from __future__ import annotations

import torch

from .errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch build or machine has no CUDA GPU")
    return device
