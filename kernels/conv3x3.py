"""3x3 reflect-padded convolution (stride 1, no bias) in Triton, with the previous BatchNorm+activation
applied while loading its input and the BatchNorm statistics of its output gathered while writing it
(the "scale-bias-act-conv + BN stats" fusion of MLPerf ResNet / cuDNN graphs): forward, data
gradient and weight gradient as implicit GEMMs on ``tl.dot``.

    conv3x3_reflect_bnact(x, weight, scale, shift, act, negative_slope, stats) -> (y, mean, var)
    conv3x3_reflect_dgrad(grad_y, weight, out_dtype) -> grad_a
    conv3x3_reflect_dgrad_bn_reduce(grad_y, weight, y_prev, mean, var, ...) -> (grad_a, sum_dz, sum_dz_xhat)
    conv3x3_reflect_wgrad(grad_y, x, scale, shift, act, negative_slope) -> grad_weight (fp32)

``act`` is an activation code of host.ACTIVATIONS; the arguments are checked by the host layer
(kernels/host.py: ValueError, dtypes fp32/bf16/fp16, activations and weights in one dtype).

Tensors are NCHW- or channels_last-contiguous; the constexpr ``CL`` picks the layout and the kernels
derive every stride from the shape, so the unit stride (w for NCHW, c for channels_last) is a
compile-time constant. Reflect padding is index arithmetic (-1 -> 1, H -> H-2): no padded copy.
Pixels are flattened over (n, h, w), so a tile of output rows may span images. Offsets are int32,
or int64 (the constexpr ``INT64``) where host.needs_int64 says a tensor needs it.

Weights are re-arranged on the host into ``(9, K, Nout)`` (tap, reduction channel, output channel)
so a [BLOCK_K, BLOCK_N] weight tile is one contiguous 2-D load; that copy is 9*Ci*Co elements.

Block sizes on a GPU are sensible defaults, not tuned: tuning needs a GPU, and none was available
when this was written. Under the interpreter the blocks are large and the programs few (it runs
one program at a time).
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from . import host
from ._common import activate, channel_affine, dz_xhat, finalize_stats, sum_partials
from .host import block, contiguous_input, interpreting, launch, memory_format, needs_int64, or_dummy

# tests only: force small blocks / several splits so multi-block loops and cross-program merges run
# on small tensors. Keys: BLOCK_M, BLOCK_N, BLOCK_K (forward, dgrad), BLOCK_P, SPLITS (wgrad).
BLOCK_OVERRIDE: dict | None = None

# fp32 operands must not be rounded to TF32 (parity with F.conv2d to 1e-5): triton >= 3.0 spells it
# input_precision="ieee", older releases allow_tf32=False.
_IEEE_KW = tl.constexpr("input_precision" in inspect.signature(tl.dot).parameters)
# The interpreter (triton 3.8) keeps bf16 as uint16 and its dot multiplies the bit patterns: feed it
# fp32 copies there (exact for bf16 values, and the products are then exact, as on tensor cores).
_DOT_UPCAST = tl.constexpr(interpreting())


@triton.jit
def _dot(a, b, acc):
    if _DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if _IEEE_KW:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, allow_tf32=False)
    return acc


@triton.jit
def _reflect(i, L):
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= L, 2 * L - 2 - i, i)


@triton.jit
def _pixels(pid, M, H, W, BLOCK_M: tl.constexpr):
    """The pixels (n, h, w) of block pid of the N*H*W flattened pixels, and their mask."""
    m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    HW = H * W
    return m // HW, (m % HW) // W, m % W, m < M


@triton.jit
def _pixel_offset(n, h, w, C, H, W, CL: tl.constexpr, INT64: tl.constexpr):
    """Offset of channel 0 at pixel (n, h, w) of a (N, C, H, W) tensor."""
    if INT64:
        n = n.to(tl.int64)
    if CL:
        return ((n * H + h) * W + w) * C
    else:
        return n * C * H * W + h * W + w


@triton.jit
def _channel_stride(H, W, CL: tl.constexpr, INT64: tl.constexpr):
    if CL:
        return 1
    elif INT64:
        return H.to(tl.int64) * W
    else:
        return H * W


@triton.jit
def _tap_accumulate(acc, src_ptr, pix, rmask, wt_ptr, tap, scale_ptr, shift_ptr, slope, K, Nout, ks, cn, cnmask,
                    HAS_PRO: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[m, :] += a[pix[m], :] @ wt[tap] over all K channels, a = act(src*scale + shift) (or src)."""
    k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        kmask = kk < K
        a = tl.load(src_ptr + pix[:, None] + kk[None, :] * ks, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if HAS_PRO:
            # masked channels: scale = shift = 0, so a = act(0) = 0 there
            sc = tl.load(scale_ptr + kk, mask=kmask, other=0.0)
            sh = tl.load(shift_ptr + kk, mask=kmask, other=0.0)
            a = activate(a.to(tl.float32) * sc[None, :] + sh[None, :], ACT, slope).to(src_ptr.dtype.element_ty)
        b = tl.load(wt_ptr + (tap * K + kk)[:, None] * Nout + cn[None, :], mask=kmask[:, None] & cnmask[None, :],
                    other=0.0)
        acc = _dot(a, b, acc)
    return acc


@triton.jit
def _conv3x3_fwd_kernel(x_ptr, wt_ptr, y_ptr, scale_ptr, shift_ptr, pcount_ptr, pmean_ptr, pm2_ptr,
                        N, Ci, Co, H, W, slope,
                        HAS_PRO: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr, CL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT64: tl.constexpr):
    """y[m, co-block] for BLOCK_M output pixels; with STATS the tile's exact (count, mean, M2) per
    output channel goes to partial row pid_m (merged by _stats_finalize_kernel)."""
    pid_m = tl.program_id(0)
    n, h, w, mmask = _pixels(pid_m, N * H * W, H, W, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < Co
    xcs = _channel_stride(H, W, CL, INT64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kh in tl.static_range(3):
        ih = _reflect(h + (kh - 1), H)
        for kw in tl.static_range(3):
            iw = _reflect(w + (kw - 1), W)
            pix = _pixel_offset(n, ih, iw, Ci, H, W, CL, INT64)
            acc = _tap_accumulate(acc, x_ptr, pix, mmask, wt_ptr, kh * 3 + kw, scale_ptr, shift_ptr, slope, Ci, Co,
                                  xcs, co, comask, HAS_PRO, ACT, BLOCK_K)
    out = _pixel_offset(n, h, w, Co, H, W, CL, INT64)
    mask = mmask[:, None] & comask[None, :]
    tl.store(y_ptr + out[:, None] + co[None, :] * xcs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    if STATS:
        # from the fp32 accumulator; tile mean first, then squared deviations (no E[y^2]-E[y]^2)
        cnt = tl.sum(mmask.to(tl.float32), axis=0)
        mean = tl.sum(tl.where(mask, acc, 0.0), axis=0) / cnt
        d = tl.where(mask, acc - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        tl.store(pcount_ptr + pid_m * Co + co, tl.zeros([BLOCK_N], tl.float32) + cnt, mask=comask)
        tl.store(pmean_ptr + pid_m * Co + co, mean, mask=comask)
        tl.store(pm2_ptr + pid_m * Co + co, m2, mask=comask)


@triton.jit
def _dgrad_source(c, KK: tl.constexpr, REFLECTED: tl.constexpr, L):
    """Along one axis, the dy index feeding input index c through tap KK, and where it exists: the
    interior source c + 1 - KK, or the reflected one (row 0 feeds row 1 through KK = 0, row L-1
    feeds row L-2 through KK = 2; only for KK != 1)."""
    if not REFLECTED:
        q = c + (1 - KK)
        ok = (q >= 0) & (q < L)
    elif KK == 0:
        q = c * 0
        ok = c == 1
    else:
        q = c * 0 + (L - 1)
        ok = c == L - 2
    return q, ok


@triton.jit
def _dgrad_tap(acc, dy_ptr, wt_ptr, n, h, w, mmask, H, W, Ci, Co, ci, cimask,
               KH: tl.constexpr, KW: tl.constexpr, CL: tl.constexpr, BLOCK_K: tl.constexpr, INT64: tl.constexpr):
    """acc += (sum of the up to 4 dy sources of tap (KH, KW)) @ W[tap]^T. The sources of one tap
    share its weights, so they are added before the dot (one dot per tap, not up to four; in bf16
    this rounds the sum on the border rows/columns once more). The reflected loads run only in
    tiles that hold such a row or column (a scalar branch)."""
    cs = _channel_stride(H, W, CL, INT64)
    qh, okh = _dgrad_source(h, KH, False, H)
    qw, okw = _dgrad_source(w, KW, False, W)
    pix = _pixel_offset(n, qh, qw, Co, H, W, CL, INT64)
    ok = mmask & okh & okw
    if KH != 1:
        rh, rokh = _dgrad_source(h, KH, True, H)
        pix_h = _pixel_offset(n, rh, qw, Co, H, W, CL, INT64)
        ok_h = mmask & rokh & okw
        any_h = tl.max(ok_h.to(tl.int32), axis=0) > 0
    if KW != 1:
        rw, rokw = _dgrad_source(w, KW, True, W)
        pix_w = _pixel_offset(n, qh, rw, Co, H, W, CL, INT64)
        ok_w = mmask & okh & rokw
        any_w = tl.max(ok_w.to(tl.int32), axis=0) > 0
        if KH != 1:
            pix_hw = _pixel_offset(n, rh, rw, Co, H, W, CL, INT64)
            ok_hw = mmask & rokh & rokw
            any_hw = tl.max(ok_hw.to(tl.int32), axis=0) > 0
    k = tl.arange(0, BLOCK_K)
    tap = KH * 3 + KW
    for k0 in range(0, Co, BLOCK_K):
        kk = k0 + k
        kmask = kk < Co
        koff = kk[None, :] * cs
        a = tl.load(dy_ptr + pix[:, None] + koff, mask=ok[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if KH != 1:
            if any_h:
                a += tl.load(dy_ptr + pix_h[:, None] + koff, mask=ok_h[:, None] & kmask[None, :], other=0.0)
        if KW != 1:
            if any_w:
                a += tl.load(dy_ptr + pix_w[:, None] + koff, mask=ok_w[:, None] & kmask[None, :], other=0.0)
            if KH != 1:
                if any_hw:
                    a += tl.load(dy_ptr + pix_hw[:, None] + koff, mask=ok_hw[:, None] & kmask[None, :], other=0.0)
        b = tl.load(wt_ptr + (tap * Co + kk)[:, None] * Ci + ci[None, :], mask=kmask[:, None] & cimask[None, :],
                    other=0.0)
        acc = _dot(a.to(dy_ptr.dtype.element_ty), b, acc)
    return acc


@triton.jit
def _conv3x3_dgrad_kernel(dy_ptr, wt_ptr, dx_ptr, src_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, pdz_ptr, pdzx_ptr,
                          N, Ci, Co, H, W, eps, slope,
                          BN_REDUCE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                          CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          INT64: tl.constexpr):
    """da[p] = sum_taps sum_{q: reflect(q + t - 1) = p} dy[q] @ W[t]^T for BLOCK_M input pixels: the
    interior is a plain transposed correlation, reflect padding adds sources on rows 1, H-2 and
    columns 1, W-2 (see _dgrad_source). With BN_REDUCE, a = act(BN(src)) and the tile's partial sums
    of dz = act'(z) * da and dz * xhat (the previous BatchNorm's backward reductions) go to partial
    row pid_m, from the fp32 da before it is rounded."""
    pid_m = tl.program_id(0)
    n, h, w, mmask = _pixels(pid_m, N * H * W, H, W, BLOCK_M)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cimask = ci < Ci
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            acc = _dgrad_tap(acc, dy_ptr, wt_ptr, n, h, w, mmask, H, W, Ci, Co, ci, cimask, kh, kw, CL, BLOCK_K,
                             INT64)
    out = _pixel_offset(n, h, w, Ci, H, W, CL, INT64)[:, None] + ci[None, :] * _channel_stride(H, W, CL, INT64)
    mask = mmask[:, None] & cimask[None, :]
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=mask)
    if BN_REDUCE:
        mean, invstd, bw, bb = channel_affine(ci, cimask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B)
        src = tl.load(src_ptr + out, mask=mask, other=0.0).to(tl.float32)
        # acc is exactly 0 at masked rows and channels (every load there was masked), so dz is too
        dz, xhat = dz_xhat(acc, src, mean[None, :], invstd[None, :], bw[None, :], bb[None, :], slope, ACT)
        tl.store(pdz_ptr + pid_m * Ci + ci, tl.sum(dz, axis=0), mask=cimask)
        tl.store(pdzx_ptr + pid_m * Ci + ci, tl.sum(dz * xhat, axis=0), mask=cimask)


@triton.jit
def _conv3x3_wgrad_kernel(dy_ptr, x_ptr, scale_ptr, shift_ptr, pdw_ptr, N, Ci, Co, H, W, n_chunks, S, slope,
                          HAS_PRO: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr,
                          BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """Split-K weight gradient: program (tap, ci-block, co-block; s) sums a^T @ dy over pixel chunks
    s, s+S, ... into partial s of (S, 9, Ci, Co); the host sums the S partials in a fixed order
    (deterministic, no atomics). a = act(x*scale + shift) is recomputed from x as it is loaded."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    n_cob = tl.cdiv(Co, BLOCK_CO)
    n_cib = tl.cdiv(Ci, BLOCK_CI)
    cob = pid % n_cob
    cib = (pid // n_cob) % n_cib
    tap = pid // (n_cob * n_cib)
    kh = tap // 3
    kw = tap % 3
    ci = cib * BLOCK_CI + tl.arange(0, BLOCK_CI)
    cimask = ci < Ci
    co = cob * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < Co
    if HAS_PRO:
        sc = tl.load(scale_ptr + ci, mask=cimask, other=0.0)
        sh = tl.load(shift_ptr + ci, mask=cimask, other=0.0)
    cs = _channel_stride(H, W, CL, INT64)  # x and dy share the layout
    acc = tl.zeros([BLOCK_CI, BLOCK_CO], tl.float32)
    for chunk in range(s, n_chunks, S):
        n, h, w, pmask = _pixels(chunk, N * H * W, H, W, BLOCK_P)
        src = _pixel_offset(n, _reflect(h + kh - 1, H), _reflect(w + kw - 1, W), Ci, H, W, CL, INT64)
        # masked pixels load dy = 0, so whatever a holds there (act(shift)) adds nothing
        a = tl.load(x_ptr + src[None, :] + ci[:, None] * cs, mask=cimask[:, None] & pmask[None, :], other=0.0)
        if HAS_PRO:
            a = activate(a.to(tl.float32) * sc[:, None] + sh[:, None], ACT, slope).to(x_ptr.dtype.element_ty)
        out = _pixel_offset(n, h, w, Co, H, W, CL, INT64)
        g = tl.load(dy_ptr + out[:, None] + co[None, :] * cs, mask=pmask[:, None] & comask[None, :], other=0.0)
        acc = _dot(a, g, acc)
    dst = ((s * 9 + tap) * Ci + ci)[:, None] * Co + co[None, :]
    tl.store(pdw_ptr + dst, acc, mask=cimask[:, None] & comask[None, :])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------

# GPU block caps (untuned defaults; aot.py compiles these): forward/dgrad tiles, wgrad tiles
GPU_BLOCKS = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)
GPU_WGRAD_BLOCKS = dict(BLOCK_CI=64, BLOCK_CO=64, BLOCK_P=32)


def _blocks(M: int, K: int, Nout: int) -> dict:
    cap = dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64) if interpreting() else GPU_BLOCKS
    b = dict(BLOCK_M=block(M, cap["BLOCK_M"]), BLOCK_N=block(Nout, cap["BLOCK_N"]), BLOCK_K=block(K, cap["BLOCK_K"]))
    b.update({k: v for k, v in (BLOCK_OVERRIDE or {}).items() if k in b})
    return b


def _check_activation(name: str, t: torch.Tensor, like: tuple[str, torch.Tensor] | None = None) -> None:
    """A (N, C, H, W) activation reflect padding 1 can take (H, W >= 2)."""
    host.check_tensor(name, t, dim=4, like=like, same_dtype=True, hint="N, C, H, W")
    if t.shape[2] < 2 or t.shape[3] < 2:
        raise ValueError(f"reflect padding 1 needs H and W >= 2 (padding size should be less than the corresponding "
                         f"input dimension), got {name} of shape {tuple(t.shape)}")


def _check_weight(weight: torch.Tensor, Co: int | None, Ci: int, like: tuple[str, torch.Tensor]) -> None:
    host.check_tensor("weight", weight, shape=(Co, Ci, 3, 3), like=like, same_dtype=True, hint="Co, Ci, 3, 3")


def conv3x3_reflect_bnact(x, weight, scale=None, shift=None, act=0, negative_slope=0.2, stats=True):
    """y = conv2d(reflect_pad1(act(x*scale[c] + shift[c])), weight)   (no bias, stride 1)
    x: (N, Ci, H, W), H, W >= 2 (reflect pad 1 needs 2), NCHW- or channels_last-contiguous; weight (Co, Ci, 3, 3).
    scale/shift: fp32 (Ci,) or both None (no prologue: the input is used as is; act must then be the identity).
    Returns y in x's dtype and memory format, and (when stats) the per-output-channel batch mean and *biased*
    variance of y in fp32, computed from the fp32 accumulator before the output is rounded to x's dtype."""
    _check_activation("x", x)
    N, Ci, H, W = x.shape
    _check_weight(weight, None, Ci, ("x", x))
    code = host.check_prologue(x, scale, shift, act)
    x = contiguous_input(x)
    Co = weight.shape[0]
    wt = weight.permute(2, 3, 1, 0).contiguous()  # (3, 3, Ci, Co): tap-major, then the reduction channel
    y = torch.empty((N, Co, H, W), device=x.device, dtype=x.dtype, memory_format=memory_format(x))
    M = N * H * W
    b = _blocks(M, Ci, Co)
    n_m = triton.cdiv(M, b["BLOCK_M"])
    part = torch.empty((3, n_m if stats else 1, Co), device=x.device, dtype=torch.float32)
    launch(_conv3x3_fwd_kernel)[(n_m, triton.cdiv(Co, b["BLOCK_N"]))](
        x, wt, y, or_dummy(scale, x), or_dummy(shift, x), part[0], part[1], part[2], N, Ci, Co, H, W,
        float(negative_slope), HAS_PRO=scale is not None, ACT=code, STATS=bool(stats), CL=host.is_channels_last(x),
        INT64=needs_int64(x, y), **b)
    if not stats:
        return y, None, None
    return (y, *finalize_stats(part, Co, n_m))


def _check_dgrad(grad_y, weight, out_dtype):
    _check_activation("grad_y", grad_y)
    _check_weight(weight, grad_y.shape[1], None, ("grad_y", grad_y))
    out_dtype = grad_y.dtype if out_dtype is None else out_dtype
    host.check_dtype("out_dtype", out_dtype)
    return out_dtype


def _dgrad(grad_y, weight, out_dtype, bn=None):
    """Launch the dgrad kernel; ``bn`` = (y_prev, mean, var, weight_bn, bias_bn, eps, act code, slope)
    adds the BatchNorm reductions and returns their per-program partials too."""
    N, Co, H, W = grad_y.shape
    Ci = weight.shape[1]
    grad_y = contiguous_input(grad_y)
    fmt = memory_format(grad_y)
    wt = weight.permute(2, 3, 0, 1).contiguous()  # (3, 3, Co, Ci): the transposed correlation's weights
    dx = torch.empty((N, Ci, H, W), device=grad_y.device, dtype=out_dtype, memory_format=fmt)
    M = N * H * W
    b = _blocks(M, Co, Ci)
    n_m = triton.cdiv(M, b["BLOCK_M"])
    if bn is None:
        d = or_dummy(None, grad_y)
        src, mean, var, bw, bb, eps, code, slope, part = grad_y, d, d, None, None, 0.0, 0, 0.0, d.expand(2, 1, 1)
    else:
        src, mean, var, bw, bb, eps, code, slope = bn
        src = src.contiguous(memory_format=fmt)  # addressed like grad_a
        part = torch.empty((2, n_m, Ci), device=grad_y.device, dtype=torch.float32)
    launch(_conv3x3_dgrad_kernel)[(n_m, triton.cdiv(Ci, b["BLOCK_N"]))](
        grad_y, wt, dx, src, mean, var, or_dummy(bw, grad_y), or_dummy(bb, grad_y), part[0], part[1],
        N, Ci, Co, H, W, float(eps), float(slope), BN_REDUCE=bn is not None, HAS_W=bw is not None,
        HAS_B=bb is not None, ACT=code, CL=host.is_channels_last(grad_y), INT64=needs_int64(grad_y, dx, src), **b)
    return dx, part


def conv3x3_reflect_dgrad(grad_y, weight, out_dtype=None):
    """d loss / d a where y = conv2d(reflect_pad1(a), weight): the gradient w.r.t. the conv's (activated) input,
    reflect padding's border contributions folded back in. grad_y (N, Co, H, W); returns (N, Ci, H, W) in grad_y's
    memory format, dtype out_dtype (default grad_y.dtype; pass torch.float32 to keep it unrounded)."""
    return _dgrad(grad_y, weight, _check_dgrad(grad_y, weight, out_dtype))[0]


def conv3x3_reflect_dgrad_bn_reduce(grad_y, weight, y_prev, mean, var, weight_bn=None, bias_bn=None, eps=1e-5,
                                    act=0, negative_slope=0.2, out_dtype=None):
    """conv3x3_reflect_dgrad where the conv's input was a = act(BatchNorm(y_prev)) (batch ``mean`` and biased
    ``var``, fp32 (Ci,); affine ``weight_bn``/``bias_bn`` fp32 (Ci,) or None), with that BatchNorm's backward
    reductions fused into the epilogue. Returns (grad_a, sum_dz, sum_dz_xhat): dz = act'(z) * grad_a at
    z = BN(y_prev), xhat = (y_prev - mean) / sqrt(var + eps); the sums (fp32 (Ci,), = the BatchNorm's grad_bias
    and grad_weight) come from the fp32 grad_a before it is rounded to out_dtype, merged in a fixed order."""
    out_dtype = _check_dgrad(grad_y, weight, out_dtype)
    Ci = weight.shape[1]
    host.check_tensor("y_prev", y_prev, shape=(grad_y.shape[0], Ci, *grad_y.shape[2:]), like=("grad_y", grad_y),
                      hint="the conv's input before BatchNorm+act")
    for name, t in (("mean", mean), ("var", var), ("weight_bn", weight_bn), ("bias_bn", bias_bn)):
        if t is not None or name in ("mean", "var"):
            host.check_tensor(name, t, shape=(Ci,), dtypes=host.FP32, like=("grad_y", grad_y),
                              hint="one per input channel")
    bn = (y_prev, mean.contiguous(), var.contiguous(), weight_bn, bias_bn, eps, host.check_act(act), negative_slope)
    dx, part = _dgrad(grad_y, weight, out_dtype, bn)
    sum_dz, sum_dzx = sum_partials(part[0], part[1])
    return dx, sum_dz, sum_dzx


def conv3x3_reflect_wgrad(grad_y, x, scale=None, shift=None, act=0, negative_slope=0.2):
    """d loss / d weight, fp32 (Co, Ci, 3, 3), where the conv's input a = act(x*scale + shift) is RECOMPUTED in the
    kernel's load prologue from x (never materialised)."""
    _check_activation("x", x)
    _check_activation("grad_y", grad_y, like=("x", x))
    N, Ci, H, W = x.shape
    Co = grad_y.shape[1]
    host.check_tensor("grad_y", grad_y, shape=(N, None, H, W), like=("x", x), hint="the same N, H, W as x")
    code = host.check_prologue(x, scale, shift, act)
    x = contiguous_input(x)
    grad_y = grad_y.contiguous(memory_format=memory_format(x))  # one layout for both operands
    # Split-K over pixels: the 9 taps x channel blocks rarely fill a GPU, so each also takes 1/S of
    # the N*H*W reduction; partials in fp32, summed over S in a fixed order.
    M = N * H * W
    cap = dict(GPU_WGRAD_BLOCKS, BLOCK_P=256) if interpreting() else GPU_WGRAD_BLOCKS
    blocks = dict(BLOCK_CI=block(Ci, cap["BLOCK_CI"]), BLOCK_CO=block(Co, cap["BLOCK_CO"]),
                  BLOCK_P=block(M, cap["BLOCK_P"]))
    over = BLOCK_OVERRIDE or {}
    if "BLOCK_P" in over:
        blocks["BLOCK_P"] = over["BLOCK_P"]
    n_chunks = triton.cdiv(M, blocks["BLOCK_P"])
    n_tiles = 9 * triton.cdiv(Ci, blocks["BLOCK_CI"]) * triton.cdiv(Co, blocks["BLOCK_CO"])
    S = over.get("SPLITS") or host.splits(x.device, n_chunks, n_tiles)
    part = torch.empty((S, 9, Ci, Co), device=x.device, dtype=torch.float32)
    launch(_conv3x3_wgrad_kernel)[(n_tiles, S)](
        grad_y, x, or_dummy(scale, x), or_dummy(shift, x), part, N, Ci, Co, H, W, n_chunks, S, float(negative_slope),
        HAS_PRO=scale is not None, ACT=code, CL=host.is_channels_last(x), INT64=needs_int64(x, grad_y), **blocks)
    return part.sum(0).reshape(3, 3, Ci, Co).permute(3, 2, 0, 1).contiguous()
