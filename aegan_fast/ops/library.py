"""The fused ops as torch.library custom ops: one schema per op, registered once.

    aegan_fast::bn_act(x, weight?, bias?, running_mean?, running_var?, training, eps, activation,
                       negative_slope, kernel) -> (out, mean, var)
    aegan_fast::bn_add_act(x, residual, ...same...) -> (out, mean, var)
    aegan_fast::bn_act_backward(grad_out, x, weight?, bias?, mean, var, training, eps, activation,
                                negative_slope, kernel) -> (grad_x, grad_weight, grad_bias)
    aegan_fast::bn_add_act_backward(grad_out, x, residual?, weight?, bias?, mean, var, ...)
                                -> (grad_x, grad_residual, grad_weight, grad_bias)

The contract, the same for every kernel:
- forward returns the output and, in training, the batch mean and the *biased* batch variance in
  fp32 (empty tensors in eval mode, where the running statistics are used);
- saved for backward: x, and for bn_add_act with a non-identity activation the residual, so
  backward recomputes z = x*scale + shift + residual exactly; the statistics (batch in training,
  running in eval); the weight and bias;
- grad_weight / grad_bias come back as fp32 per-channel sums, cast to the parameters' dtype here;
  grad_residual is empty when the activation is the identity (it equals grad_out, passed on here).

Each op has one fake kernel and the forward ops one autograd formula. That formula calls the
backward op, except inside a backward that is itself differentiated (create_graph=True, as R1's
penalty does): there it rebuilds the reference formula on the saved tensors and lets autograd
differentiate it, so the forward ops are twice differentiable on every kernel. The backward ops'
own formula only says they are not. The device kernels are attached per device with
``register_kernel``: both the CPU and the CUDA kernel look the ``kernel`` argument up in a table of
adapters ("cpp" | "cuda" | "triton", one module each: ops/_cpp.py, _cuda.py, _triton.py) that map
this contract onto each backend's native functions. Why a ``kernel`` argument rather than a
device-only choice: on CUDA tensors two kernels (cuda, triton) serve the same op and the caller
picks one, so the choice has to travel with the call into the backward; the argument keeps that
choice visible to torch.compile and opcheck instead of hiding it in process state.

The running statistics are not part of the ops (``register_autograd`` takes functional ops only):
``update_running_stats`` is one plain-torch function, one signature, for every kernel.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import activations

KERNELS = ("cpp", "cuda", "triton")
# Which kernels may run on tensors of each device type. Triton runs on CPU tensors only under
# TRITON_INTERPRET=1 (its adapter says so in ``devices``).
DEVICE_KERNELS = {"cpu": ("cpp", "triton"), "cuda": ("cuda", "triton")}


class BackendUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Adapter:
    """One backend's native functions behind the one contract (see the module docstring).

    forward(x, residual?, weight?, bias?, running_mean?, running_var?, training, eps, act_code, slope)
        -> (out, mean, var)
    backward(grad_out, x, residual?, weight?, bias?, mean, var, training, eps, act_code, slope, want_dres)
        -> (grad_x, grad_residual, grad_weight, grad_bias)
    """
    name: str
    devices: tuple[str, ...]
    forward: Callable
    backward: Callable


_adapters: dict[str, Adapter | str] = {}  # name -> Adapter, or the reason it cannot load


def load(name: str) -> Adapter | str:
    """The kernel adapter ``name`` (imported once), or a one-line reason it is unavailable here."""
    if name not in _adapters:
        try:
            _adapters[name] = importlib.import_module(f"aegan_fast.ops._{name}").adapter()
        except ModuleNotFoundError as e:
            _adapters[name] = f"not built ({e})"
        except BackendUnavailable as e:
            _adapters[name] = str(e)
        except Exception as e:  # a broken backend must not take the package down; say why
            _adapters[name] = f"failed to load: {type(e).__name__}: {e}"
    return _adapters[name]


def adapter(kernel: str, device: str) -> Adapter:
    """The Adapter of ``kernel`` for tensors of ``device``; RuntimeError / BackendUnavailable saying
    why it cannot run there."""
    if kernel not in DEVICE_KERNELS.get(device, ()):
        raise RuntimeError(f"aegan_fast ops: kernel {kernel!r} does not run on {device} tensors "
                           f"(on {device}: {', '.join(DEVICE_KERNELS.get(device, ())) or 'none'})")
    a = load(kernel)
    if isinstance(a, str):
        raise BackendUnavailable(f"aegan_fast ops: kernel {kernel!r} is unavailable: {a}")
    if device not in a.devices:
        raise BackendUnavailable(f"aegan_fast ops: kernel {kernel!r} cannot run on {device} tensors here "
                                 f"(it runs on {', '.join(a.devices)})")
    return a


def memory_format(x: Tensor) -> torch.memory_format:
    """The layout the kernels run in for x: NCHW when x is NCHW-contiguous, else channels_last when
    x is channels_last-contiguous (or suggests it), else NCHW after a copy."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and (x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) == 1):
        return torch.channels_last
    return torch.contiguous_format


