"""The fused block ops as torch.library custom ops, the same contract style as library.py.

    aegan_fast::resblock(x, w1, w2, weight1, bias1, weight2, bias2, running_mean1?, running_var1?,
                         running_mean2?, running_var2?, training, eps, activation, negative_slope, kernel)
        -> (out, y1, y2, mean1, var1, mean2, var2)
    aegan_fast::resblock_backward(grad_out, x, y1, y2, w1, w2, weight1, bias1, weight2, bias2,
                                  mean1, var1, mean2, var2, training, eps, activation, negative_slope, kernel)
        -> (grad_x, grad_w1, grad_w2, grad_weight1, grad_bias1, grad_weight2, grad_bias2)
    aegan_fast::up_block(x, w, weight, bias, running_mean?, running_var?, training, eps, kernel)
        -> (out, y, mean, var)
    aegan_fast::up_block_backward(grad_out, x, y, w, weight, bias, mean, var, training, eps, kernel)
        -> (grad_x, grad_w, grad_weight, grad_bias)

resblock is models.ResBlock: out = BN2(conv2(act(BN1(conv1(x))))) + x, both convs 3x3 reflect-padded
without bias, BN2 without activation. up_block is models._up(kind="transposed"):
out = relu(BN(conv_transpose 4x4 stride 2 padding 1 (x))), no bias.

The contract, the same for every kernel:
- y1 = conv1(x), y2 = conv2(act(BN1(y1))) and y = convT(x) are the pre-normalisation conv outputs in
  x's dtype and memory format. They are outputs of the op only because ``register_autograd`` saves
  what the op returns (its setup sees inputs and outputs, nothing in between); the Python entry
  points hand back ``out`` alone and nothing differentiates through them.
- mean*/var* are the batch mean and *biased* batch variance in fp32 in training, empty tensors in
  eval (where the running statistics are used), as the BN ops return them.
- saved for backward: x, y1, y2 (resp. x, y), the weights, the statistics (batch in training,
  running in eval); never a normalised activation: the backward kernels recompute
  act(y1*scale1 + shift1) in their prologue.
- conv weight gradients come back in fp32 and the BN ones as fp32 per-channel sums, cast to the
  parameters' dtypes in the autograd formula.

The running statistics are not part of the ops (register_autograd takes functional ops only):
``run_resblock`` / ``run_up_block`` update them with ``library.update_running_stats``, num_batches_tracked
through the modules' own ``forward_mode()``, exactly as the per-op path does.

Kernels: only "triton" (on CUDA, and on CPU tensors under TRITON_INTERPRET=1). It runs the convs of
aegan_fast.kernels.conv3x3 / convt4x4 and the BatchNorm apply/backward of kernels.bn_act: in the
resblock, BN1 and the activation live in conv2's prologue (forward) and in conv2's wgrad prologue
(backward), so the normalised activation never reaches memory, and BN1's backward reductions in
conv2's dgrad epilogue.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import activations, library


def _stats(x: Tensor, training: bool) -> Tensor:
    return x.new_empty((x.shape[1] if training else 0,), dtype=torch.float32)


def _no_kernel(*args, **kwargs):
    raise RuntimeError("aegan_fast block ops have kernels for CPU and CUDA tensors only")


@torch.library.custom_op("aegan_fast::resblock", mutates_args=())
def resblock_op(x: Tensor, w1: Tensor, w2: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor,
                running_mean1: Optional[Tensor], running_var1: Optional[Tensor], running_mean2: Optional[Tensor],
                running_var2: Optional[Tensor], training: bool, eps: float, activation: str, negative_slope: float,
                kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _no_kernel()


@torch.library.custom_op("aegan_fast::resblock_backward", mutates_args=())
def resblock_backward_op(grad_out: Tensor, x: Tensor, y1: Tensor, y2: Tensor, w1: Tensor, w2: Tensor,
                         weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, mean1: Tensor, var1: Tensor,
                         mean2: Tensor, var2: Tensor, training: bool, eps: float, activation: str,
                         negative_slope: float, kernel: str
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _no_kernel()


@torch.library.custom_op("aegan_fast::up_block", mutates_args=())
def up_block_op(x: Tensor, w: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, eps: float, kernel: str
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _no_kernel()


@torch.library.custom_op("aegan_fast::up_block_backward", mutates_args=())
def up_block_backward_op(grad_out: Tensor, x: Tensor, y: Tensor, w: Tensor, weight: Tensor, bias: Tensor,
                         mean: Tensor, var: Tensor, training: bool, eps: float, kernel: str
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _no_kernel()


@resblock_op.register_fake
def _(x, w1, w2, weight1, bias1, weight2, bias2, rm1, rv1, rm2, rv2, training, eps, activation, slope, kernel):
    return (torch.empty_like(x), torch.empty_like(x), torch.empty_like(x), *(_stats(x, training) for _ in range(4)))


@resblock_backward_op.register_fake
def _(grad_out, x, y1, y2, w1, w2, weight1, bias1, weight2, bias2, mean1, var1, mean2, var2, training, eps,
      activation, slope, kernel):
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(x), torch.empty_like(w1, **f32), torch.empty_like(w2, **f32),
            *(_stats(x, True) for _ in range(4)))


def _up_shape(x: Tensor, w: Tensor) -> tuple[int, ...]:
    return (x.shape[0], w.shape[1], 2 * x.shape[2], 2 * x.shape[3])


@up_block_op.register_fake
def _(x, w, weight, bias, running_mean, running_var, training, eps, kernel):
    y = x.new_empty(_up_shape(x, w)).contiguous(memory_format=library.memory_format(x))
    return torch.empty_like(y), y, _stats(y, training), _stats(y, training)


@up_block_backward_op.register_fake
def _(grad_out, x, y, w, weight, bias, mean, var, training, eps, kernel):
    return torch.empty_like(x), torch.empty_like(w, dtype=torch.float32), _stats(y, True), _stats(y, True)


# ---- the triton kernel ------------------------------------------------------------------------------

def _affine(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """BatchNorm as y*scale + shift per channel, in fp32 (the conv prologues take it so)."""
    scale = weight.float() * torch.rsqrt(var.float() + eps)
    return scale, bias.float() - mean.float() * scale


_IDENTITY, _RELU = activations.code("identity"), activations.code("relu")


def _triton_resblock(x, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, training, eps, activation, slope):
    from aegan_fast.kernels import bn_act, conv3x3
    act = activations.code(activation)
    y1, m1, v1 = conv3x3.conv3x3_reflect_bnact(x, w1, stats=training)
    mean1, var1 = (m1, v1) if training else (rm1, rv1)
    scale1, shift1 = _affine(g1, b1, mean1, var1, eps)
    y2, m2, v2 = conv3x3.conv3x3_reflect_bnact(y1, w2, scale1, shift1, act, slope, stats=training)
    mean2, var2 = (m2, v2) if training else (rm2, rv2)
    # BN2 with statistics already known: the BN op's eval-mode apply, with the residual added
    out, _, _ = bn_act.forward(y2, x, g2, b2, mean2, var2, False, eps, _IDENTITY, 0.0)
    if not training:
        m1, v1, m2, v2 = (_stats(x, False) for _ in range(4))
    return out, y1, y2, m1, v1, m2, v2


def _triton_resblock_backward(grad, x, y1, y2, w1, w2, g1, b1, g2, b2, mean1, var1, mean2, var2, training, eps,
                              activation, slope):
    from aegan_fast.kernels import bn_act, conv3x3
    act = activations.code(activation)
    dy2, _, dg2, db2 = bn_act.backward(grad, y2, None, g2, b2, mean2, var2, training, eps, _IDENTITY, 0.0)
    scale1, shift1 = _affine(g1, b1, mean1, var1, eps)
    dw2 = conv3x3.conv3x3_reflect_wgrad(dy2, y1, scale1, shift1, act, slope)
    # BN1's backward reductions (its grad bias / grad weight) in conv2's dgrad epilogue; da1 in fp32,
    # one rounding fewer for bf16 activations before BN1's apply pass reads it
    da1, db1, dg1 = conv3x3.conv3x3_reflect_dgrad_bn_reduce(dy2, w2, y1, mean1, var1, g1, b1, eps, act, slope,
                                                            out_dtype=torch.float32)
    # BN1's apply pass alone (its reductions are done): grad wrt y1, in y1's dtype and layout
    dy1 = bn_act.backward_apply(da1, y1, mean1, var1, g1, b1, db1, dg1, training, eps, act, slope)
    dw1 = conv3x3.conv3x3_reflect_wgrad(dy1, x)
    dx = conv3x3.conv3x3_reflect_dgrad(dy1, w1).add_(grad)
    return dx, dw1, dw2, dg1, db1, dg2, db2


def _triton_up_block(x, w, g, b, running_mean, running_var, training, eps):
    from aegan_fast.kernels import bn_act, convt4x4
    y, m, v = convt4x4.conv_transpose4x4s2_bnact(x, w, stats=training)
    mean, var = (m, v) if training else (running_mean, running_var)
    out, _, _ = bn_act.forward(y, None, g, b, mean, var, False, eps, _RELU, 0.0)
    if not training:
        m, v = _stats(y, False), _stats(y, False)
    return out, y, m, v


def _triton_up_block_backward(grad, x, y, w, g, b, mean, var, training, eps):
    from aegan_fast.kernels import bn_act, convt4x4
    dy, _, dg, db = bn_act.backward(grad, y, None, g, b, mean, var, training, eps, _RELU, 0.0)
    return convt4x4.conv_transpose4x4s2_dgrad(dy, w), convt4x4.conv_transpose4x4s2_wgrad(dy, x), dg, db


# kernel -> (resblock fwd, resblock bwd, up_block fwd, up_block bwd)
_IMPLS: dict[str, tuple[Callable, Callable, Callable, Callable]] = {
    "triton": (_triton_resblock, _triton_resblock_backward, _triton_up_block, _triton_up_block_backward),
}


def _impl(kernel: str, device: str, i: int) -> Callable:
    if kernel not in _IMPLS:
        raise RuntimeError(f"aegan_fast block ops: no kernel {kernel!r} (block kernels: {', '.join(_IMPLS)})")
    library.adapter(kernel, device)  # a clear error when the backend cannot run on this device
    return _IMPLS[kernel][i]


def _register_device_kernels(device: str) -> None:
    def fwd(x, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, training, eps, activation, slope, kernel):
        return _impl(kernel, device, 0)(x, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, training, eps, activation,
                                        slope)

    def bwd(grad, x, y1, y2, w1, w2, g1, b1, g2, b2, mean1, var1, mean2, var2, training, eps, activation, slope,
            kernel):
        return _impl(kernel, device, 1)(grad, x, y1, y2, w1, w2, g1, b1, g2, b2, mean1, var1, mean2, var2, training,
                                        eps, activation, slope)

    def up_fwd(x, w, g, b, running_mean, running_var, training, eps, kernel):
        return _impl(kernel, device, 2)(x, w, g, b, running_mean, running_var, training, eps)

    def up_bwd(grad, x, y, w, g, b, mean, var, training, eps, kernel):
        return _impl(kernel, device, 3)(grad, x, y, w, g, b, mean, var, training, eps)

    for op, fn in ((resblock_op, fwd), (resblock_backward_op, bwd), (up_block_op, up_fwd),
                   (up_block_backward_op, up_bwd)):
        torch.library.register_kernel(op, device, fn)


for _device in library.DEVICE_KERNELS:
    _register_device_kernels(_device)


# ---- the autograd formulas ------------------------------------------------------------------------

def _setup_resblock(ctx, inputs, output):
    x, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, training, eps, activation, slope, kernel = inputs
    _, y1, y2, m1, v1, m2, v2 = output
    if not training:
        m1, v1, m2, v2 = rm1, rv1, rm2, rv2
    ctx.save_for_backward(x, y1, y2, w1, w2, g1, b1, g2, b2, m1, v1, m2, v2)
    ctx.args = (training, eps, activation, slope, kernel)


def _resblock_backward(ctx, grad_out, *_unused):  # y1, y2 and the statistics are not differentiated
    x, y1, y2, w1, w2, g1, b1, g2, b2, m1, v1, m2, v2 = ctx.saved_tensors
    grad_out = grad_out.contiguous(memory_format=library.memory_format(x))
    dx, dw1, dw2, dg1, db1, dg2, db2 = resblock_backward_op(grad_out, x, y1, y2, w1, w2, g1, b1, g2, b2, m1, v1, m2,
                                                            v2, *ctx.args)
    cast = [t.to(p.dtype) for t, p in zip((dw1, dw2, dg1, db1, dg2, db2), (w1, w2, g1, b1, g2, b2))]
    return (dx, *cast) + (None,) * 9


def _setup_up_block(ctx, inputs, output):
    x, w, g, b, running_mean, running_var, training, eps, kernel = inputs
    _, y, m, v = output
    if not training:
        m, v = running_mean, running_var
    ctx.save_for_backward(x, y, w, g, b, m, v)
    ctx.args = (training, eps, kernel)


def _up_block_backward(ctx, grad_out, *_unused):
    x, y, w, g, b, m, v = ctx.saved_tensors
    grad_out = grad_out.contiguous(memory_format=library.memory_format(y))
    dx, dw, dg, db = up_block_backward_op(grad_out, x, y, w, g, b, m, v, *ctx.args)
    return (dx, dw.to(w.dtype), dg.to(g.dtype), db.to(b.dtype)) + (None,) * 5


def _not_twice_differentiable(ctx, *grads):
    raise RuntimeError("aegan_fast fused block ops are not twice differentiable (their backward has no "
                       "backward); use the reference backend (ops.use_backend('reference')) for double backward")


resblock_op.register_autograd(_resblock_backward, setup_context=_setup_resblock)
up_block_op.register_autograd(_up_block_backward, setup_context=_setup_up_block)
resblock_backward_op.register_autograd(_not_twice_differentiable)
up_block_backward_op.register_autograd(_not_twice_differentiable)


# ---- entry points -------------------------------------------------------------------------------

def _check_conv(name: str, x: Tensor, w: Tensor, shape: tuple[int, ...]) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if tuple(w.shape) != shape:
        raise ValueError(f"{name}: weight of shape {shape} expected for input {tuple(x.shape)}, "
                         f"got {tuple(w.shape)}")
    if w.device != x.device or w.dtype != x.dtype:
        raise ValueError(f"{name}: weight on {w.device} in {w.dtype}, input on {x.device} in {x.dtype}: "
                         f"they must match")


def _bn_args(bn) -> tuple[bool, float, Optional[Tensor], Optional[Tensor]]:
    """(use batch statistics, running-average factor, running mean, running var) for one of the
    fused BatchNorm modules, through its own ``forward_mode()`` (which counts num_batches_tracked)."""
    use_batch_stats, factor = bn.forward_mode()
    mean, var = bn.running_stats()
    return use_batch_stats, factor, mean, var


def _update(bn_running, mean: Tensor, var: Tensor, use_batch_stats: bool, factor: float, count: int) -> None:
    running_mean, running_var = bn_running
    if use_batch_stats and running_mean is not None and running_var is not None:
        library.update_running_stats(running_mean, running_var, mean.detach(), var.detach(), factor, count)


def run_resblock(kernel: str, x: Tensor, conv1, bn1, conv2, bn2) -> Tensor:
    """models.ResBlock's forward through ``aegan_fast::resblock`` on ``kernel``: conv1/conv2 are
    its 3x3 reflect convs (no bias), bn1 a BatchNormAct2d, bn2 a BatchNormAddAct2d with the
    identity; updates both BatchNorms' running statistics as their forward would."""
    C = x.shape[1] if x.dim() == 4 else -1
    _check_conv("resblock conv1", x, conv1.weight, (C, C, 3, 3))
    _check_conv("resblock conv2", x, conv2.weight, (C, C, 3, 3))
    if bn2.activation != "identity" or bn1.eps != bn2.eps:
        raise ValueError("resblock: the block op takes bn2 without activation and one eps for both BatchNorms")
    activations.get(bn1.activation)
    use1, f1, rm1, rv1 = _bn_args(bn1)
    use2, f2, rm2, rv2 = _bn_args(bn2)
    if use1 != use2:
        raise ValueError("resblock: both BatchNorms must be in the same mode (training or eval)")
    fmt = library.memory_format(x)
    x = x.contiguous(memory_format=fmt)
    out, _, _, m1, v1, m2, v2 = resblock_op(
        x, conv1.weight, conv2.weight, bn1.weight, bn1.bias, bn2.weight, bn2.bias,
        None if use1 else rm1, None if use1 else rv1, None if use2 else rm2, None if use2 else rv2,
        bool(use1), float(bn1.eps), bn1.activation, float(bn1.negative_slope), kernel)
    count = x.numel() // C
    _update((rm1, rv1), m1, v1, use1, f1, count)
    _update((rm2, rv2), m2, v2, use2, f2, count)
    return out


def run_up_block(kernel: str, x: Tensor, conv, bn) -> Tensor:
    """models._up(kind="transposed")'s Sequential(ConvTranspose2d(4, 2, 1, no bias), BatchNormAct2d(relu))
    through ``aegan_fast::up_block`` on ``kernel``; updates the BatchNorm's running statistics."""
    if x.dim() != 4:
        raise ValueError(f"up block: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    _check_conv("up block conv", x, conv.weight, (x.shape[1], bn.num_features, 4, 4))
    if bn.activation != "relu":
        raise ValueError(f"up block: the block op applies relu, the BatchNorm has {bn.activation}")
    use, factor, rm, rv = _bn_args(bn)
    x = x.contiguous(memory_format=library.memory_format(x))
    out, _, m, v = up_block_op(x, conv.weight, bn.weight, bn.bias, None if use else rm, None if use else rv,
                               bool(use), float(bn.eps), kernel)
    _update((rm, rv), m, v, use, factor, out.numel() // out.shape[1])
    return out
