"""Cases for kernels/convt4x4.py and test_convt4x4_triton.py, run in a child process with TRITON_INTERPRET=1
(interp_harness.py says why, and how to run this file).

The truth is plain PyTorch in fp32: a = act(x*scale + shift), y = F.conv_transpose2d(a, w, stride=2, padding=1),
torch.autograd.grad for d/da and d/dw, torch.var_mean(y, (0, 2, 3), unbiased=False) for the statistics.
"""
from __future__ import annotations

import itertools
import sys

from interp_harness import close as _close, expect_errors, worker_main

# (N, Ci, Co, H, W): odd on purpose (no size a power of two or a multiple of a block), 1x1 and 1x5 inputs
# (every output pixel touches the zero padding), and the models' 64 channels.
SHAPES = {"odd": (3, 5, 6, 7, 9), "1x1": (3, 5, 6, 1, 1), "1x5": (3, 5, 6, 1, 5), "c64": (2, 64, 64, 4, 4)}
PROLOGUES = ("none", "relu", "leaky_relu")


def _cases():
    cases = {}
    for shape, layout, pro in itertools.product(SHAPES, ("nchw", "channels_last"), PROLOGUES):
        cases[f"{shape}-{layout}-{pro}"] = dict(shape=shape, layout=layout, pro=pro)
    for shape, layout, pro in (("odd", "channels_last", "leaky_relu"), ("c64", "nchw", "relu"),
                               ("1x5", "nchw", "none")):
        cases[f"{shape}-{layout}-{pro}-bfloat16"] = dict(shape=shape, layout=layout, pro=pro, dtype="bfloat16")
    # small pixel blocks: many programs per phase, so the statistics are merged across programs, and the
    # weight gradient's pixel reduction split 3 ways (12 pixel blocks, the last one ragged)
    for layout, pro in (("nchw", "leaky_relu"), ("channels_last", "relu")):
        cases[f"odd-{layout}-{pro}-block16"] = dict(shape="odd", layout=layout, pro=pro, block_p=16, splits=3)
    cases["odd-channels_last-relu-grad_nchw"] = dict(shape="odd", layout="channels_last", pro="relu",
                                                     grad_layout="nchw")
    for layout in ("nchw", "channels_last"):  # int64 offsets (tensors past 2**31 elements), forced on small ones
        cases[f"odd-{layout}-leaky_relu-int64"] = dict(shape="odd", layout=layout, pro="leaky_relu", int64=True)
    cases["odd-nchw-leaky_relu-slope-0.5"] = dict(shape="odd", layout="nchw", pro="leaky_relu", slope=-0.5)
    for name in ("stats_large_mean", "bad_inputs"):
        cases[f"special-{name}"] = dict(special=name)
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------------------------
# the worker (runs with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

def _inputs(case):
    import torch
    N, Ci, Co, H, W = SHAPES[case["shape"]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, Ci, H, W, generator=g) * 1.5 + 0.3
    w = torch.randn(Ci, Co, 4, 4, generator=g) * 0.2
    scale = torch.rand(Ci, generator=g) + 0.5
    shift = torch.randn(Ci, generator=g) * 0.5
    dy = torch.randn(N, Co, 2 * H, 2 * W, generator=g)
    dtype = getattr(torch, case.get("dtype", "float32"))
    x, w, dy = x.to(dtype), w.to(dtype), dy.to(dtype)
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if case.get("grad_layout", case["layout"]) == "channels_last":
        dy = dy.to(memory_format=torch.channels_last)
    if case["pro"] == "none":
        scale = shift = None
    act = "identity" if case["pro"] == "none" else case["pro"]
    return x, w, scale, shift, act, case.get("slope", 0.2), dy


def _code(activation):
    """The kernels take the activation as the ops contract passes it: its code."""
    from aegan_fast.ops import activations
    return activations.code(activation)


def _truth(x, w, scale, shift, act, slope, dy):
    """fp32 reference from the (possibly bf16-rounded) inputs: (a, y, mean, var, grad_a, grad_w)."""
    import torch
    import torch.nn.functional as F
    from aegan_fast.ops import activations
    a = x.float()
    if scale is not None:
        a = activations.get(act).fn(a * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), slope)
    a = a.detach().requires_grad_()
    wf = w.float().requires_grad_()
    y = F.conv_transpose2d(a, wf, stride=2, padding=1)
    ga, gw = torch.autograd.grad(y, (a, wf), dy.float())
    var, mean = torch.var_mean(y.detach(), dim=(0, 2, 3), unbiased=False)
    return a.detach(), y.detach(), mean, var, ga, gw


def _ulp_bf16(t):
    """The spacing of bf16 numbers at |t| (8 significant bits)."""
    import torch
    return torch.ldexp(torch.ones_like(t), torch.frexp(t)[1] - 8)


def _within(name, got, truth, bound):
    d = (got.float() - truth).abs()
    if not (d <= bound).all():
        raise AssertionError(f"{name}: error beyond its bound by {(d - bound).max().item():.3g} "
                             f"(max error {d.max().item():.3g})")


