"""conv3x3 Triton kernel cases for test_conv3x3_triton.py, run in a child process with TRITON_INTERPRET=1
(interp_harness.py says why, and how to run this file).

Truth is plain PyTorch in fp64 on the same (rounded) inputs: F.conv2d(F.pad(act(x*scale+shift),
reflect), w), torch.autograd.grad for the gradients, torch.var_mean(unbiased=False) for the
statistics.
"""
from __future__ import annotations

import itertools
import sys

from interp_harness import close as _close, expect_errors, worker_main

SHAPES = {  # (N, Ci, Co, H, W): odd on purpose; H or W of 2 and 3 are the reflect edge cases
    "N3C5x7x9": (3, 5, 5, 7, 9),
    "N3Ci5Co6x7x9": (3, 5, 6, 7, 9),
    "N2C5x2x3": (2, 5, 5, 2, 3),
    "N2Ci5Co6x3x2": (2, 5, 6, 3, 2),
}
PROLOGUES = ("none", "scale", "relu", "leaky_relu")  # "scale": identity activation with scale/shift


def _cases():
    cases = {}
    for (sname, shape), pro, layout in itertools.product(SHAPES.items(), PROLOGUES, ("nchw", "channels_last")):
        cases[f"conv-{sname}-{pro}-{layout}"] = dict(shape=shape, pro=pro, layout=layout)
    # the models' width: C=64 (one K block of 64 channels, N spanning images in one tile)
    cases["conv-N2C64x8x8-leaky_relu-channels_last"] = dict(shape=(2, 64, 64, 8, 8), pro="leaky_relu",
                                                           layout="channels_last")
    cases["conv-N2C64x8x8-relu-nchw"] = dict(shape=(2, 64, 64, 8, 8), pro="relu", layout="nchw")
    # small blocks: several M tiles (statistics merged across programs), a K loop of several
    # blocks (Ci = 20 > BLOCK_K = 16) and several output-channel blocks, a split-K wgrad
    for layout in ("nchw", "channels_last"):
        cases[f"conv-N3Ci20Co18x5x6-leaky_relu-{layout}-smallblocks"] = dict(
            shape=(3, 20, 18, 5, 6), pro="leaky_relu", layout=layout,
            blocks=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_P=16, SPLITS=3))
    cases["conv-N3C5x7x9-relu-nchw-nostats"] = dict(shape=SHAPES["N3C5x7x9"], pro="relu", layout="nchw", stats=False)
    cases["conv-N3C5x7x9-leaky_relu-mixed-layout"] = dict(shape=SHAPES["N3C5x7x9"], pro="leaky_relu",
                                                          layout="channels_last", grad_layout="nchw")
    cases["conv-N3C5x7x9-relu-noncontiguous"] = dict(shape=SHAPES["N3C5x7x9"], pro="relu", layout="sliced")
    for sname, pro, layout in (("N3Ci5Co6x7x9", "leaky_relu", "channels_last"), ("N2Ci5Co6x3x2", "relu", "nchw"),
                               ("N3C5x7x9", "none", "channels_last")):
        cases[f"conv-{sname}-{pro}-{layout}-bfloat16"] = dict(shape=SHAPES[sname], pro=pro, layout=layout,
                                                               dtype="bfloat16")
    # int64 offsets (host.needs_int64's path for tensors past 2**31 elements), forced on small tensors
    for layout in ("nchw", "channels_last"):
        cases[f"conv-N3Ci5Co6x7x9-leaky_relu-{layout}-int64"] = dict(shape=SHAPES["N3Ci5Co6x7x9"], pro="leaky_relu",
                                                                    layout=layout, int64=True)
    cases["bnreduce-N3Ci5Co6x7x9-leaky_relu-nchw-int64"] = dict(bn_reduce=True, shape=SHAPES["N3Ci5Co6x7x9"],
                                                                act="leaky_relu", layout="nchw", affine=True, int64=True)
    # fp16: the host layer's one dtype set holds it for every kernel
    cases["conv-N3Ci5Co6x7x9-leaky_relu-channels_last-float16"] = dict(shape=SHAPES["N3Ci5Co6x7x9"], pro="leaky_relu",
                                                                      layout="channels_last", dtype="float16")
    # dgrad with the previous BatchNorm's backward reductions fused (conv3x3_reflect_dgrad_bn_reduce)
    for (sname, act, layout, affine) in (("N3Ci5Co6x7x9", "leaky_relu", "nchw", True),
                                         ("N3Ci5Co6x7x9", "relu", "channels_last", False),
                                         ("N3C5x7x9", "identity", "channels_last", True),
                                         ("N2C5x2x3", "leaky_relu", "channels_last", True),
                                         ("N2Ci5Co6x3x2", "relu", "nchw", True)):
        cases[f"bnreduce-{sname}-{act}-{layout}{'' if affine else '-noaffine'}"] = dict(
            bn_reduce=True, shape=SHAPES[sname], act=act, layout=layout, affine=affine)
    cases["bnreduce-N3Ci20Co18x5x6-leaky_relu-mixed-layout-smallblocks"] = dict(
        bn_reduce=True, shape=(3, 20, 18, 5, 6), act="leaky_relu", layout="channels_last", affine=True,
        prev_layout="nchw", blocks=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))
    cases["bnreduce-N3Ci5Co6x7x9-leaky_relu-channels_last-bfloat16"] = dict(
        bn_reduce=True, shape=SHAPES["N3Ci5Co6x7x9"], act="leaky_relu", layout="channels_last", affine=True,
        dtype="bfloat16")
    for name in ("stats_large_mean", "stats_bf16_from_accumulator", "dgrad_bf16_out_dtypes", "bad_inputs"):
        cases[f"special-{name}"] = dict(special=name)
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------------------------
# the worker (runs with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

