"""The ``triton`` backend: the kernels of ``aegan_fast.kernels`` registered with torch.library.

Ops (namespace ``aegan_fast``, all functional except the running-stat update, because
torch.library cannot attach an autograd formula to an op that mutates its inputs):

    triton_bn_act_fwd(x, weight?, bias?, running_mean?, running_var?, training, eps, activation,
                      negative_slope, memory_efficient) -> (y, mean, var)
    triton_bn_act_bwd(grad_y, saved, mean, var, weight?, bias?, training, eps, activation,
                      negative_slope, from_output) -> (grad_x, grad_weight, grad_bias)
    triton_bn_add_act_fwd(x, residual, ...) -> (y, mean, var)
    triton_bn_add_act_bwd(grad_y, x, residual, ...) -> (grad_x, grad_weight, grad_bias, grad_residual)
    triton_bn_update_running(running_mean!, running_var!, mean, var, momentum, count) -> ()

They are defined with ``torch.library.triton_op`` (the host functions call their kernels through
``wrap_triton``, so torch.compile traces into them without a graph break) where this torch has
it, else with ``custom_op`` + ``register_fake``. ``register_autograd`` wires the backward.

``backend()`` refuses to load without a CUDA device. ``register()`` alone works anywhere triton
imports, which is how the tests run these ops on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from .dispatch import Backend, BackendUnavailable

NS = "aegan_fast"


def _kernels():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"triton not installed ({e})") from None
    from aegan_fast import kernels
    return kernels


def _define(name: str, fn, fake, mutates_args=()):
    """triton_op where torch has it (traceable by torch.compile), else an opaque custom_op."""
    lib = torch.library
    if hasattr(lib, "triton_op") and hasattr(lib, "wrap_triton"):
        return lib.triton_op(f"{NS}::{name}", fn, mutates_args=mutates_args)
    op = lib.custom_op(f"{NS}::{name}", fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


def _empty_stats(x: torch.Tensor, training: bool):
    n = x.shape[1] if training else 0
    return x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


@functools.cache
def register() -> SimpleNamespace:
    """Define the ops once; returns the Python entry points ``bn_act`` and ``bn_add_act`` with the
    signatures of ``aegan_fast.ops.bn_act`` / ``bn_add_act``."""
    k = _kernels()
    from aegan_fast.kernels._common import check_memory_efficient, invertible

    # ---- bn_act ---------------------------------------------------------------------------------
    def bn_act_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                   eps: float, activation: str, negative_slope: float,
                   memory_efficient: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return k.bn_act.bn_act_forward(x, weight, bias, running_mean, running_var, training, eps, activation,
                                       negative_slope)

    def bn_act_fwd_fake(x, weight, bias, running_mean, running_var, training, eps, activation, negative_slope,
                        memory_efficient):
        return (torch.empty_like(k._common.contiguous_input(x)), *_empty_stats(x, training))

    def bn_act_bwd(grad_y: torch.Tensor, saved: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, eps: float,
                   activation: str, negative_slope: float,
                   from_output: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return k.bn_act.bn_act_backward(grad_y, saved, mean, var, weight, bias, training, eps, activation,
                                        negative_slope, from_output)

    def bn_act_bwd_fake(grad_y, saved, mean, var, weight, bias, training, eps, activation, negative_slope,
                        from_output):
        C = saved.shape[1]
        return (torch.empty_like(k._common.contiguous_input(saved)),
                saved.new_empty(C, dtype=torch.float32), saved.new_empty(C, dtype=torch.float32))

    fwd = _define("triton_bn_act_fwd", bn_act_fwd, bn_act_fwd_fake)
    bwd = _define("triton_bn_act_bwd", bn_act_bwd, bn_act_bwd_fake)

    def setup_bn_act(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, training, eps, activation, slope, memory_efficient = inputs
        y, mean, var = output
        ctx.from_output = bool(memory_efficient) and invertible(activation, slope)
        if not training:
            mean, var = running_mean, running_var
        ctx.save_for_backward(y if ctx.from_output else x, mean, var, weight, bias)
        ctx.args = (training, eps, activation, slope)

    def backward_bn_act(ctx, grad_y, _grad_mean, _grad_var):
        saved, mean, var, weight, bias = ctx.saved_tensors
        training, eps, activation, slope = ctx.args
        gx, gw, gb = bwd(grad_y, saved, mean, var, weight, bias, training, eps, activation, slope, ctx.from_output)
        gw = gw.to(weight.dtype) if weight is not None else None
        gb = gb.to(bias.dtype) if bias is not None else None
        return gx, gw, gb, None, None, None, None, None, None, None

    fwd.register_autograd(backward_bn_act, setup_context=setup_bn_act)

    # ---- bn_add_act -----------------------------------------------------------------------------
    def bn_add_act_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                       running_var: torch.Tensor | None, training: bool, eps: float, activation: str,
                       negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return k.bn_add_act.bn_add_act_forward(x, residual, weight, bias, running_mean, running_var, training, eps,
                                               activation, negative_slope)

    def bn_add_act_fwd_fake(x, residual, weight, bias, running_mean, running_var, training, eps, activation,
                            negative_slope):
        y = torch.empty_like(k._common.contiguous_input(x), dtype=torch.promote_types(x.dtype, residual.dtype))
        return (y, *_empty_stats(x, training))

    def bn_add_act_bwd(grad_y: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, mean: torch.Tensor,
                       var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool,
                       eps: float, activation: str, negative_slope: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return k.bn_add_act.bn_add_act_backward(grad_y, x, residual, mean, var, weight, bias, training, eps,
                                                activation, negative_slope)

    def bn_add_act_bwd_fake(grad_y, x, residual, mean, var, weight, bias, training, eps, activation,
                            negative_slope):
        x = k._common.contiguous_input(x)
        C = x.shape[1]
        gr = torch.empty_like(x, dtype=residual.dtype) if activation != "identity" else x.new_empty(0)
        return (torch.empty_like(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32), gr)

    add_fwd = _define("triton_bn_add_act_fwd", bn_add_act_fwd, bn_add_act_fwd_fake)
    add_bwd = _define("triton_bn_add_act_bwd", bn_add_act_bwd, bn_add_act_bwd_fake)

    def setup_bn_add_act(ctx, inputs, output):
        x, residual, weight, bias, running_mean, running_var, training, eps, activation, slope = inputs
        _, mean, var = output
        if not training:
            mean, var = running_mean, running_var
        ctx.save_for_backward(x, residual, mean, var, weight, bias)
        ctx.args = (training, eps, activation, slope)

    def backward_bn_add_act(ctx, grad_y, _grad_mean, _grad_var):
        x, residual, mean, var, weight, bias = ctx.saved_tensors
        training, eps, activation, slope = ctx.args
        gx, gw, gb, gr = add_bwd(grad_y, x, residual, mean, var, weight, bias, training, eps, activation, slope)
        if activation == "identity":
            gr = grad_y  # dz == grad_y: the backward op skips writing a copy
        gw = gw.to(weight.dtype) if weight is not None else None
        gb = gb.to(bias.dtype) if bias is not None else None
        return gx, gr, gw, gb, None, None, None, None, None, None

    add_fwd.register_autograd(backward_bn_add_act, setup_context=setup_bn_add_act)

    # ---- running statistics ---------------------------------------------------------------------
    def update_running(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                       var: torch.Tensor, momentum: float, count: int) -> None:
        k._common.update_running_stats(running_mean, running_var, mean, var, momentum, count)

    def update_running_fake(running_mean, running_var, mean, var, momentum, count):
        return None

    update = _define("triton_bn_update_running", update_running, update_running_fake,
                     mutates_args=("running_mean", "running_var"))

    # ---- the backend's entry points -------------------------------------------------------------
    def bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation="relu",
               negative_slope=0.01, memory_efficient=False):
        check_memory_efficient(memory_efficient, activation, negative_slope)
        y, mean, var = fwd(x, weight, bias, None if training else running_mean, None if training else running_var,
                           bool(training), float(eps), activation, float(negative_slope), bool(memory_efficient))
        if training and running_mean is not None and running_var is not None:
            update(running_mean, running_var, mean, var, float(momentum), x.numel() // x.shape[1])
        return y

    def bn_add_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
                   activation="identity", negative_slope=0.01):
        y, mean, var = add_fwd(x, residual, weight, bias, None if training else running_mean,
                               None if training else running_var, bool(training), float(eps), activation,
                               float(negative_slope))
        if training and running_mean is not None and running_var is not None:
            update(running_mean, running_var, mean, var, float(momentum), x.numel() // x.shape[1])
        return y

    return SimpleNamespace(bn_act=bn_act, bn_add_act=bn_add_act, ops=SimpleNamespace(
        bn_act_fwd=fwd, bn_act_bwd=bwd, bn_add_act_fwd=add_fwd, bn_add_act_bwd=add_bwd, update_running=update))


def backend() -> Backend:
    _kernels()
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device")
    entry = register()
    return Backend(name="triton", devices=("cuda",), bn_act=entry.bn_act, bn_add_act=entry.bn_add_act)