# ---- the ops ------------------------------------------------------------------------------------

def _stats_like(x: Tensor, training: bool) -> tuple[Tensor, Tensor]:
    n = x.shape[1] if training else 0
    return x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


def _no_kernel(*args, **kwargs):
    raise RuntimeError("aegan_fast ops have kernels for CPU and CUDA tensors only")


@torch.library.custom_op("aegan_fast::bn_act", mutates_args=())
def bn_act_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
              running_var: Optional[Tensor], training: bool, eps: float, activation: str, negative_slope: float,
              kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    return _no_kernel()


@torch.library.custom_op("aegan_fast::bn_add_act", mutates_args=())
def bn_add_act_op(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                  activation: str, negative_slope: float, kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    return _no_kernel()


@torch.library.custom_op("aegan_fast::bn_act_backward", mutates_args=())
def bn_act_backward_op(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                       var: Tensor, training: bool, eps: float, activation: str, negative_slope: float,
                       kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    return _no_kernel()


@torch.library.custom_op("aegan_fast::bn_add_act_backward", mutates_args=())
def bn_add_act_backward_op(grad_out: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], mean: Tensor, var: Tensor, training: bool, eps: float,
                           activation: str, negative_slope: float, kernel: str
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _no_kernel()


def _register_device_kernels(device: str) -> None:
    def fwd(x, weight, bias, running_mean, running_var, training, eps, activation, negative_slope, kernel):
        return adapter(kernel, device).forward(x, None, weight, bias, running_mean, running_var, training, eps,
                                                activations.code(activation), negative_slope)

    def add_fwd(x, residual, weight, bias, running_mean, running_var, training, eps, activation, negative_slope,
                kernel):
        return adapter(kernel, device).forward(x, residual, weight, bias, running_mean, running_var, training, eps,
                                                activations.code(activation), negative_slope)

    def bwd(grad_out, x, weight, bias, mean, var, training, eps, activation, negative_slope, kernel):
        dx, _, dw, db = adapter(kernel, device).backward(grad_out, x, None, weight, bias, mean, var, training, eps,
                                                          activations.code(activation), negative_slope, False)
        return dx, dw, db

    def add_bwd(grad_out, x, residual, weight, bias, mean, var, training, eps, activation, negative_slope, kernel):
        return adapter(kernel, device).backward(grad_out, x, residual, weight, bias, mean, var, training, eps,
                                                 activations.code(activation), negative_slope, residual is not None)

    for op, fn in ((bn_act_op, fwd), (bn_add_act_op, add_fwd), (bn_act_backward_op, bwd),
                   (bn_add_act_backward_op, add_bwd)):
        torch.library.register_kernel(op, device, fn)


for _device in DEVICE_KERNELS:
    _register_device_kernels(_device)


@bn_act_op.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, activation, negative_slope, kernel):
    return (torch.empty_like(x), *_stats_like(x, training))


@bn_add_act_op.register_fake
def _(x, residual, weight, bias, running_mean, running_var, training, eps, activation, negative_slope, kernel):
    return (torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype)), *_stats_like(x, training))


@bn_act_backward_op.register_fake
def _(grad_out, x, weight, bias, mean, var, training, eps, activation, negative_slope, kernel):
    return (torch.empty_like(x), *_stats_like(x, True))


@bn_add_act_backward_op.register_fake
def _(grad_out, x, residual, weight, bias, mean, var, training, eps, activation, negative_slope, kernel):
    dres = torch.empty_like(residual) if residual is not None else x.new_empty((0,))
    return (torch.empty_like(x), dres, *_stats_like(x, True))


# ---- the autograd formulas ------------------------------------------------------------------------

def _setup(ctx, inputs, output, has_res: bool):
    if has_res:
        x, residual, weight, bias, running_mean, running_var, training, eps, activation, slope, kernel = inputs
    else:
        x, weight, bias, running_mean, running_var, training, eps, activation, slope, kernel = inputs
        residual = None
    _, mean, var = output
    if not training:
        mean, var = running_mean, running_var
    keep_res = residual if has_res and activations.get(activation).needs_preactivation else None
    ctx.save_for_backward(x, keep_res, weight, bias, mean, var)
    ctx.args = (training, eps, activation, slope, kernel)
    ctx.has_res = has_res


def _grads(ctx, grad_out):
    if torch.is_grad_enabled():  # inside a backward with create_graph=True: its result is differentiated
        return _differentiable_grads(ctx, grad_out)
    x, residual, weight, bias, mean, var = ctx.saved_tensors
    training, eps, activation, slope, kernel = ctx.args
    grad_out = grad_out.contiguous(memory_format=memory_format(x))
    if ctx.has_res:
        dx, dres, dw, db = bn_add_act_backward_op(grad_out, x, residual, weight, bias, mean, var, training, eps,
                                                  activation, slope, kernel)
        if residual is None:
            dres = grad_out  # identity: the residual's gradient is grad_out itself, no kernel write
    else:
        (dx, dw, db), dres = bn_act_backward_op(grad_out, x, weight, bias, mean, var, training, eps, activation,
                                                slope, kernel), None
    dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1 + ctx.has_res] else None
    db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2 + ctx.has_res] else None
    return dx, dres, dw, db