def _code(activation):
    """The kernels take the activation as the ops contract passes it: its code."""
    from aegan_fast.ops import activations
    return activations.code(activation)


def _prologue_args(pro):
    if pro == "none":
        return None, "identity"
    return pro, ("identity" if pro == "scale" else pro)


def _inputs(shape, pro, seed=0, dtype=None):
    import torch
    dtype = dtype or torch.float32
    N, Ci, Co, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, Ci, H, W, generator=g) * 1.5 + 0.3).to(dtype)
    w = (torch.randn(Co, Ci, 3, 3, generator=g) * 0.3).to(dtype)
    scale = torch.rand(Ci, generator=g) + 0.5
    shift = torch.randn(Ci, generator=g) * 0.5
    if pro in ("relu", "leaky_relu"):
        # keep z = x*scale + shift at least 1e-3 from the kink: there two correct roundings of z may
        # pick different sides (the same reason as ops_parity.away_from_kink)
        z = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        near = z.abs() < 1e-3
        x = torch.where(near, ((torch.sign(z) + (z == 0)) * 1e-3 - shift.view(1, -1, 1, 1))
                        / scale.view(1, -1, 1, 1), x.float()).to(dtype)
    return x, w, scale, shift


def _reference(x, w, scale, shift, act, slope, grad_y=None):
    """(y, mean, var, grad_a, grad_w) in fp64 from the given inputs (their values, any dtype)."""
    import torch
    import torch.nn.functional as F

    from aegan_fast.ops import activations
    xd = x.double()
    if scale is not None:
        # z in fp32 exactly as the kernel forms it (one multiply, one add), then everything in fp64
        z = (x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).double()
        xd = activations.get(act).fn(z, slope)
    a = xd.detach().requires_grad_()
    wd = w.double().requires_grad_()
    y = F.conv2d(F.pad(a, (1, 1, 1, 1), mode="reflect"), wd)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    out = dict(y=y.detach(), mean=mean, var=var)
    if grad_y is not None:
        da, dw = torch.autograd.grad(y, (a, wd), grad_y.double())
        out.update(grad_a=da, grad_w=dw)
    return out


