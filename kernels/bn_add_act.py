"""act(BatchNorm2d(x) + residual) in Triton: the end of a residual block.

Forward (training): statistics pass -> apply pass (bn_act's kernel with HAS_RES: reads x and residual).
Backward: the reduction pass reads grad_y, x and residual, recomputes z = x*scale + shift + residual,
writes dz = act'(z) * grad_y (which *is* grad_residual) and sums dz, dz*xhat per channel; the apply
pass reads dz and x for grad_x. With identity activation dz = grad_y and nothing is written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (Layout, act_code, activation_grad, channel_affine, contiguous_input, launch, or_dummy,
                      sum_partials, tile_offsets)
from .bn_act import bn_act_forward


@triton.jit
def _bn_add_act_bwd_reduce_kernel(dy_ptr, x_ptr, r_ptr, dz_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pdz_ptr, pdzx_ptr,
                                  C, NI, sO, sC, sI, n_tiles_i, n_tiles, S, eps, slope,
                                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                                  BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, invstd, w, b = channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B)
    scale = w * invstd
    shift = b - mean * scale
    acc_dz = tl.zeros([BLOCK_C], tl.float32)
    acc_dzx = tl.zeros([BLOCK_C], tl.float32)
    for t in range(pid_s, n_tiles, S):
        offs, imask = tile_offsets(t, c, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
        mask = cmask[:, None] & imask[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:
            dz = dy
        else:
            r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = x * scale[:, None] + shift[:, None] + r  # exactly the forward's z
            dz = activation_grad(dy, z, ACT, slope)
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        xhat = (x - mean[:, None]) * invstd[:, None]
        dz = tl.where(mask, dz, 0.0)
        acc_dz += tl.sum(dz, axis=1)
        acc_dzx += tl.sum(dz * xhat, axis=1)
    tl.store(pdz_ptr + pid_s * C + c, acc_dz, mask=cmask)
    tl.store(pdzx_ptr + pid_s * C + c, acc_dzx, mask=cmask)


@triton.jit
def _bn_add_act_bwd_kernel(dz_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, sdz_ptr, sdzx_ptr,
                           C, NI, sO, sC, sI, n_tiles_i, inv_count, eps,
                           HAS_W: tl.constexpr, TRAINING: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, invstd, w, b = channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, w_ptr, eps, HAS_W, False)
    offs, imask = tile_offsets(tl.program_id(0), c, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
    mask = cmask[:, None] & imask[None, :]
    dz = tl.load(dz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = (w * invstd)[:, None]
    if TRAINING:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * invstd[:, None]
        mdz = tl.load(sdz_ptr + c, mask=cmask, other=0.0) * inv_count
        mdzx = tl.load(sdzx_ptr + c, mask=cmask, other=0.0) * inv_count
        dx = k * (dz - mdz[:, None] - xhat * mdzx[:, None])
    else:
        dx = k * dz
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------

def bn_add_act_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                       running_var: torch.Tensor | None, training: bool, eps: float, activation: str,
                       negative_slope: float):
    """y = act(BatchNorm(x) + residual). Returns (y, mean, var) as ``bn_act_forward`` does, whose
    kernel it runs with the residual added before the activation."""
    if residual.shape != x.shape or residual.device != x.device:
        raise ValueError(f"residual must match x: got {tuple(residual.shape)} for {tuple(x.shape)}")
    return bn_act_forward(x, weight, bias, running_mean, running_var, training, eps, activation, negative_slope,
                          residual=residual)


def bn_add_act_backward(grad_y: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, mean: torch.Tensor,
                        var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool,
                        eps: float, activation: str, negative_slope: float):
    """(grad_x, grad_weight, grad_bias, grad_residual); grad_residual is an empty tensor for the
    identity activation, where it equals grad_y (the caller passes grad_y on)."""
    x = contiguous_input(x)
    lay = Layout(x)
    grad_y, residual = lay.like(grad_y), lay.like(residual)
    act = act_code(activation)
    grad_r = torch.empty_like(x, dtype=residual.dtype) if act != 0 else x.new_empty(0)
    w, b = or_dummy(weight, x), or_dummy(bias, x)
    S = lay.splits(x.device)
    part = torch.empty((2, S, lay.C), device=x.device, dtype=torch.float32)
    launch(_bn_add_act_bwd_reduce_kernel)[(lay.n_cblocks, S)](
        grad_y, x, residual, grad_r if act != 0 else grad_y, mean, var, w, b, part[0], part[1], *lay.strides(),
        lay.n_tiles, S, float(eps), float(negative_slope), HAS_W=weight is not None, HAS_B=bias is not None,
        ACT=act, BLOCK_C=lay.BLOCK_C, BLOCK_I=lay.BLOCK_I, INT64=lay.int64)
    sum_dz, sum_dzx = sum_partials(part[0], part[1])
    grad_x = torch.empty_like(x)
    launch(_bn_add_act_bwd_kernel)[(lay.n_tiles, lay.n_cblocks)](
        grad_r if act != 0 else grad_y, x, grad_x, mean, var, w, sum_dz, sum_dzx, *lay.strides(),
        1.0 / lay.count, float(eps), HAS_W=weight is not None, TRAINING=training,
        BLOCK_C=lay.BLOCK_C, BLOCK_I=lay.BLOCK_I, INT64=lay.int64)
    return grad_x, sum_dzx, sum_dz, grad_r
