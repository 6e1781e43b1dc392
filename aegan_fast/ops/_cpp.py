"""The ``cpp`` backend: fused BatchNorm(+residual)+activation on the CPU, from csrc/ (aegan_fast._C).

Three ``torch.library`` custom ops carry it, so ``torch.compile(fullgraph=True)`` sees opaque,
well-described nodes instead of graph-breaking on a C++ call:

- ``aegan_fast::bn_act_fwd_cpp``  (functional) x[, residual] -> (out, mean, invstd, var_unbiased);
- ``aegan_fast::bn_act_bwd_cpp``  (functional) the whole backward -> (dx, dres, dweight, dbias);
- ``aegan_fast::bn_running_update_cpp`` (mutates running_mean / running_var in place).

The running-statistics update is its own mutating op because ``register_autograd`` only accepts
functional ops; the forward returns the batch variance and the update consumes it, so the pair is
still one statistics pass over x. Each op has a fake (meta) kernel, and the forward an autograd
formula that calls the backward op.

Saved for backward (what ``memory_efficient`` changes): normally x (plus the output when a residual
and a non-identity activation make the output's sign the only record of the pre-activation's); with
``memory_efficient=True`` (bn_act, identity or LeakyReLU with slope > 0) only the output, from which
backward recovers xhat = (act^-1(y) - b) / w. The output is usually saved anyway by the next conv,
so the activation-sized x no longer is. |w| is clamped at 1e-6 in that inversion (see
csrc/bn_act.h): a channel whose weight reaches zero gets approximate gradients there, not NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import Backend, BackendUnavailable

_ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2}
_C = None
_registered = False


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout the kernels run in for x: NCHW when x is NCHW-contiguous, else channels_last when
    x is channels_last-contiguous (or suggests it), else NCHW after a copy."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if x.dim() == 4 and x.stride(1) == 1 else torch.contiguous_format


def _act_code(activation: str) -> int:
    try:
        return _ACT_CODES[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(_ACT_CODES)}") from None


def _register() -> None:
    """Define the custom ops (once). Needs torch.library.custom_op/register_fake/register_autograd."""
    global _registered
    if _registered:
        return
    lib = torch.library

    @lib.custom_op("aegan_fast::bn_act_fwd_cpp", mutates_args=(), device_types="cpu")
    def bn_act_fwd_cpp(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                       activation: str, negative_slope: float, memory_efficient: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _C.bn_forward(x, residual, weight, bias, running_mean, running_var, training, eps,
                             _act_code(activation), negative_slope)

    @bn_act_fwd_cpp.register_fake
    def _(x, residual, weight, bias, running_mean, running_var, training, eps, activation, negative_slope,
          memory_efficient):
        C = x.shape[1]
        f32 = dict(dtype=torch.float32, device=x.device)
        return (torch.empty_like(x), x.new_empty((C,), **f32), x.new_empty((C,), **f32),
                x.new_empty((C if training else 0,), **f32))

    @lib.custom_op("aegan_fast::bn_act_bwd_cpp", mutates_args=(), device_types="cpu")
    def bn_act_bwd_cpp(grad_out: Tensor, src: Tensor, out: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], mean: Tensor, invstd: Tensor, training: bool, activation: str,
                       negative_slope: float, memory_efficient: bool, want_dres: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _C.bn_backward(grad_out, src, out, weight, bias, mean, invstd, training, _act_code(activation),
                              negative_slope, memory_efficient, want_dres)

    @bn_act_bwd_cpp.register_fake
    def _(grad_out, src, out, weight, bias, mean, invstd, training, activation, negative_slope, memory_efficient,
          want_dres):
        f32 = dict(dtype=torch.float32, device=src.device)
        dw = weight.new_empty(weight.shape) if weight is not None else src.new_empty((0,), **f32)
        db = bias.new_empty(bias.shape) if bias is not None else src.new_empty((0,), **f32)
        dres = torch.empty_like(src) if want_dres else src.new_empty((0,))
        return torch.empty_like(src), dres, dw, db

    @lib.custom_op("aegan_fast::bn_running_update_cpp", mutates_args=("running_mean", "running_var"),
                   device_types="cpu")
    def bn_running_update_cpp(running_mean: Tensor, running_var: Tensor, mean: Tensor, var_unbiased: Tensor,
                              momentum: float) -> None:
        _C.bn_running_update(running_mean, running_var, mean, var_unbiased, momentum)

    @bn_running_update_cpp.register_fake
    def _(running_mean, running_var, mean, var_unbiased, momentum):
        return None

    def setup_context(ctx, inputs, output):
        (x, residual, weight, bias, _rm, _rv, training, _eps, activation, negative_slope, memory_efficient) = inputs
        out, mean, invstd, _var = output
        has_res = residual is not None
        # The output's sign is needed for the activation's derivative only when a residual makes the
        # pre-activation unrecoverable from x alone; memory_efficient saves the output instead of x.
        keep_out = has_res and activation != "identity"
        src = out if memory_efficient else x
        ctx.save_for_backward(src, out if keep_out else None, weight, bias, mean, invstd)
        ctx.has_res = has_res
        ctx.training = training
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.memory_efficient = memory_efficient
        ctx.channels_last = _memory_format(x) == torch.channels_last
        ctx.set_materialize_grads(True)

    def backward(ctx, grad_out, _g_mean, _g_invstd, _g_var):
        src, out, weight, bias, mean, invstd = ctx.saved_tensors
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        grad_out = grad_out.contiguous(memory_format=fmt)
        # With identity the residual's gradient is grad_out itself: hand it back, no kernel write.
        write_dres = ctx.has_res and ctx.activation != "identity"
        dx, dres, dw, db = bn_act_bwd_cpp(grad_out, src, out, weight, bias, mean, invstd, ctx.training,
                                          ctx.activation, ctx.negative_slope, ctx.memory_efficient, write_dres)
        if ctx.has_res and not write_dres:
            dres = grad_out
        return (dx, dres if ctx.has_res else None, dw if weight is not None else None,
                db if bias is not None else None, None, None, None, None, None, None, None)

    bn_act_fwd_cpp.register_autograd(backward, setup_context=setup_context)
    _registered = True


def _forward(x, residual, running_mean, running_var, weight, bias, training, momentum, eps, activation,
             negative_slope, memory_efficient):
    _act_code(activation)
    if memory_efficient and not (activation == "identity" or (activation == "leaky_relu" and negative_slope > 0)):
        raise ValueError("memory_efficient needs an invertible activation: identity or leaky_relu with slope > 0")
    fmt = _memory_format(x)
    x = x.contiguous(memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    out, mean, invstd, var = torch.ops.aegan_fast.bn_act_fwd_cpp(
        x, residual, weight, bias, running_mean, running_var, bool(training), float(eps), activation,
        float(negative_slope), bool(memory_efficient))
    if training and running_mean is not None and running_var is not None:
        torch.ops.aegan_fast.bn_running_update_cpp(running_mean, running_var, mean.detach(), var.detach(),
                                                   float(momentum))
    return out


def bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation="relu",
           negative_slope=0.01, memory_efficient=False):
    return _forward(x, None, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                    negative_slope, memory_efficient)


def bn_add_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
               activation="identity", negative_slope=0.01):
    if activation == "leaky_relu" and negative_slope < 0:
        raise ValueError("the cpp backend's bn_add_act needs leaky_relu negative_slope >= 0 "
                         "(backward reads the activation's derivative off the output's sign)")
    return _forward(x, residual, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                    negative_slope, False)


def backend() -> Backend:
    """The cpp Backend, or BackendUnavailable naming what is missing and how to fix it."""
    global _C
    lib = torch.library
    missing = [n for n in ("custom_op", "register_fake", "register_autograd") if not hasattr(lib, n)]
    if missing:
        raise BackendUnavailable(f"torch {torch.__version__} lacks torch.library.{', '.join(missing)} "
                                 "(the cpp backend registers custom ops; torch >= 2.4 has them)")
    try:
        from aegan_fast import _C as ext
    except ImportError as e:
        msg = str(e)
        hint = ("rebuild it against this torch: `pip install -e . --no-build-isolation`"
                if "undefined symbol" in msg or "version" in msg else
                "build it: `make setup` or `pip install -e . --no-build-isolation`")
        raise BackendUnavailable(f"native extension aegan_fast._C is not importable ({msg}); {hint}") from None
    if not hasattr(ext, "bn_forward"):
        raise BackendUnavailable("aegan_fast._C was built without the CPU BatchNorm kernels (csrc/bindings.cpp); "
                                 "rebuild with `pip install -e . --no-build-isolation`")
    if not getattr(ext, "openmp", False):
        raise BackendUnavailable("aegan_fast._C was built without OpenMP, so its CPU kernels run on one core; "
                                 "rebuild with a compiler that supports -fopenmp")
    _C = ext
    _register()
    return Backend("cpp", ("cpu",), bn_act, bn_add_act)