def _layout(t, layout):
    import torch
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # neither format: a view into a wider tensor
        wide = torch.cat([t, t], dim=3)
        return wide[..., : t.shape[3]]
    return t.contiguous()


def _run_case(case):
    import torch

    from aegan_fast.kernels import conv3x3 as K
    from aegan_fast.kernels import host

    if "special" in case:
        return globals()["_special_" + case["special"]]()
    dtype = getattr(torch, case.get("dtype", "float32"))
    K.BLOCK_OVERRIDE = case.get("blocks")
    host.FORCE_INT64 = case.get("int64", False)
    if case.get("bn_reduce"):
        return _run_bn_reduce(case, dtype)
    pro, act = _prologue_args(case["pro"])
    slope = 0.2
    x, w, scale, shift = _inputs(case["shape"], case["pro"], dtype=dtype)
    if pro is None:
        scale = shift = None
    x = _layout(x, case["layout"])
    N, Ci, Co, H, W = case["shape"]
    gy = torch.randn(N, Co, H, W, generator=torch.Generator().manual_seed(1)).to(dtype)
    gy = _layout(gy, case.get("grad_layout", case["layout"]))
    stats = case.get("stats", True)
    y, mean, var = K.conv3x3_reflect_bnact(x, w, scale, shift, _code(act), slope, stats=stats)
    da = K.conv3x3_reflect_dgrad(gy, w)
    dw = K.conv3x3_reflect_wgrad(gy, x, scale, shift, _code(act), slope)
    ref = _reference(x, w, scale, shift, act, slope, gy)

    fmt = lambda layout: torch.channels_last if layout == "channels_last" else torch.contiguous_format  # noqa: E731
    if y.dtype != dtype or not y.is_contiguous(memory_format=fmt(case["layout"])):
        raise AssertionError(f"y: dtype {y.dtype} or memory format does not follow x")
    if da.dtype != dtype or not da.is_contiguous(memory_format=fmt(case.get("grad_layout", case["layout"]))):
        raise AssertionError(f"grad_a: dtype {da.dtype} or memory format does not follow grad_y")
    if dw.dtype != torch.float32 or tuple(dw.shape) != (Co, Ci, 3, 3) or not dw.is_contiguous():
        raise AssertionError(f"grad_weight: {dw.dtype} {tuple(dw.shape)}")
    if stats != (mean is not None) or stats != (var is not None):
        raise AssertionError("statistics returned when not asked for, or missing")

    if dtype == torch.float32:
        _close("y", y, ref["y"])
        _close("grad_a", da, ref["grad_a"])
        _close("grad_w", dw, ref["grad_w"])
        if stats:
            _close("mean", mean, ref["mean"])
            _close("var", var, ref["var"])
    else:
        # bf16 (fp16 is closer): truth is fp64 on the same rounded inputs. The kernel rounds its operands to bf16 (the
        # prologue's a, the border sums of dgrad) and y, grad_a to bf16 on output: each a relative
        # 2**-8 of its own element, so 1e-2 of the output's scale bounds them with room.
        _close("y", y, ref["y"], 1e-2)
        _close("grad_a", da, ref["grad_a"], 1e-2)
        _close("grad_w", dw, ref["grad_w"], 1e-2)
        _close("mean", mean, ref["mean"], 1e-2)
        _close("var", var, ref["var"], 1e-2)
    return "ok"


