"""act(BatchNorm2d(x) (+ residual)) in Triton: the kernels of both fused BatchNorm ops (bn_act, and
bn_add_act = bn_act with a residual) and their host functions, which speak the ops' one contract
(aegan_fast/ops/library.py's Adapter) so ``aegan_fast.ops._triton`` passes them on as they are:

    forward(x, residual?, weight?, bias?, running_mean?, running_var?, training, eps, act, slope)
        -> (y, mean, var)
    backward(grad_out, x, residual?, weight?, bias?, mean, var, training, eps, act, slope, want_dres)
        -> (grad_x, grad_residual, grad_weight, grad_bias)
    backward_apply(grad_z, x, mean, var, weight?, bias?, sum_dz, sum_dz_xhat, training, eps, act, slope)
        -> grad_x   (backward's apply pass alone, its reductions done elsewhere: the fused blocks)

Forward (training): statistics pass (``_common.batch_stats``) -> apply pass (reads x and the residual).
Backward: one reduction pass (sum dz, sum dz*xhat per channel; with a residual and a non-identity
activation it recomputes z = x*scale + shift + residual and writes dz, which *is* grad_residual)
-> one apply pass (dx, from dz recomputed, or read back when the reduction wrote it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import host
from ._common import (activate, activation_grad, batch_stats, channel_affine, channel_block, dz_xhat, sum_partials,
                      tile_offsets)
from .host import Layout, launch, or_dummy


@triton.jit
def _bn_act_fwd_kernel(x_ptr, r_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
                       C, NI, sO, sC, sI, n_tiles_i, eps, slope,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """y = act(x * scale + shift (+ residual)), scale = w * invstd, shift = b - mean * scale; one tile
    per program. The forward of bn_act and of bn_add_act (HAS_RES)."""
    c, cmask = channel_block(tl.program_id(1), C, BLOCK_C)
    mean, invstd, w, b = channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B)
    scale = w * invstd
    shift = b - mean * scale
    offs, mask, _ = tile_offsets(tl.program_id(0), c, cmask, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = x * scale[:, None] + shift[:, None]
    if HAS_RES:
        z += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = activate(z, ACT, slope)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_reduce_kernel(dy_ptr, x_ptr, r_ptr, dz_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pdz_ptr, pdzx_ptr,
                          C, NI, sO, sC, sI, n_tiles_i, n_tiles, S, eps, slope,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """Partial per-channel sums of dz and dz * xhat over tiles s, s+S, ... (grad bias, grad weight).
    With HAS_RES (a non-identity activation after the residual) z = x*scale + shift + residual, and
    dz, the residual's gradient, is written to dz_ptr for the apply pass."""
    pid_s = tl.program_id(1)
    c, cmask = channel_block(tl.program_id(0), C, BLOCK_C)
    mean, invstd, w, b = channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B)
    mean, invstd, w, b = mean[:, None], invstd[:, None], w[:, None], b[:, None]
    acc_dz = tl.zeros([BLOCK_C], tl.float32)
    acc_dzx = tl.zeros([BLOCK_C], tl.float32)
    for t in range(pid_s, n_tiles, S):
        offs, mask, _ = tile_offsets(t, c, cmask, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            scale = w * invstd
            z = x * scale + (b - mean * scale) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dz = activation_grad(dy, z, ACT, slope)  # exactly the forward's z, so the sign test agrees
            xhat = (x - mean) * invstd
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        else:
            dz, xhat = dz_xhat(dy, x, mean, invstd, w, b, slope, ACT)
        dz = tl.where(mask, dz, 0.0)
        acc_dz += tl.sum(dz, axis=1)
        acc_dzx += tl.sum(dz * xhat, axis=1)
    tl.store(pdz_ptr + pid_s * C + c, acc_dz, mask=cmask)
    tl.store(pdzx_ptr + pid_s * C + c, acc_dzx, mask=cmask)


@triton.jit
def _bn_bwd_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sdz_ptr, sdzx_ptr,
                   C, NI, sO, sC, sI, n_tiles_i, inv_count, eps, slope,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """dx = w*invstd * (dz - mean(dz) - xhat * mean(dz*xhat)) in training, w*invstd*dz in eval; dz
    recomputed from dy and x (ACT = 0 where dy already is dz)."""
    c, cmask = channel_block(tl.program_id(1), C, BLOCK_C)
    mean, invstd, w, b = channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B)
    offs, mask, _ = tile_offsets(tl.program_id(0), c, cmask, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz, xhat = dz_xhat(dy, x, mean[:, None], invstd[:, None], w[:, None], b[:, None], slope, ACT)
    k = (w * invstd)[:, None]
    if TRAINING:
        mdz = tl.load(sdz_ptr + c, mask=cmask, other=0.0) * inv_count
        mdzx = tl.load(sdzx_ptr + c, mask=cmask, other=0.0) * inv_count
        dx = k * (dz - mdz[:, None] - xhat * mdzx[:, None])
    else:
        dx = k * dz
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# host functions: the ops contract
# ----------------------------------------------------------------------------------------------

def _check_per_channel(x: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            host.check_tensor(name, t, shape=(x.shape[1],), dtypes=None, like=("x", x), contiguous=True,
                              hint="one per channel")


def forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
            running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool, eps: float,
            act: int, slope: float):
    """y = act(BatchNorm(x) (+ residual)). Returns (y, mean, var): the batch mean and biased batch
    variance in fp32 when training; empty tensors in eval mode (the running statistics are used)."""
    host.check_tensor("x", x)
    act = host.check_act(act)
    if residual is not None:
        host.check_tensor("residual", residual, shape=tuple(x.shape), like=("x", x))
    _check_per_channel(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("eval mode needs running_mean and running_var")
    if training and x.numel() // x.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    x = host.contiguous_input(x)
    lay = Layout(x)
    mean, var = batch_stats(x, lay) if training else (running_mean, running_var)
    if residual is None:
        y = torch.empty_like(x)
    else:
        residual = lay.like(residual)
        y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    launch(_bn_act_fwd_kernel)[lay.apply_grid](
        x, residual if residual is not None else x, y, mean, var, or_dummy(weight, x), or_dummy(bias, x),
        *lay.strides(), float(eps), float(slope), HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_RES=residual is not None, ACT=act, **lay.blocks())
    if not training:
        mean, var = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return y, mean, var


def backward(grad_out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor, training: bool, eps: float, act: int,
             slope: float, want_dres: bool = False):
    """(grad_x, grad_residual, grad_weight, grad_bias); grad_weight/grad_bias are fp32 per-channel
    sums. ``x`` (and ``residual``, which the ops save only for a non-identity activation) are the
    forward's; ``mean``/``var`` the batch statistics (biased variance) in training and the running
    ones in eval. grad_residual is empty without a residual or for the identity, where it is grad_out
    (the caller passes grad_out on); ``want_dres`` changes nothing here."""
    host.check_tensor("x", x)
    host.check_tensor("grad_out", grad_out, shape=tuple(x.shape), like=("x", x))
    act = host.check_act(act)
    if residual is not None:
        host.check_tensor("residual", residual, shape=tuple(x.shape), like=("x", x))
    x = host.contiguous_input(x)
    lay = Layout(x)
    grad_out = lay.like(grad_out)
    has_res = residual is not None and act != host.IDENTITY
    grad_r = torch.empty_like(x, dtype=residual.dtype) if has_res else x.new_empty(0)
    grid = lay.reduce_grid(x.device)
    S = grid[1]
    part = torch.empty((2, S, lay.C), device=x.device, dtype=torch.float32)
    launch(_bn_bwd_reduce_kernel)[grid](
        grad_out, x, lay.like(residual) if has_res else x, grad_r if has_res else grad_out, mean, var,
        or_dummy(weight, x), or_dummy(bias, x), part[0], part[1], *lay.strides(), lay.n_tiles, S, float(eps),
        float(slope), HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=has_res, ACT=act, **lay.blocks())
    sum_dz, sum_dzx = sum_partials(part[0], part[1])
    # with a residual the reduction wrote dz: the apply pass reads it as is (the identity's dz = dy)
    dz, apply_act = (grad_r, host.IDENTITY) if has_res else (grad_out, act)
    grad_x = _apply(lay, dz, x, mean, var, weight, bias, sum_dz, sum_dzx, training, eps, apply_act, slope)
    return grad_x, grad_r, sum_dzx, sum_dz


def _apply(lay, dy, x, mean, var, weight, bias, sum_dz, sum_dzx, training, eps, act, slope):
    grad_x = torch.empty_like(x)
    launch(_bn_bwd_kernel)[lay.apply_grid](
        dy, x, grad_x, mean, var, or_dummy(weight, x), or_dummy(bias, x), sum_dz, sum_dzx, *lay.strides(),
        1.0 / lay.count, float(eps), float(slope), HAS_W=weight is not None, HAS_B=bias is not None, ACT=act,
        TRAINING=bool(training), **lay.blocks())
    return grad_x


def backward_apply(grad_z: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, sum_dz: torch.Tensor,
                   sum_dzx: torch.Tensor, training: bool, eps: float, act: int, slope: float) -> torch.Tensor:
    """backward's apply pass alone, its reductions (sum dz, sum dz*xhat per channel, fp32) done
    elsewhere: the gradient w.r.t. x in x's dtype and layout, grad_z being the gradient at act's output."""
    host.check_tensor("x", x)
    host.check_tensor("grad_z", grad_z, shape=tuple(x.shape), like=("x", x))
    _check_per_channel(x, mean=mean, var=var, weight=weight, bias=bias, sum_dz=sum_dz, sum_dzx=sum_dzx)
    x = host.contiguous_input(x)
    lay = Layout(x)
    return _apply(lay, lay.like(grad_z), x, mean, var, weight, bias, sum_dz, sum_dzx, training, eps,
                  host.check_act(act), slope)
