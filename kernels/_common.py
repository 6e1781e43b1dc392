"""Device-side pieces shared by the Triton kernels (activations, the BatchNorm affine, tile offsets, the
Welford merge) and the BatchNorm statistics pass; the host side is kernels/host.py.

The BatchNorm kernels address every (N, C, *spatial) tensor (host.Layout) as
``x[o, c, i] = base + o*sO + c*sC + i*sI``:

    NCHW contiguous:   o = n (sO = C*HW), sC = HW, i = h*W + w (NI = HW,   sI = 1)
    channels_last:     o = 0 (NO = 1),    sC = 1,  i = n*HW + h*W + w (NI = N*HW, sI = C)

so one set of kernels covers both memory formats, and the unit-stride axis (i for NCHW, c for
channels_last) is visible to Triton's contiguity analysis (Triton specialises integer arguments
equal to 1). A tile is ``[BLOCK_C, BLOCK_I]``; tiles are numbered ``t = o * n_tiles_i + i_block``.

Statistics are computed in one pass with a chunked Welford / Chan combine: each tile gives an
exact (count, mean, M2) for its channels, which is merged into the program's running
(count, mean, M2); the per-program partials are merged again, in a fixed order, by the finalize
kernel. This avoids the catastrophic cancellation of E[x^2] - E[x]^2 when |mean| >> std.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import Layout, launch


# ----------------------------------------------------------------------------------------------
# device-side helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def tile_offsets(t, c, cmask, n_tiles_i, NI, sO, sC, sI, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_I] of tile t for channels c (valid where cmask), the tile's mask, and
    its mask along i."""
    o = t // n_tiles_i
    i = (t % n_tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = i < NI
    if INT64:
        offs = o.to(tl.int64) * sO + c.to(tl.int64)[:, None] * sC + i.to(tl.int64)[None, :] * sI
    else:
        offs = o * sO + c[:, None] * sC + i[None, :] * sI
    return offs, cmask[:, None] & imask[None, :], imask


@triton.jit
def activation_grad(dy, z, ACT: tl.constexpr, slope):
    """d act(z)/dz * dy for the codes of host.ACTIVATIONS (0 identity, 1 relu, 2 leaky_relu(slope)),
    with PyTorch's convention at z == 0 (the negative side)."""
    if ACT == 1:
        dy = tl.where(z > 0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where(z > 0, dy, dy * slope)
    return dy


@triton.jit
def activate(z, ACT: tl.constexpr, slope):
    """act(z): every activation is linear on each side of 0, so act(z) = act'(z) * z."""
    return activation_grad(z, z, ACT, slope)


@triton.jit
def channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel (mean, invstd, weight, bias) in fp32."""
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    else:
        w = tl.full(mean.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(mean.shape, tl.float32)
    return mean, invstd, w, b


@triton.jit
def dz_xhat(dy, x, mean, invstd, w, b, slope, ACT: tl.constexpr):
    """The gradient at the pre-activation z = BN(x) and the normalised input xhat, from x
    (per-channel arguments already broadcast to the tile)."""
    xhat = (x - mean) * invstd
    if ACT == 0:
        dz = dy
    else:
        scale = w * invstd
        z = x * scale + (b - mean * scale)  # exactly the forward's z, so the sign test agrees
        dz = activation_grad(dy, z, ACT, slope)
    return dz, xhat


@triton.jit
def chan_merge(cnt, mean, m2, n_b, mean_b, m2_b):
    """Chan et al.: (count, mean, M2) merged with another part's (n_b, mean_b, m2_b)."""
    n_ab = cnt + n_b
    delta = mean_b - mean
    return n_ab, mean + delta * (n_b / n_ab), m2 + m2_b + delta * delta * (cnt * (n_b / n_ab))


@triton.jit
def channel_block(pid, C, BLOCK_C: tl.constexpr):
    """The channels of channel block ``pid`` and their mask."""
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C


# ----------------------------------------------------------------------------------------------
# statistics pass (the training forward of bn_act, with or without a residual)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _stats_partial_kernel(x_ptr, pcount_ptr, pmean_ptr, pm2_ptr,
                          C, NI, sO, sC, sI, n_tiles_i, n_tiles, S,
                          BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """Program (cb, s) reduces tiles s, s+S, s+2S, ... of channel block cb to (count, mean, M2)."""
    pid_s = tl.program_id(1)
    c, cmask = channel_block(tl.program_id(0), C, BLOCK_C)
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t in range(pid_s, n_tiles, S):
        offs, mask, imask = tile_offsets(t, c, cmask, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.sum(imask.to(tl.float32), axis=0)
        mean_b = tl.sum(x, axis=1) / n_b
        d = tl.where(mask, x - mean_b[:, None], 0.0)
        cnt, mean, m2 = chan_merge(cnt, mean, m2, n_b, mean_b, tl.sum(d * d, axis=1))
    out = pid_s * C + c
    tl.store(pcount_ptr + out, cnt, mask=cmask)
    tl.store(pmean_ptr + out, mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def _stats_finalize_kernel(pcount_ptr, pmean_ptr, pm2_ptr, mean_ptr, var_ptr, C, S, BLOCK_C: tl.constexpr):
    """Merge the S partials of each channel in a fixed order; write mean and biased variance."""
    c, cmask = channel_block(tl.program_id(0), C, BLOCK_C)
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s in range(0, S):
        n_b = tl.load(pcount_ptr + s * C + c, mask=cmask, other=1.0)
        mean_b = tl.load(pmean_ptr + s * C + c, mask=cmask, other=0.0)
        m2_b = tl.load(pm2_ptr + s * C + c, mask=cmask, other=0.0)
        cnt, mean, m2 = chan_merge(cnt, mean, m2, n_b, mean_b, m2_b)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, m2 / cnt, mask=cmask)


@triton.jit
def _sum_partials_kernel(pa_ptr, pb_ptr, a_ptr, b_ptr, C, S, BLOCK_C: tl.constexpr):
    """a[c] = sum_s pa[s, c]; b[c] = sum_s pb[s, c] (fixed order: deterministic)."""
    c, cmask = channel_block(tl.program_id(0), C, BLOCK_C)
    a = tl.zeros([BLOCK_C], tl.float32)
    b = tl.zeros([BLOCK_C], tl.float32)
    for s in range(0, S):
        a += tl.load(pa_ptr + s * C + c, mask=cmask, other=0.0)
        b += tl.load(pb_ptr + s * C + c, mask=cmask, other=0.0)
    tl.store(a_ptr + c, a, mask=cmask)
    tl.store(b_ptr + c, b, mask=cmask)


FINALIZE_BLOCK = 128


def batch_stats(x: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel, fp32, in one read of x."""
    grid = lay.reduce_grid(x.device)
    S = grid[1]
    part = torch.empty((3, S, lay.C), device=x.device, dtype=torch.float32)
    launch(_stats_partial_kernel)[grid](x, part[0], part[1], part[2], *lay.strides(), lay.n_tiles, S, **lay.blocks())
    return finalize_stats(part, lay.C, S)


def finalize_stats(part: torch.Tensor, C: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel from S Welford partials ``part[0..2][s, c]`` (count, mean, M2),
    merged in a fixed order: the statistics pass's, and the conv kernels' statistics epilogues'."""
    mean = torch.empty(C, device=part.device, dtype=torch.float32)
    var = torch.empty(C, device=part.device, dtype=torch.float32)
    launch(_stats_finalize_kernel)[(triton.cdiv(C, FINALIZE_BLOCK),)](
        part[0], part[1], part[2], mean, var, C, S, BLOCK_C=FINALIZE_BLOCK)
    return mean, var


def sum_partials(pa: torch.Tensor, pb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    S, C = pa.shape
    a = torch.empty(C, device=pa.device, dtype=torch.float32)
    b = torch.empty(C, device=pa.device, dtype=torch.float32)
    launch(_sum_partials_kernel)[(triton.cdiv(C, FINALIZE_BLOCK),)](pa, pb, a, b, C, S, BLOCK_C=FINALIZE_BLOCK)
    return a, b