def _run_bn_reduce(case, dtype):
    """grad_a and the previous BatchNorm's sum(dz), sum(dz * xhat) against fp64 autograd through
    y_prev -> BN (given batch mean/var) -> act -> reflect conv: the sums are BN's grad_bias and
    grad_weight (with weight 1, bias 0 leaves when the BN is not affine)."""
    import torch
    import torch.nn.functional as F

    from aegan_fast.kernels import conv3x3 as K
    from aegan_fast.ops import activations
    N, Ci, Co, H, W = case["shape"]
    act, slope, eps = case["act"], 0.2, 1e-5
    g = torch.Generator().manual_seed(6)
    yp = torch.randn(N, Ci, H, W, generator=g) * 1.5 + 0.3
    var, mean = torch.var_mean(yp, dim=(0, 2, 3), unbiased=False)
    bw = torch.rand(Ci, generator=g) + 0.5 if case["affine"] else None
    bb = torch.randn(Ci, generator=g) * 0.5 if case["affine"] else None
    w = (torch.randn(Co, Ci, 3, 3, generator=g) * 0.3).to(dtype)
    gy = torch.randn(N, Co, H, W, generator=g).to(dtype)
    wl = (bw if bw is not None else torch.ones(Ci)).double().view(1, -1, 1, 1)
    bl = (bb if bb is not None else torch.zeros(Ci)).double().view(1, -1, 1, 1)
    invstd = (var.double() + eps).rsqrt().view(1, -1, 1, 1)
    if act != "identity":  # keep z at least 1e-3 from the kink (see _inputs)
        z = (yp.double() - mean.double().view(1, -1, 1, 1)) * invstd * wl + bl
        step = (torch.where(z >= 0, 1e-3, -1e-3) - z) * (z.abs() < 1e-3)
        yp = (yp.double() + step / (invstd * wl)).float()
    yp = yp.to(dtype)
    yp_l = _layout(yp, case.get("prev_layout", case["layout"]))
    gy = _layout(gy, case["layout"])
    da, sdz, sdzx = K.conv3x3_reflect_dgrad_bn_reduce(gy, w, yp_l, mean, var, bw, bb, eps, _code(act), slope)
    wl, bl = wl.requires_grad_(), bl.requires_grad_()
    a = activations.get(act).fn((yp.double() - mean.double().view(1, -1, 1, 1)) * invstd * wl + bl, slope)
    a_leaf = a.detach().requires_grad_()
    y = F.conv2d(F.pad(a_leaf, (1, 1, 1, 1), mode="reflect"), w.double())
    (ref_da,) = torch.autograd.grad(y, a_leaf, gy.double())
    gw, gb = torch.autograd.grad(a, (wl, bl), ref_da)
    if not da.is_contiguous(memory_format=torch.channels_last if case["layout"] == "channels_last"
                            else torch.contiguous_format) or da.dtype != dtype:
        raise AssertionError("grad_a: dtype or memory format does not follow grad_y")
    # bf16: grad_a rounds to bf16 on output, and the border rows round their summed sources before
    # the dot (2**-8 of those elements); the sums come from the fp32 accumulator
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    _close("grad_a", da, ref_da, rtol)
    _close("sum_dz", sdz, gb.flatten(), rtol)
    _close("sum_dz_xhat", sdzx, gw.flatten(), rtol)
    return "ok"


def _special_stats_large_mean():
    """|mean| >> std (shift +1000 into positive-mean weights: mean ~ 3e3, std ~ 1): one-pass
    E[y^2] - E[y]^2 in fp32 would lose the variance entirely (1e7 * 6e-8 ~ the variance itself);
    the tile-mean / Chan merge keeps it, also across many programs (BLOCK_M = 16: 64 partials)."""
    import torch

    from aegan_fast.kernels import conv3x3 as K
    N, Ci, Co, H, W = 4, 8, 6, 16, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, Ci, H, W, generator=g)
    w = torch.randn(Co, Ci, 3, 3, generator=g) * 0.1 + 0.05
    scale, shift = torch.ones(Ci), torch.full((Ci,), 1000.0)
    for layout, blocks in (("nchw", dict(BLOCK_M=16)), ("channels_last", None)):
        K.BLOCK_OVERRIDE = blocks
        xl = _layout(x, layout)
        y, mean, var = K.conv3x3_reflect_bnact(xl, w, scale, shift, _code("identity"))
        ref = _reference(xl, w, scale, shift, "identity", 0.2)
        kappa = (ref["mean"].abs() / ref["var"].sqrt()).min().item()
        if kappa < 1000:
            raise AssertionError(f"the case does not have |mean| >> std (ratio {kappa:.0f})")
        _close(f"mean ({layout})", mean, ref["mean"], 1e-6)
        # fp32 means carry ~kappa * 2**-24 relative to std (kappa ~ 4e3 here: ~2.4e-4), so the
        # variance can be no better than ~1e-4; E[y^2] - E[y]^2 would err by ~kappa**2 * 2**-24 ~ 100%
        _close(f"var ({layout})", var, ref["var"], 1e-3)
    return "ok"