def _same_format(name, got, like):
    import torch
    want_cl = not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    if not (got.is_contiguous(memory_format=torch.channels_last) if want_cl else got.is_contiguous()):
        raise AssertionError(f"{name}'s strides {got.stride()} are not its source's memory format ({like.stride()})")


def _run_case(case):
    import torch
    import torch.nn.functional as F
    from aegan_fast.kernels import convt4x4 as K
    from aegan_fast.kernels import host

    if "special" in case:
        return globals()["_special_" + case["special"]]()
    K.BLOCK_P_OVERRIDE = case.get("block_p")
    K.SPLITS_OVERRIDE = case.get("splits")
    host.FORCE_INT64 = case.get("int64", False)
    x, w, scale, shift, act, slope, dy = _inputs(case)
    y, mean, var = K.conv_transpose4x4s2_bnact(x, w, scale, shift, _code(act), slope)
    a, ty, tmean, tvar, tga, tgw = _truth(x, w, scale, shift, act, slope, dy)
    if y.dtype != x.dtype or y.shape != ty.shape:
        raise AssertionError(f"y is {y.dtype} {tuple(y.shape)}, want {x.dtype} {tuple(ty.shape)}")
    _same_format("y", y, x)
    ga = K.conv_transpose4x4s2_dgrad(dy, w)
    gw = K.conv_transpose4x4s2_wgrad(dy, x, scale, shift, _code(act), slope)
    if ga.dtype != dy.dtype or ga.shape != x.shape or gw.dtype != torch.float32 or gw.shape != w.shape:
        raise AssertionError(f"grad_a {ga.dtype} {tuple(ga.shape)}, grad_w {gw.dtype} {tuple(gw.shape)}")
    _same_format("grad_a", ga, dy)
    if x.dtype == torch.float32:
        _close("y", y, ty)
        _close("mean", mean, tmean)
        _close("var", var, tvar)
        _close("grad_a", ga, tga)
        _close("grad_w", gw, tgw)
    else:
        # bf16 against fp32 truth: the dot's operand act(x*scale+shift) is rounded to bf16 (at most one ulp
        # of each a, whatever the rounding mode: the interpreter truncates, a GPU rounds to nearest), the
        # sum is fp32 (1e-5 of scale for the order), y is stored in bf16 (one ulp of each element).
        wf = w.float()
        op_err = F.conv_transpose2d(_ulp_bf16(a), wf.abs(), stride=2, padding=1) + 1e-5 * ty.abs().max()
        _within("y", y, ty, op_err + _ulp_bf16(torch.maximum(ty.abs(), y.float().abs())))
        # |acc - y_truth| <= op_err elementwise moves a channel's mean by at most its max and its standard
        # deviation by at most that too (Minkowski), so var by at most 2*std*d + d^2.
        d = op_err.amax(dim=(0, 2, 3))
        _within("mean", mean, tmean, d)
        _within("var", var, tvar, 2 * tvar.sqrt() * d + d * d + 1e-5 * tvar.max())
        # grad_a: products of bf16 grad_y and weights are exact in fp32; only the bf16 store rounds (or, with
        # out_dtype=float32, nothing but the order of the sum).
        _within("grad_a", ga, tga, _ulp_bf16(torch.maximum(tga.abs(), ga.float().abs())) + 1e-5 * tga.abs().max())
        _close("grad_a fp32", K.conv_transpose4x4s2_dgrad(dy, w, out_dtype=torch.float32), tga)
        # grad_w (fp32): the recomputed a is rounded to bf16 for the dot, one ulp of each a at most
        u = _ulp_bf16(a)
        wz = torch.zeros_like(wf, requires_grad=True)
        (gw_err,) = torch.autograd.grad(F.conv_transpose2d(u, wz, stride=2, padding=1), wz, dy.float().abs())
        _within("grad_w", gw, tgw, gw_err + 1e-5 * tgw.abs().max())
    y2, m2, v2 = K.conv_transpose4x4s2_bnact(x, w, scale, shift, _code(act), slope, stats=False)
    if m2 is not None or v2 is not None or not torch.equal(y2, y):
        raise AssertionError("stats=False must give the same y and (None, None)")
    return "ok"