def _differentiable_grads(ctx, grad_out):
    """The backward for a backward that is itself differentiated (R1's penalty, losses.r1_penalty):
    the op's reference formula rebuilt from what the forward saved and differentiated by autograd with
    create_graph, so the result is a graph of aten ops that have derivatives of their own. The forward
    kept the fused kernel; only this pass pays for a plain BatchNorm forward (an elementwise pass and
    two reductions, small beside the convolutions around it). In training the statistics are taken
    again from x, because the second derivative needs how they depend on x (the saved ones are
    constants). With the identity the residual is not saved and not needed: its gradient is grad_out,
    and x's does not depend on it."""
    x, residual, weight, bias, mean, var = ctx.saved_tensors
    training, eps, activation, slope, kernel = ctx.args
    wanted = [(i, t) for i, t in ((0, x), (1, residual), (2, weight), (3, bias))
              if t is not None and t.requires_grad and ctx.needs_input_grad[_input_index(ctx, i)]]
    y = torch.nn.functional.batch_norm(x, None if training else mean, None if training else var, weight, bias,
                                       training, 0.0, eps)
    if residual is not None:
        y = y + residual
    out = activations.get(activation).fn(y, slope)
    grads = torch.autograd.grad(out, [t for _, t in wanted], grad_out, create_graph=True, allow_unused=True) \
        if wanted else ()
    found = dict(zip((i for i, _ in wanted), grads))
    dres = found.get(1) if residual is not None else (grad_out if ctx.has_res else None)
    return found.get(0), dres, found.get(2), found.get(3)


def _input_index(ctx, i: int) -> int:
    """The op's input position of saved slot i (x, residual, weight, bias): bn_act has no residual."""
    return i if ctx.has_res else (0 if i == 0 else i - 1)


def _bn_act_backward(ctx, grad_out, _grad_mean, _grad_var):
    dx, _, dw, db = _grads(ctx, grad_out)
    return dx, dw, db, None, None, None, None, None, None, None


def _bn_add_act_backward(ctx, grad_out, _grad_mean, _grad_var):
    dx, dres, dw, db = _grads(ctx, grad_out)
    return dx, dres, dw, db, None, None, None, None, None, None, None


def _not_twice_differentiable(ctx, *grads):
    raise RuntimeError("aegan_fast fused BatchNorm ops are not twice differentiable (their backward has no "
                       "backward); use the reference backend (ops.use_backend('reference')) for double backward")


bn_act_op.register_autograd(_bn_act_backward,
                            setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, False))
bn_add_act_op.register_autograd(_bn_add_act_backward,
                                setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, True))
bn_act_backward_op.register_autograd(_not_twice_differentiable)
bn_add_act_backward_op.register_autograd(_not_twice_differentiable)


# ---- entry points -------------------------------------------------------------------------------

def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float,
                         count: int) -> None:
    """running = (1 - momentum) * running + momentum * batch, in place, with the unbiased batch
    variance (var * count / (count - 1)), as nn.BatchNorm2d does; fp64 arithmetic, stored in the
    buffers' own dtype."""
    with torch.no_grad():
        unbias = count / (count - 1) if count > 1 else 1.0
        running_mean.copy_(running_mean.double() * (1.0 - momentum) + mean.double() * momentum)
        running_var.copy_(running_var.double() * (1.0 - momentum) + var.double() * (unbias * momentum))


def run(kernel: str, x, residual, running_mean, running_var, weight, bias, training, momentum, eps, activation,
        negative_slope):
    """act(BatchNorm2d(x) (+ residual)) through the op, with kernel ``kernel``; updates the running
    statistics in training (the signature of the reference functions, plus the kernel)."""
    activations.get(activation)
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    args = (weight, bias, None if training else running_mean, None if training else running_var, bool(training),
            float(eps), activation, float(negative_slope), kernel)
    if residual is None:
        out, mean, var = bn_act_op(x, *args)
    else:
        out, mean, var = bn_add_act_op(x, residual.contiguous(memory_format=fmt), *args)
    if training and running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), float(momentum),
                             x.numel() // x.shape[1])
    return out


def bn_act(kernel: str, x, running_mean, running_var, weight, bias, training, momentum, eps, activation="relu",
           negative_slope=0.01):
    """``reference.bn_act`` on kernel ``kernel`` (tests and benches pin a kernel with this)."""
    return run(kernel, x, None, running_mean, running_var, weight, bias, training, momentum, eps, activation,
               negative_slope)


def bn_add_act(kernel: str, x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
               activation="identity", negative_slope=0.01):
    """``reference.bn_add_act`` on kernel ``kernel``."""
    return run(kernel, x, residual, running_mean, running_var, weight, bias, training, momentum, eps, activation,
               negative_slope)
