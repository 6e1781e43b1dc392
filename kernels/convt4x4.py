"""The up block's ConvTranspose2d(Ci, Co, 4, stride=2, padding=1, bias=False) in Triton, with the previous
BatchNorm+activation applied to the input while it is loaded (prologue) and the BatchNorm statistics of the
output gathered while it is written (epilogue), so the next BatchNorm needs no statistics pass.

    conv_transpose4x4s2_bnact(x, weight, scale, shift, act) -> (y, mean, var)   forward
    conv_transpose4x4s2_dgrad(grad_y, weight)               -> grad_a           d loss / d act(x*scale+shift)
    conv_transpose4x4s2_wgrad(grad_y, x, scale, shift, act) -> grad_weight      fp32, (Ci, Co, 4, 4)

Forward, sub-pixel decomposition: output pixel (2i+ph, 2j+pw) receives exactly the taps
kh = 1 + ph - 2*dh of input row i + dh, dh in {0, 2*ph - 1} (and the same along w), so each of the four output
phases is an implicit GEMM [input pixels x 4*Ci] @ [4*Ci x Co] with no wasted (zero-stuffed) products. The
weight is repacked on the host (a few KB) as wk[ph, pw, th, tw, ci, co] so each phase's taps are contiguous.
dgrad is the strided 4x4 conv of grad_y, an implicit GEMM [input pixels x 16*Co] @ [16*Co x Ci]. wgrad is,
per tap, [Ci x pixels] @ [pixels x Co]; see its kernel for the reduction order.

Every tensor is addressed through its four strides, so NCHW and channels_last (and any other strides) run the
same kernels; outputs take x's (grad_y's) memory format. ``act`` is an activation code of host.ACTIVATIONS;
the arguments are checked by the host layer (kernels/host.py: ValueError; activations and weights share one
dtype, fp32, bf16 or fp16; int64 offsets where host.needs_int64 says so). The products accumulate in fp32,
fp32 dots in IEEE precision (no TF32), so fp32 matches PyTorch to ~1e-6 of scale. Block sizes on a GPU are
untuned defaults (no GPU was available to tune them); under the interpreter they are large, so few programs run.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from . import host
from ._common import activate, finalize_stats
from .host import block, interpreting, launch, memory_format, needs_int64, or_dummy

# tests only: force small pixel blocks / several wgrad splits so multi-program paths run on small tensors
BLOCK_P_OVERRIDE: int | None = None
SPLITS_OVERRIDE: int | None = None

# Phase ph's tap th reads input row i + th*(2*ph - 1) with kernel row 1 + ph - 2*th*(2*ph - 1).
_TAP_K = ((1, 3), (2, 0))

if "input_precision" in inspect.signature(tl.dot).parameters:  # triton >= 3.0
    @triton.jit
    def _dot_ieee(a, b, acc):
        return tl.dot(a, b, acc, input_precision="ieee")
else:
    @triton.jit
    def _dot_ieee(a, b, acc):
        return tl.dot(a, b, acc, allow_tf32=False)


if interpreting():
    # The interpreter (triton 3.8, create_dot) multiplies bf16 dot operands as their raw 16-bit patterns.
    # Upcasting first is exact: a product of two bf16 (or fp16) values fits fp32's mantissa, so this is what
    # the GPU's bf16 dot with fp32 accumulation computes, up to the order of the sum.
    @triton.jit
    def _mma(a, b, acc):
        return _dot_ieee(a.to(tl.float32), b.to(tl.float32), acc)
else:
    @triton.jit
    def _mma(a, b, acc):
        """acc + a @ b in fp32; fp32 operands without TF32 (it would cost ~1e-3 relative)."""
        if a.dtype == tl.float32:
            acc = _dot_ieee(a, b, acc)
        else:
            acc = tl.dot(a, b, acc)
        return acc


@triton.jit
def _pixels(pid, P, H, W, BLOCK_P: tl.constexpr):
    """The input pixels (n, i, j) of pixel block pid, and their mask."""
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    HW = H * W
    n = p // HW
    r = p % HW
    return n, r // W, r % W, p < P


@triton.jit
def _off(n, h, w, sn, sh, sw, INT64: tl.constexpr):
    if INT64:
        return n.to(tl.int64) * sn + h.to(tl.int64) * sh + w.to(tl.int64) * sw
    return n * sn + h * sh + w * sw


@triton.jit
def _prologue(x, c, cmask, valid, scale_ptr, shift_ptr, slope, HAS_AFFINE: tl.constexpr, ACT: tl.constexpr,
              C_AXIS: tl.constexpr):
    """act(x * scale[c] + shift[c]) in fp32, and 0 where the tile is padding or out of range: the conv's zero
    padding is of the activated input (act(0*scale + shift) is not 0 in general)."""
    x = x.to(tl.float32)
    if HAS_AFFINE:
        sc = tl.load(scale_ptr + c, mask=cmask, other=0.0)
        sh = tl.load(shift_ptr + c, mask=cmask, other=0.0)
        if C_AXIS == 1:
            z = x * sc[None, :] + sh[None, :]
        else:
            z = x * sc[:, None] + sh[:, None]
        x = tl.where(valid, activate(z, ACT, slope), 0.0)
    return x


@triton.jit
def _convt_fwd_kernel(x_ptr, wt_ptr, scale_ptr, shift_ptr, y_ptr, pcount_ptr, pmean_ptr, pm2_ptr,
                      P, H, W, Ci, Co, sxn, sxc, sxh, sxw, syn, syc, syh, syw, n_pblocks, slope,
                      HAS_AFFINE: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, INT64: tl.constexpr):
    """Program (pixel block, co block, phase): y[n, co, 2i+ph, 2j+pw] for its pixels, and (STATS) the exact
    (count, mean, M2) of those outputs per channel as partial s = phase * n_pblocks + pixel block."""
    pid_p = tl.program_id(0)
    phase = tl.program_id(2)
    ph = phase // 2
    pw = phase % 2
    n, i, j, pmask = _pixels(pid_p, P, H, W, BLOCK_P)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < Co
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_P, BLOCK_CO], tl.float32)
    for th in tl.static_range(2):
        ih = i + th * (2 * ph - 1)
        hok = pmask & (ih >= 0) & (ih < H)
        for tw in tl.static_range(2):
            iw = j + tw * (2 * pw - 1)
            ok = hok & (iw >= 0) & (iw < W)
            base = _off(n, ih, iw, sxn, sxh, sxw, INT64)
            wbase = wt_ptr + (phase * 4 + th * 2 + tw) * Ci * Co
            for c0 in range(0, Ci, BLOCK_K):
                c = c0 + k
                cmask = c < Ci
                m = ok[:, None] & cmask[None, :]
                a = tl.load(x_ptr + base[:, None] + c[None, :] * sxc, mask=m, other=0.0)
                a = _prologue(a, c, cmask, m, scale_ptr, shift_ptr, slope, HAS_AFFINE, ACT, 1)
                b = tl.load(wbase + c[:, None] * Co + co[None, :], mask=cmask[:, None] & comask[None, :], other=0.0)
                acc = _mma(a.to(b.dtype), b, acc)
    yoff = _off(n, 2 * i + ph, 2 * j + pw, syn, syh, syw, INT64)
    tl.store(y_ptr + yoff[:, None] + co[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
             mask=pmask[:, None] & comask[None, :])
    if STATS:
        # the tile's own mean first, then squared deviations from it: no E[y^2] - E[y]^2 cancellation
        n_b = tl.sum(pmask.to(tl.float32), axis=0)
        mean_b = tl.sum(tl.where(pmask[:, None], acc, 0.0), axis=0) / n_b
        d = tl.where(pmask[:, None], acc - mean_b[None, :], 0.0)
        out = (phase * n_pblocks + pid_p) * Co + co
        tl.store(pcount_ptr + out, tl.zeros([BLOCK_CO], tl.float32) + n_b, mask=comask)
        tl.store(pmean_ptr + out, mean_b, mask=comask)
        tl.store(pm2_ptr + out, tl.sum(d * d, axis=0), mask=comask)


@triton.jit
def _convt_dgrad_kernel(dy_ptr, wt_ptr, dx_ptr, P, H, W, Ci, Co, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                        BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr, INT64: tl.constexpr):
    """Program (pixel block, ci block): dx[n, ci, i, j] = sum over co, kh, kw of
    dy[n, co, 2i-1+kh, 2j-1+kw] * w[ci, co, kh, kw] (wt holds w as [kh, kw, co, ci])."""
    n, i, j, pmask = _pixels(tl.program_id(0), P, H, W, BLOCK_P)
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    cimask = ci < Ci
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_P, BLOCK_CI], tl.float32)
    for kh in tl.static_range(4):
        oh = 2 * i - 1 + kh
        hok = pmask & (oh >= 0) & (oh < 2 * H)
        for kw in tl.static_range(4):
            ow = 2 * j - 1 + kw
            ok = hok & (ow >= 0) & (ow < 2 * W)
            base = _off(n, oh, ow, sgn, sgh, sgw, INT64)
            wbase = wt_ptr + (kh * 4 + kw) * Co * Ci
            for c0 in range(0, Co, BLOCK_K):
                c = c0 + k
                cmask = c < Co
                a = tl.load(dy_ptr + base[:, None] + c[None, :] * sgc, mask=ok[:, None] & cmask[None, :], other=0.0)
                b = tl.load(wbase + c[:, None] * Ci + ci[None, :], mask=cmask[:, None] & cimask[None, :], other=0.0)
                acc = _mma(a, b, acc)
    xoff = _off(n, i, j, sxn, sxh, sxw, INT64)
    tl.store(dx_ptr + xoff[:, None] + ci[None, :] * sxc, acc.to(dx_ptr.dtype.element_ty),
             mask=pmask[:, None] & cimask[None, :])


@triton.jit
def _convt_wgrad_kernel(x_ptr, dy_ptr, scale_ptr, shift_ptr, pdw_ptr, P, H, W, Ci, Co,
                        sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, n_pblocks, n_coblocks, S, slope,
                        HAS_AFFINE: tl.constexpr, ACT: tl.constexpr, BLOCK_CI: tl.constexpr,
                        BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """Program (tap, ci x co block, split s): partial s of dw[ci, co, kh, kw] = sum over pixel blocks
    s, s+S, ... of a[n, ci, i, j] * dy[n, co, 2i-1+kh, 2j-1+kw], a = act(x*scale + shift) recomputed here.
    Reduction order: each program sums its blocks in a fixed order into an fp32 accumulator; the host sums
    the S partials with one fixed-shape torch.sum (no atomics: deterministic run to run)."""
    tap = tl.program_id(0)
    kh = tap // 4
    kw = tap % 4
    ci = (tl.program_id(1) // n_coblocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = (tl.program_id(1) % n_coblocks) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    cimask = ci < Ci
    comask = co < Co
    pid_s = tl.program_id(2)
    acc = tl.zeros([BLOCK_CI, BLOCK_CO], tl.float32)
    for pb in range(pid_s, n_pblocks, S):
        n, i, j, pmask = _pixels(pb, P, H, W, BLOCK_P)
        m = cimask[:, None] & pmask[None, :]
        xoff = _off(n, i, j, sxn, sxh, sxw, INT64)
        a = tl.load(x_ptr + ci[:, None] * sxc + xoff[None, :], mask=m, other=0.0)
        a = _prologue(a, ci, cimask, m, scale_ptr, shift_ptr, slope, HAS_AFFINE, ACT, 0)
        oh = 2 * i - 1 + kh
        ow = 2 * j - 1 + kw
        ok = pmask & (oh >= 0) & (oh < 2 * H) & (ow >= 0) & (ow < 2 * W)
        goff = _off(n, oh, ow, sgn, sgh, sgw, INT64)
        g = tl.load(dy_ptr + goff[:, None] + co[None, :] * sgc, mask=ok[:, None] & comask[None, :], other=0.0)
        acc = _mma(a.to(g.dtype), g, acc)
    out = ((pid_s * Ci + ci[:, None]) * Co + co[None, :]) * 16 + tap
    tl.store(pdw_ptr + out, acc, mask=cimask[:, None] & comask[None, :])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------

# GPU blocks: untuned defaults (no GPU was available to tune them); the host shrinks them for small C.
FWD_BLOCKS = dict(BLOCK_P=64, BLOCK_CO=64, BLOCK_K=32)
DGRAD_BLOCKS = dict(BLOCK_P=64, BLOCK_CI=64, BLOCK_K=32)
WGRAD_BLOCKS = dict(BLOCK_CI=64, BLOCK_CO=64, BLOCK_P=32)


def _block_p(P: int, gpu_default: int) -> int:
    if BLOCK_P_OVERRIDE is not None:
        return BLOCK_P_OVERRIDE
    return block(P, 1024) if interpreting() else gpu_default


def _block_k(C: int, gpu_default: int) -> int:
    return block(C, 64 if interpreting() else gpu_default)


def _check_weight(weight: torch.Tensor, shape: tuple, like: tuple[str, torch.Tensor]) -> None:
    host.check_tensor("weight", weight, shape=shape, like=like, same_dtype=True, hint="a ConvTranspose2d weight")


def _forward_weight(weight: torch.Tensor) -> torch.Tensor:
    """wk[ph, pw, th, tw, ci, co] = weight[ci, co, _TAP_K[ph][th], _TAP_K[pw][tw]]."""
    k = torch.tensor(_TAP_K, device=weight.device)
    w = weight[:, :, k][..., k]  # (Ci, Co, ph, th, pw, tw)
    return w.permute(2, 4, 3, 5, 0, 1).contiguous()


def conv_transpose4x4s2_bnact(x, weight, scale=None, shift=None, act=0, negative_slope=0.2, stats=True):
    """y = conv_transpose2d(act(x*scale[c] + shift[c]), weight, stride=2, padding=1), no bias, output (N, Co, 2H, 2W).
    x (N, Ci, H, W) NCHW- or channels_last-contiguous; weight (Ci, Co, 4, 4) (ConvTranspose2d's layout).
    scale/shift fp32 (Ci,) or both None (no prologue; act must then be the identity).
    Returns y in x's dtype and memory format and (when stats) per-output-channel batch mean and *biased* variance of y,
    fp32, from the fp32 accumulator."""
    host.check_tensor("x", x, dim=4, hint="N, C, H, W")
    N, Ci, H, W = x.shape
    _check_weight(weight, (Ci, None, 4, 4), ("x", x))
    act = host.check_prologue(x, scale, shift, act)
    Co = weight.shape[1]
    y = torch.empty((N, Co, 2 * H, 2 * W), device=x.device, dtype=x.dtype, memory_format=memory_format(x))
    P = N * H * W
    BLOCK_P = _block_p(P, FWD_BLOCKS["BLOCK_P"])
    BLOCK_CO = block(Co, FWD_BLOCKS["BLOCK_CO"])
    n_pblocks = triton.cdiv(P, BLOCK_P)
    S = 4 * n_pblocks
    part = torch.empty((3, S, Co), device=x.device, dtype=torch.float32) if stats else None
    p0, p1, p2 = (part[0], part[1], part[2]) if stats else (or_dummy(None, x),) * 3
    launch(_convt_fwd_kernel)[(n_pblocks, triton.cdiv(Co, BLOCK_CO), 4)](
        x, _forward_weight(weight), or_dummy(scale, x), or_dummy(shift, x), y, p0, p1, p2,
        P, H, W, Ci, Co, *x.stride(), *y.stride(), n_pblocks, float(negative_slope),
        HAS_AFFINE=scale is not None, ACT=act, STATS=bool(stats), BLOCK_P=BLOCK_P, BLOCK_CO=BLOCK_CO,
        BLOCK_K=_block_k(Ci, FWD_BLOCKS["BLOCK_K"]), INT64=needs_int64(x, y))
    if not stats:
        return y, None, None
    return (y, *finalize_stats(part, Co, S))


def conv_transpose4x4s2_dgrad(grad_y, weight, out_dtype=None):
    """d loss / d a (the conv's activated input), (N, Ci, H, W) = conv2d(grad_y, weight, stride=2, padding=1)."""
    host.check_tensor("grad_y", grad_y, dim=4, hint="N, C, H, W")
    N, Co, Ho, Wo = grad_y.shape
    if Ho % 2 or Wo % 2:
        raise ValueError(f"grad_y's spatial size {Ho}x{Wo} is not the (2H, 2W) of a 4x4 stride-2 ConvTranspose2d")
    _check_weight(weight, (None, Co, 4, 4), ("grad_y", grad_y))
    Ci = weight.shape[0]
    out_dtype = grad_y.dtype if out_dtype is None else out_dtype
    host.check_dtype("out_dtype", out_dtype)
    H, W = Ho // 2, Wo // 2
    dx = torch.empty((N, Ci, H, W), device=grad_y.device, dtype=out_dtype, memory_format=memory_format(grad_y))
    P = N * H * W
    BLOCK_P = _block_p(P, DGRAD_BLOCKS["BLOCK_P"])
    BLOCK_CI = block(Ci, DGRAD_BLOCKS["BLOCK_CI"])
    launch(_convt_dgrad_kernel)[(triton.cdiv(P, BLOCK_P), triton.cdiv(Ci, BLOCK_CI))](
        grad_y, weight.permute(2, 3, 1, 0).contiguous(), dx, P, H, W, Ci, Co, *grad_y.stride(), *dx.stride(),
        BLOCK_P=BLOCK_P, BLOCK_CI=BLOCK_CI, BLOCK_K=_block_k(Co, DGRAD_BLOCKS["BLOCK_K"]),
        INT64=needs_int64(grad_y, dx))
    return dx


def conv_transpose4x4s2_wgrad(grad_y, x, scale=None, shift=None, act=0, negative_slope=0.2):
    """d loss / d weight, fp32 (Ci, Co, 4, 4); a = act(x*scale+shift) RECOMPUTED in the load prologue."""
    host.check_tensor("x", x, dim=4, hint="N, C, H, W")
    N, Ci, H, W = x.shape
    host.check_tensor("grad_y", grad_y, shape=(N, None, 2 * H, 2 * W), like=("x", x), same_dtype=True,
                      hint="the ConvTranspose2d 4x4 s2 output (N, Co, 2H, 2W)")
    act = host.check_prologue(x, scale, shift, act)
    Co = grad_y.shape[1]
    P = N * H * W
    BLOCK_P = _block_p(P, WGRAD_BLOCKS["BLOCK_P"])
    BLOCK_CI = block(Ci, WGRAD_BLOCKS["BLOCK_CI"])
    BLOCK_CO = block(Co, WGRAD_BLOCKS["BLOCK_CO"])
    n_pblocks = triton.cdiv(P, BLOCK_P)
    n_coblocks = triton.cdiv(Co, BLOCK_CO)
    n_blocks = triton.cdiv(Ci, BLOCK_CI) * n_coblocks
    S = min(SPLITS_OVERRIDE or host.splits(x.device, n_pblocks, 16 * n_blocks), n_pblocks)
    part = torch.empty((S, Ci, Co, 4, 4), device=x.device, dtype=torch.float32)
    launch(_convt_wgrad_kernel)[(16, n_blocks, S)](
        x, grad_y, or_dummy(scale, x), or_dummy(shift, x), part,
        P, H, W, Ci, Co, *x.stride(), *grad_y.stride(), n_pblocks, n_coblocks, S, float(negative_slope),
        HAS_AFFINE=scale is not None, ACT=act, BLOCK_CI=BLOCK_CI, BLOCK_CO=BLOCK_CO, BLOCK_P=BLOCK_P,
        INT64=needs_int64(x, grad_y))
    return part[0] if S == 1 else part.sum(0)