def _special_stats_bf16_from_accumulator():
    """bf16 statistics come from the fp32 accumulator, before y is rounded: with a prologue whose
    output is exact in bf16 (relu of x * 2**k), the kernel's mean/var match fp64 truth to fp32
    accuracy, far closer than statistics of the rounded bf16 y could."""
    import torch

    from aegan_fast.kernels import conv3x3 as K
    N, Ci, Co, H, W = 3, 5, 6, 7, 9
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(N, Ci, H, W, generator=g) + 0.5).bfloat16().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(Co, Ci, 3, 3, generator=g) * 0.3).bfloat16()
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0, 0.25])
    shift = torch.zeros(Ci)
    y, mean, var = K.conv3x3_reflect_bnact(x, w, scale, shift, _code("relu"))
    ref = _reference(x, w, scale, shift, "relu", 0.0)
    _close("mean", mean, ref["mean"], 1e-5)
    _close("var", var, ref["var"], 1e-5)
    rv, rm = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    err, err_rounded = (var.double() - ref["var"]).abs().max(), (rv - ref["var"]).abs().max()
    if not err * 10 < err_rounded:
        raise AssertionError(f"bf16 var error {err:.3g} not well below that of the rounded output's {err_rounded:.3g}")
    _close("y", y, ref["y"], 1e-2)
    return "ok"


