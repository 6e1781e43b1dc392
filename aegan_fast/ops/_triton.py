"""The ``triton`` kernel adapter: the Triton kernels of ``aegan_fast.kernels`` behind the ops' one
contract (aegan_fast/ops/library.py). kernels.bn_act's host functions already speak it: forward ->
(out, mean, biased var), backward from x (and the residual) -> (grad_x, grad_residual, grad_weight,
grad_bias), the activation as its code.

It runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the interpreter), which
is how the parity tests run it without a GPU. Loading needs triton, never a GPU.
"""
from __future__ import annotations

import torch

from .library import Adapter, BackendUnavailable


def adapter() -> Adapter:
    """The triton Adapter, or BackendUnavailable saying what is missing."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"triton not installed ({e})") from None
    from aegan_fast.kernels import bn_act, host
    devices = ("cuda", "cpu") if host.interpreting() else ("cuda",)
    if not torch.cuda.is_available() and "cpu" not in devices:
        raise BackendUnavailable("no CUDA device (and not TRITON_INTERPRET=1)")
    return Adapter("triton", devices, bn_act.forward, bn_act.backward)