def _special_stats_large_mean():
    """|mean| >> std: the per-tile mean + squared deviations stay accurate where E[y^2]-E[y]^2 in fp32 would
    not (here its rounding alone is ~1e3 times the variance). Only the centre taps are non-zero, so every
    output pixel is one 5-term product sum with no border effect and the same weights in every phase:
    mean ~4e3, std ~2e-2."""
    import torch
    import torch.nn.functional as F
    from aegan_fast.kernels import convt4x4 as K
    K.BLOCK_P_OVERRIDE = 16  # 4 phases x 39 pixel blocks: 156 partials per channel are merged
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 13, 16, generator=g) * 1e-2 + 1e3
    w = torch.zeros(5, 6, 4, 4)
    w[:, :, 1:3, 1:3] = (torch.rand(5, 6, generator=g) * 0.5 + 0.5)[:, :, None, None]  # one value for all phases
    y, mean, var = K.conv_transpose4x4s2_bnact(x, w)
    yd = F.conv_transpose2d(x.double(), w.double(), stride=2, padding=1)
    _close("y", y, yd.float(), 1e-6)
    # The statistics are of the fp32 accumulator, i.e. of the stored fp32 y exactly. Even so an fp32 mean of
    # ~4e3 resolves only ~2.4e-4 (1% of the std), and the merges' squared mean differences carry that: 1e-2
    # (measured 1.3e-3 against y's float64 statistics; a per-tile E[y^2]-E[y]^2 is off ~2e3, measured).
    # Against the float64 conv, y's own rounding (~4e-4 an element) adds about as much (measured 1.4e-3).
    own_var, own_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    ref_var = torch.var(yd, dim=(0, 2, 3), unbiased=False)
    for name, ref, tol in (("fp32 y", own_var, 1e-2), ("float64 conv", ref_var, 1e-2)):
        rel = ((var.double() - ref).abs() / ref).max().item()
        if rel > tol:
            raise AssertionError(f"variance relative error {rel:.3g} against the {name}'s")
    _close("mean", mean, own_mean, 1e-6)
    return "ok"


def _special_bad_inputs():
    import torch
    from aegan_fast.kernels import convt4x4 as K
    x, w = torch.randn(2, 5, 3, 3), torch.randn(5, 6, 4, 4)
    s, b = torch.ones(5), torch.zeros(5)
    fwd = K.conv_transpose4x4s2_bnact
    relu = _code("relu")
    dgrad, wgrad = K.conv_transpose4x4s2_dgrad, K.conv_transpose4x4s2_wgrad
    dy = torch.randn(2, 6, 6, 6)
    return expect_errors([
        (lambda: fwd(x[0], w), "x must be 4-D"),
        (lambda: fwd(x.int(), w), "float32, bfloat16 or float16"),
        (lambda: fwd(x, torch.randn(5, 6, 3, 3)), "weight must be of shape (5, _, 4, 4)"),
        (lambda: fwd(x, torch.randn(5, 6, 4)), "weight must be of shape (5, _, 4, 4)"),
        (lambda: fwd(x, torch.randn(4, 6, 4, 4)), "weight must be of shape (5, _, 4, 4)"),
        (lambda: fwd(x, w.bfloat16()), "share one dtype"),
        (lambda: fwd(x, w.to("meta")), "weight is on meta"),
        (lambda: fwd(x, w, s, None), "together"),
        (lambda: fwd(x, w, None, b), "together"),
        (lambda: fwd(x, w, torch.ones(4), b), "scale must be of shape (5,)"),
        (lambda: fwd(x, w, s, torch.zeros(5, 1)), "shift must be of shape (5,)"),
        (lambda: fwd(x, w, s.bfloat16(), b), "float32"),
        (lambda: fwd(x, w, act=relu), "needs scale and shift"),
        (lambda: fwd(x, w, s, b, 9), "unknown activation code"),
        (lambda: fwd(x[:0], w), "empty"),
        (lambda: dgrad(dy[0], w), "grad_y must be 4-D"),
        (lambda: dgrad(dy[..., :5], w), "(2H, 2W)"),
        (lambda: dgrad(dy, torch.randn(5, 7, 4, 4)), "weight must be of shape (_, 6, 4, 4)"),
        (lambda: dgrad(dy, torch.randn(5, 6, 3, 3)), "weight must be of shape (_, 6, 4, 4)"),
        (lambda: dgrad(dy, w.bfloat16()), "share one dtype"),
        (lambda: dgrad(dy, w, out_dtype=torch.int32), "out_dtype"),
        (lambda: wgrad(dy[..., :4], x), "(N, Co, 2H, 2W)"),
        (lambda: wgrad(dy[:1], x), "(N, Co, 2H, 2W)"),
        (lambda: wgrad(dy.bfloat16(), x), "share one dtype"),
        (lambda: wgrad(dy.to("meta"), x), "grad_y is on meta"),
        (lambda: wgrad(dy, x, s), "together"),
        (lambda: wgrad(dy, x, torch.ones(6), b), "scale must be of shape (5,)"),
        (lambda: wgrad(dy, x, act=_code("leaky_relu")), "needs scale and shift"),
    ])


def _reset():
    """A case may shrink the blocks or force int64 offsets; the next one starts from the defaults."""
    from aegan_fast.kernels import convt4x4, host
    convt4x4.BLOCK_P_OVERRIDE = convt4x4.SPLITS_OVERRIDE = None
    host.FORCE_INT64 = False


if __name__ == "__main__":
    worker_main(sys.argv[1:], CASES, _run_case, _reset)