def _special_dgrad_bf16_out_dtypes():
    """out_dtype=float32 keeps grad_a unrounded (fp32 accumulator; only the border sums round to
    bf16 before their dot), the default rounds it to bf16; H = W = 2 puts every pixel on a border."""
    import torch

    from aegan_fast.kernels import conv3x3 as K
    for shape in ((3, 5, 6, 7, 9), (2, 6, 5, 2, 2)):
        N, Ci, Co, H, W = shape
        g = torch.Generator().manual_seed(5)
        w = (torch.randn(Co, Ci, 3, 3, generator=g) * 0.3).bfloat16()
        gy = torch.randn(N, Co, H, W, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
        ref = _reference(torch.zeros(N, Ci, H, W), w, None, None, "identity", 0.0, gy)["grad_a"]
        d32 = K.conv3x3_reflect_dgrad(gy, w, out_dtype=torch.float32)
        d16 = K.conv3x3_reflect_dgrad(gy, w)
        if d32.dtype != torch.float32 or d16.dtype != torch.bfloat16:
            raise AssertionError(f"out dtypes {d32.dtype}, {d16.dtype}")
        if not d32.is_contiguous(memory_format=torch.channels_last):
            raise AssertionError("grad_a is not channels_last like grad_y")
        if H > 4 and W > 4:  # rows/columns 2 .. -3 get no reflected sources: nothing rounds there
            interior = (slice(None), slice(None), slice(2, H - 2), slice(2, W - 2))
            _close(f"fp32 out, interior {shape}", d32[interior], ref[interior], 1e-5)
        _close(f"fp32 out {shape}", d32, ref, 1e-2)
        _close(f"bf16 out {shape}", d16, ref, 1e-2)
    return "ok"


def _special_bad_inputs():
    import torch

    from aegan_fast.kernels import conv3x3 as K
    x = torch.randn(2, 5, 6, 7)
    w = torch.randn(4, 5, 3, 3)
    s = torch.ones(5)
    gy = torch.randn(2, 4, 6, 7)
    relu = _code("relu")
    return expect_errors([
        (lambda: K.conv3x3_reflect_bnact(x[0], w), "x must be 4-D"),
        (lambda: K.conv3x3_reflect_bnact(x, torch.randn(4, 5, 5, 5)), "weight must be of shape (_, 5, 3, 3)"),
        (lambda: K.conv3x3_reflect_bnact(x, torch.randn(4, 6, 3, 3)), "weight must be of shape (_, 5, 3, 3)"),
        (lambda: K.conv3x3_reflect_bnact(torch.randn(2, 5, 1, 7), w), "reflect padding 1 needs H and W"),
        (lambda: K.conv3x3_reflect_bnact(torch.randn(2, 5, 6, 1), w), "reflect padding 1 needs H and W"),
        (lambda: K.conv3x3_reflect_bnact(x, w.bfloat16()), "must share one dtype"),
        (lambda: K.conv3x3_reflect_bnact(x.double(), w.double()), "float32, bfloat16 or float16"),
        (lambda: K.conv3x3_reflect_bnact(x, w, s, None), "together"),
        (lambda: K.conv3x3_reflect_bnact(x, w, torch.ones(4), torch.ones(4)), "scale must be of shape (5,)"),
        (lambda: K.conv3x3_reflect_bnact(x, w, s.double(), s.double()), "scale must be float32"),
        (lambda: K.conv3x3_reflect_bnact(x, w, None, None, relu), "needs scale and shift"),
        (lambda: K.conv3x3_reflect_bnact(x, w, s, s, 7), "unknown activation code 7"),
        (lambda: K.conv3x3_reflect_bnact(x, w, s, s, "relu"), "unknown activation code 'relu'"),
        (lambda: K.conv3x3_reflect_bnact(x.to("meta"), w.to("meta")), "need CUDA tensors"),
        (lambda: K.conv3x3_reflect_bnact(x, w.to("meta")), "must share one device"),
        (lambda: K.conv3x3_reflect_dgrad(gy, torch.randn(5, 5, 3, 3)), "weight must be of shape (4, _, 3, 3)"),
        (lambda: K.conv3x3_reflect_dgrad(gy, w, out_dtype=torch.float64), "out_dtype"),
        (lambda: K.conv3x3_reflect_dgrad(gy[:, :, :1], w), "reflect padding 1 needs H and W"),
        (lambda: K.conv3x3_reflect_wgrad(gy[:1], x), "the same N, H, W as x"),
        (lambda: K.conv3x3_reflect_wgrad(gy.bfloat16(), x), "must share one dtype"),
        (lambda: K.conv3x3_reflect_wgrad(gy, x, None, s), "together"),
        (lambda: K.conv3x3_reflect_dgrad_bn_reduce(gy, w, x[:, :4], s, s), "y_prev must be of shape"),
        (lambda: K.conv3x3_reflect_dgrad_bn_reduce(gy, w, x, s[:4], s), "mean must be of shape (5,)"),
        (lambda: K.conv3x3_reflect_dgrad_bn_reduce(gy, w, x, s, s.double()), "var must be float32"),
        (lambda: K.conv3x3_reflect_dgrad_bn_reduce(gy, w, x, s, s, act=3), "unknown activation code"),
    ])


def _reset():
    """A case may shrink the blocks or force int64 offsets; the next one starts from the defaults."""
    from aegan_fast.kernels import conv3x3, host
    conv3x3.BLOCK_OVERRIDE = None
    host.FORCE_INT64 = False


if __name__ == "__main__":
    worker_main(sys.argv[1:], CASES, _run_case, _reset)
