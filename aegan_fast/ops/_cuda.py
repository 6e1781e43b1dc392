"""The ``cuda`` backend: the kernels of csrc/cuda/ (in aegan_fast._C when it is built with CUDA).

Three torch.library custom ops (device_types="cuda"), each with a fake kernel; the forward has an
autograd formula calling the backward op:

- ``aegan_fast::bn_act_fwd_cuda``  (functional) x[, residual] -> (out, mean, var);
- ``aegan_fast::bn_act_bwd_cuda``  (functional) -> (dx, dres, dweight, dbias);
- ``aegan_fast::bn_running_update_cuda`` (mutates running_mean / running_var).

Saved for backward: x (and the residual for bn_add_act with an activation, so the pre-activation
is recomputed exactly); with ``memory_efficient`` (bn_act, identity or LeakyReLU with slope > 0)
only the output, from which backward recovers xhat = (act^-1(y) - b) / w (|w| floored at 1e-6).
In eval mode the running statistics are saved, as F.batch_norm does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import Backend, BackendUnavailable

_ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2}
_C = None
_registered = False


def _act_code(activation: str) -> int:
    try:
        return _ACT_CODES[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(_ACT_CODES)}") from None


def _invertible(activation: str, negative_slope: float) -> bool:
    return activation == "identity" or (activation == "leaky_relu" and negative_slope > 0)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if x.dim() == 4 and x.stride(1) == 1 else torch.contiguous_format


def _register() -> None:
    global _registered
    if _registered:
        return
    lib = torch.library

    @lib.custom_op("aegan_fast::bn_act_fwd_cuda", mutates_args=(), device_types="cuda")
    def fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
            activation: str, negative_slope: float, memory_efficient: bool) -> tuple[Tensor, Tensor, Tensor]:
        return _C.cuda_bn_forward(x, residual, weight, bias, running_mean, running_var, training, eps,
                                  _act_code(activation), negative_slope)

    @fwd.register_fake
    def _(x, residual, weight, bias, running_mean, running_var, training, eps, activation, negative_slope,
          memory_efficient):
        n = x.shape[1] if training else 0
        return (torch.empty_like(x), x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32))

    @lib.custom_op("aegan_fast::bn_act_bwd_cuda", mutates_args=(), device_types="cuda")
    def bwd(grad_out: Tensor, src: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
            bias: Optional[Tensor], mean: Tensor, var: Tensor, training: bool, eps: float, activation: str,
            negative_slope: float, src_is_output: bool, want_dres: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _C.cuda_bn_backward(grad_out, src, residual, weight, bias, mean, var, training, eps,
                                   _act_code(activation), negative_slope, src_is_output, want_dres)

    @bwd.register_fake
    def _(grad_out, src, residual, weight, bias, mean, var, training, eps, activation, negative_slope,
          src_is_output, want_dres):
        C = src.shape[1]
        dres = torch.empty_like(src) if want_dres else src.new_empty((0,))
        return (torch.empty_like(src), dres, src.new_empty((C,), dtype=torch.float32),
                src.new_empty((C,), dtype=torch.float32))

    @lib.custom_op("aegan_fast::bn_running_update_cuda", mutates_args=("running_mean", "running_var"),
                   device_types="cuda")
    def update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float,
               count: int) -> None:
        _C.cuda_bn_running_update(running_mean, running_var, mean, var, momentum, count)

    @update.register_fake
    def _(running_mean, running_var, mean, var, momentum, count):
        return None

    def setup_context(ctx, inputs, output):
        (x, residual, weight, bias, running_mean, running_var, training, eps, activation, negative_slope,
         memory_efficient) = inputs
        out, mean, var = output
        ctx.src_is_output = bool(memory_efficient) and residual is None and _invertible(activation, negative_slope)
        if not training:
            mean, var = running_mean, running_var
        keep_residual = residual is not None and activation != "identity"
        ctx.save_for_backward(out if ctx.src_is_output else x, residual if keep_residual else None, weight, bias,
                              mean, var)
        ctx.has_res = residual is not None
        ctx.args = (training, eps, activation, negative_slope)
        ctx.memory_format = _memory_format(x)

    def backward(ctx, grad_out, _g_mean, _g_var):
        src, residual, weight, bias, mean, var = ctx.saved_tensors
        training, eps, activation, negative_slope = ctx.args
        grad_out = grad_out.contiguous(memory_format=ctx.memory_format)
        want_dres = ctx.has_res and activation != "identity"
        dx, dres, dw, db = bwd(grad_out, src, residual, weight, bias, mean, var, training, eps, activation,
                               negative_slope, ctx.src_is_output, want_dres)
        if ctx.has_res and not want_dres:
            dres = grad_out  # identity: grad residual == grad output
        return (dx, dres if ctx.has_res else None, dw.to(weight.dtype) if weight is not None else None,
                db.to(bias.dtype) if bias is not None else None, None, None, None, None, None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    _registered = True


def _forward(x, residual, running_mean, running_var, weight, bias, training, momentum, eps, activation,
             negative_slope, memory_efficient):
    _act_code(activation)
    fmt = _memory_format(x)
    x = x.contiguous(memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    out, mean, var = torch.ops.aegan_fast.bn_act_fwd_cuda(
        x, residual, weight, bias, None if training else running_mean, None if training else running_var,
        bool(training), float(eps), activation, float(negative_slope), bool(memory_efficient))
    if training and running_mean is not None and running_var is not None:
        torch.ops.aegan_fast.bn_running_update_cuda(running_mean, running_var, mean.detach(), var.detach(),
                                                    float(momentum), x.numel() // x.shape[1])
    return out


def bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation="relu",
           negative_slope=0.01, memory_efficient=False):
    return _forward(x, None, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                    negative_slope, memory_efficient)


def bn_add_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
               activation="identity", negative_slope=0.01):
    return _forward(x, residual, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                    negative_slope, False)


def backend() -> Backend:
    """The cuda Backend, or BackendUnavailable saying what is missing."""
    global _C
    try:
        from aegan_fast import _C as ext
    except ImportError as e:
        raise BackendUnavailable(f"native extension aegan_fast._C is not importable ({e}); "
                                 "build it: `pip install -e . --no-build-isolation`") from None
    if not getattr(ext, "with_cuda", False) or not hasattr(ext, "cuda_bn_forward"):
        raise BackendUnavailable("extension built without CUDA (torch without CUDA, no nvcc/CUDA_HOME, or "
                                 "AEGAN_NO_CUDA=1 at build time)")
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device")
    _C = ext
    _register()
    return Backend("cuda", ("cuda",), bn_act, bn_add_act)
