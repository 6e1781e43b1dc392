"""act(BatchNorm2d(x)) in Triton: forward apply kernel, backward reduction + apply kernels and their
host functions (``aegan_fast.ops._triton`` puts them behind the fused ops' one contract).

Forward (training): statistics pass (``_common.batch_stats``) -> apply pass -> running-stat update.
Backward: one reduction pass (sum dz, sum dz*xhat per channel) -> one apply pass (dx).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (Layout, act_code, activate, activation_grad, batch_stats, channel_affine, contiguous_input,
                      launch, or_dummy, sum_partials, tile_offsets)


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
def _dz_xhat(dy, x, mean, invstd, w, b, slope, ACT: tl.constexpr):
    """The gradient at the pre-activation z and the normalised input xhat, from x (per-channel
    arguments already broadcast to the tile)."""
    xhat = (x - mean) * invstd
    if ACT == 0:
        dz = dy
    else:
        scale = w * invstd
        z = x * scale + (b - mean * scale)  # exactly the forward's z, so the sign test agrees
        dz = activation_grad(dy, z, ACT, slope)
    return dz, xhat


@triton.jit
def _bn_act_bwd_reduce_kernel(dy_ptr, src_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pdz_ptr, pdzx_ptr,
                              C, NI, sO, sC, sI, n_tiles_i, n_tiles, S, eps, slope,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
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
        dz, xhat = _dz_xhat(dy, src, mean[:, None], invstd[:, None], w[:, None], b[:, None], slope, ACT)
        dz = tl.where(mask, dz, 0.0)
        acc_dz += tl.sum(dz, axis=1)
        acc_dzx += tl.sum(dz * xhat, axis=1)
    tl.store(pdz_ptr + pid_s * C + c, acc_dz, mask=cmask)
    tl.store(pdzx_ptr + pid_s * C + c, acc_dzx, mask=cmask)


@triton.jit
def _bn_act_bwd_kernel(dy_ptr, src_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sdz_ptr, sdzx_ptr,
                       C, NI, sO, sC, sI, n_tiles_i, inv_count, eps, slope,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                       TRAINING: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """dx = w*invstd * (dz - mean(dz) - xhat * mean(dz*xhat)) in training, w*invstd*dz in eval."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, invstd, w, b = channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B)
    offs, imask = tile_offsets(tl.program_id(0), c, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
    mask = cmask[:, None] & imask[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    src = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz, xhat = _dz_xhat(dy, src, mean[:, None], invstd[:, None], w[:, None], b[:, None], slope, ACT)
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
                    activation: str, negative_slope: float):
    """(grad_x, grad_weight, grad_bias); grad_weight/grad_bias are fp32 per-channel sums.
    ``saved`` is the forward's x; ``mean``/``var`` are the batch statistics (biased variance) in
    training and the running ones in eval."""
    saved = contiguous_input(saved)
    lay = Layout(saved)
    grad_y = lay.like(grad_y)
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=act_code(activation),
                  BLOCK_C=lay.BLOCK_C, BLOCK_I=lay.BLOCK_I, INT64=lay.int64)
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
