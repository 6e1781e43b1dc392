"""act(BatchNorm2d(x)) in Triton: forward apply kernel, backward reduction + apply kernels, host
functions, and an autograd Function (the direct entry point; ``aegan_fast.ops._triton`` registers
the same host functions with torch.library).

Forward (training): statistics pass (``_common.batch_stats``) -> apply pass -> running-stat update.
Backward: one reduction pass (sum dz, sum dz*xhat per channel) -> one apply pass (dx).

memory_efficient (identity, or leaky_relu with slope > 0): only the output y is kept for backward;
the backward recovers z = act^-1(y) and xhat = (z - bias) / weight, as in-place activated
BatchNorm does. A weight of ~0 erases xhat: |weight| is floored at MIN_ABS_WEIGHT there (sign
kept), so such channels get approximate gradients instead of inf/NaN (the cpp backend does the same).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (Layout, act_code, activate, activation_grad, batch_stats, channel_affine, contiguous_input,
                      check_memory_efficient, invertible, launch, or_dummy, sum_partials, tile_offsets, update_running_stats)

MIN_ABS_WEIGHT: tl.constexpr = tl.constexpr(1e-6)


@triton.jit
def _bn_act_fwd_kernel(x_ptr, r_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
                       C, NI, sO, sC, sI, n_tiles_i, eps, slope,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """y = act(x * scale + shift (+ residual)), scale = w * invstd, shift = b - mean * scale; one tile
    per program. The forward of bn_act and of bn_add_act (HAS_RES)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, invstd, w, b = channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B)
    scale = w * invstd
    shift = b - mean * scale
    offs, imask = tile_offsets(tl.program_id(0), c, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
    mask = cmask[:, None] & imask[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = x * scale[:, None] + shift[:, None]
    if HAS_RES:
        z += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = activate(z, ACT, slope)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz_xhat(dy, src, mean, invstd, w, b, slope, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """The gradient at the pre-activation z and the normalised input xhat, from x or from y
    (per-channel arguments already broadcast to the tile)."""
    if FROM_OUTPUT:
        if ACT == 2:
            pos = src > 0
            z = tl.where(pos, src, src / slope)
            dz = tl.where(pos, dy, dy * slope)
        else:
            z = src
            dz = dy
        # |w| floored at MIN_ABS_WEIGHT (sign kept), as the cpp backend does: a channel whose weight
        # is ~0 gets approximate gradients instead of inf/NaN.
        w_safe = tl.where(w < 0, tl.minimum(w, -MIN_ABS_WEIGHT), tl.maximum(w, MIN_ABS_WEIGHT))
        xhat = (z - b) / w_safe
    else:
        xhat = (src - mean) * invstd
        if ACT == 0:
            dz = dy
        else:
            scale = w * invstd
            z = src * scale + (b - mean * scale)  # exactly the forward's z, so the sign test agrees
            dz = activation_grad(dy, z, ACT, slope)
    return dz, xhat


@triton.jit
def _bn_act_bwd_reduce_kernel(dy_ptr, src_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pdz_ptr, pdzx_ptr,
                              C, NI, sO, sC, sI, n_tiles_i, n_tiles, S, eps, slope,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                              FROM_OUTPUT: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """Partial per-channel sums of dz and dz * xhat over tiles s, s+S, ... (grad bias, grad weight)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, invstd, w, b = channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B)
    acc_dz = tl.zeros([BLOCK_C], tl.float32)
    acc_dzx = tl.zeros([BLOCK_C], tl.float32)
    for t in range(pid_s, n_tiles, S):
        offs, imask = tile_offsets(t, c, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
        mask = cmask[:, None] & imask[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        src = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz, xhat = _dz_xhat(dy, src, mean[:, None], invstd[:, None], w[:, None], b[:, None], slope,
                            ACT, FROM_OUTPUT)
        dz = tl.where(mask, dz, 0.0)
        acc_dz += tl.sum(dz, axis=1)
        acc_dzx += tl.sum(dz * xhat, axis=1)
    tl.store(pdz_ptr + pid_s * C + c, acc_dz, mask=cmask)
    tl.store(pdzx_ptr + pid_s * C + c, acc_dzx, mask=cmask)


@triton.jit
def _bn_act_bwd_kernel(dy_ptr, src_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sdz_ptr, sdzx_ptr,
                       C, NI, sO, sC, sI, n_tiles_i, inv_count, eps, slope,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                       FROM_OUTPUT: tl.constexpr, TRAINING: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """dx = w*invstd * (dz - mean(dz) - xhat * mean(dz*xhat)) in training, w*invstd*dz in eval."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, invstd, w, b = channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B)
    offs, imask = tile_offsets(tl.program_id(0), c, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
    mask = cmask[:, None] & imask[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    src = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz, xhat = _dz_xhat(dy, src, mean[:, None], invstd[:, None], w[:, None], b[:, None], slope, ACT, FROM_OUTPUT)
    k = (w * invstd)[:, None]
    if TRAINING:
        mdz = tl.load(sdz_ptr + c, mask=cmask, other=0.0) * inv_count
        mdzx = tl.load(sdzx_ptr + c, mask=cmask, other=0.0) * inv_count
        dx = k * (dz - mdz[:, None] - xhat * mdzx[:, None])
    else:
        dx = k * dz
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------

def check_inputs(x, weight, bias, running_mean, running_var, training):
    if not training and (running_mean is None or running_var is None):
        raise ValueError("eval mode needs running_mean and running_var")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.numel() != C or t.device != x.device or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous 1-D tensor of {C} elements on {x.device}")
    if training and x.numel() // C <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")


def bn_act_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                   eps: float, activation: str, negative_slope: float, residual: torch.Tensor | None = None):
    """y = act(BatchNorm(x) (+ residual)). Returns (y, mean, var): the batch mean and biased batch
    variance in fp32 when training; empty tensors in eval mode (the running statistics are used)."""
    check_inputs(x, weight, bias, running_mean, running_var, training)
    x = contiguous_input(x)
    lay = Layout(x)
    if training:
        mean, var = batch_stats(x, lay)
    else:
        mean, var = running_mean, running_var
    if residual is None:
        y = torch.empty_like(x)
    else:
        residual = lay.like(residual)
        y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    launch(_bn_act_fwd_kernel)[(lay.n_tiles, lay.n_cblocks)](
        x, or_dummy(residual, x), y, mean, var, or_dummy(weight, x), or_dummy(bias, x), *lay.strides(), float(eps),
        float(negative_slope), HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
        ACT=act_code(activation), BLOCK_C=lay.BLOCK_C, BLOCK_I=lay.BLOCK_I, INT64=lay.int64)
    if not training:
        mean, var = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return y, mean, var


def bn_act_backward(grad_y: torch.Tensor, saved: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, eps: float,
                    activation: str, negative_slope: float, from_output: bool):
    """(grad_x, grad_weight, grad_bias); grad_weight/grad_bias are fp32 per-channel sums.
    ``saved`` is x, or y when ``from_output`` (memory_efficient); ``mean``/``var`` are the batch
    statistics in training and the running ones in eval."""
    saved = contiguous_input(saved)
    lay = Layout(saved)
    grad_y = lay.like(grad_y)
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=act_code(activation),
                  FROM_OUTPUT=from_output, BLOCK_C=lay.BLOCK_C, BLOCK_I=lay.BLOCK_I, INT64=lay.int64)
    w, b = or_dummy(weight, saved), or_dummy(bias, saved)
    S = lay.splits(saved.device)
    part = torch.empty((2, S, lay.C), device=saved.device, dtype=torch.float32)
    launch(_bn_act_bwd_reduce_kernel)[(lay.n_cblocks, S)](
        grad_y, saved, mean, var, w, b, part[0], part[1], *lay.strides(), lay.n_tiles, S,
        float(eps), float(negative_slope), **common)
    sum_dz, sum_dzx = sum_partials(part[0], part[1])
    grad_x = torch.empty_like(saved)
    launch(_bn_act_bwd_kernel)[(lay.n_tiles, lay.n_cblocks)](
        grad_y, saved, grad_x, mean, var, w, b, sum_dz, sum_dzx, *lay.strides(), 1.0 / lay.count,
        float(eps), float(negative_slope), TRAINING=training, **common)
    return grad_x, sum_dzx, sum_dz


# ----------------------------------------------------------------------------------------------
# autograd Function: the direct entry point (same signature as aegan_fast.ops.bn_act)
# ----------------------------------------------------------------------------------------------

class BatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                negative_slope, memory_efficient):
        y, mean, var = bn_act_forward(x, weight, bias, running_mean, running_var, training, eps, activation,
                                      negative_slope)
        if training and running_mean is not None and running_var is not None:
            update_running_stats(running_mean, running_var, mean, var, momentum, Layout(x).count)
        if not training:
            mean, var = running_mean, running_var
        ctx.from_output = bool(memory_efficient) and invertible(activation, negative_slope)
        ctx.save_for_backward(y if ctx.from_output else x, mean, var, weight, bias)
        ctx.args = (training, eps, activation, negative_slope)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved, mean, var, weight, bias = ctx.saved_tensors
        training, eps, activation, negative_slope = ctx.args
        gx, gw, gb = bn_act_backward(grad_y, saved, mean, var, weight, bias, training, eps, activation,
                                     negative_slope, ctx.from_output)
        gw = gw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[3] else None
        gb = gb.to(bias.dtype) if bias is not None and ctx.needs_input_grad[4] else None
        return gx, None, None, gw, gb, None, None, None, None, None, None


def bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation="relu",
           negative_slope=0.01, memory_efficient=False):
    """act(BatchNorm2d(x)) with Triton kernels; the signature of ``aegan_fast.ops.bn_act``."""
    check_memory_efficient(memory_efficient, activation, negative_slope)
    return BatchNormActFunction.apply(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                      activation, negative_slope, memory_efficient)
