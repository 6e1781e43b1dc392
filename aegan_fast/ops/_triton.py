"""The ``triton`` kernel adapter: the host functions of ``aegan_fast.kernels`` behind the ops' one
contract (aegan_fast/ops/library.py).

It runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the interpreter), which
is how the parity tests run it without a GPU. Loading needs triton, never a GPU.
"""
from __future__ import annotations

import torch

from .activations import TABLE
from .library import Adapter, BackendUnavailable


def adapter() -> Adapter:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"triton not installed ({e})") from None
    from aegan_fast.kernels import _common, bn_act, bn_add_act
    name = {a.code: a.name for a in TABLE.values()}  # the host functions take the activation's name

    def forward(x, residual, weight, bias, running_mean, running_var, training, eps, act, slope):
        return bn_act.bn_act_forward(x, weight, bias, running_mean, running_var, training, eps, name[act], slope,
                                     residual=residual)

    def backward(grad_out, x, residual, weight, bias, mean, var, training, eps, act, slope, want_dres):
        if residual is None:
            dx, dw, db = bn_act.bn_act_backward(grad_out, x, mean, var, weight, bias, training, eps, name[act],
                                                slope)
            return dx, x.new_empty(0), dw, db
        dx, dw, db, dres = bn_add_act.bn_add_act_backward(grad_out, x, residual, mean, var, weight, bias, training,
                                                          eps, name[act], slope)
        return dx, dres, dw, db

    devices = ("cuda", "cpu") if _common.interpreting() else ("cuda",)
    if not torch.cuda.is_available() and "cpu" not in devices:
        raise BackendUnavailable("no CUDA device (and not TRITON_INTERPRET=1)")
    return Adapter("triton", devices, forward, backward)
