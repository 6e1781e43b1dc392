"""Triton parity cases for test_ops_triton.py, run in a child process with TRITON_INTERPRET=1
(interp_harness.py says why, and how to run this file).
"""
from __future__ import annotations

import itertools
import sys

from interp_harness import close as _close, expect_error, worker_main

SHAPE = (3, 5, 7, 9)  # odd on purpose: no dimension is a power of two or a multiple of a block


def _cases():
    cases = {}
    for op, act, training, layout in itertools.product(("bn_act", "bn_add_act"), ("identity", "relu", "leaky_relu"),
                                                       (True, False), ("nchw", "channels_last")):
        cases[f"op-{op}-{act}-{'train' if training else 'eval'}-{layout}"] = dict(
            op=op, act=act, training=training, layout=layout)
    for dtype, (op, act, layout) in itertools.product(("bfloat16", "float16"), (
            ("bn_act", "leaky_relu", "channels_last"), ("bn_add_act", "relu", "nchw"))):
        cases[f"op-{op}-{act}-train-{layout}-{dtype}"] = dict(op=op, act=act, training=True, layout=layout,
                                                              dtype=dtype)
    # small tiles: several tiles per program and several programs per channel block, so the chunked
    # Welford loop and the cross-program merge both run
    for op, layout in itertools.product(("bn_act", "bn_add_act"), ("nchw", "channels_last")):
        cases[f"op-{op}-leaky_relu-train-{layout}-tile64"] = dict(
            op=op, act="leaky_relu", training=True, layout=layout, tile=64, shape=(4, 6, 11, 13))
    # int64 offsets (tensors past 2**31 elements), forced on small ones, with a residual and without
    for op, layout in (("bn_act", "nchw"), ("bn_add_act", "channels_last")):
        cases[f"op-{op}-leaky_relu-train-{layout}-int64"] = dict(op=op, act="leaky_relu", training=True,
                                                                layout=layout, int64=True)
    cases["op-bn_act-noaffine-norunning-train"] = dict(op="bn_act", act="relu", training=True, layout="nchw",
                                                       affine=False, running=False)
    cases["op-bn_add_act-noaffine-eval-channels_last"] = dict(
        op="bn_add_act", act="leaky_relu", training=False, layout="channels_last", affine=False)
    cases["op-bn_act-mixed-layout-grad"] = dict(op="bn_act", act="relu", training=True, layout="channels_last",
                                                grad_layout="nchw")
    cases["op-bn_add_act-leaky_relu-negative-slope"] = dict(op="bn_add_act", act="leaky_relu", training=True,
                                                            layout="nchw", slope=-0.5)
    # a realistic layer: N16 C64 32x32 (the models' shapes at R=64), both ops
    cases["op-bn_act-leaky_relu-train-nchw-N16C64S32"] = dict(op="bn_act", act="leaky_relu", training=True,
                                                              layout="nchw", shape=(16, 64, 32, 32))
    cases["op-bn_add_act-relu-train-channels_last-N16C64S32"] = dict(
        op="bn_add_act", act="relu", training=True, layout="channels_last", shape=(16, 64, 32, 32))
    # special checks
    for name in ("running_stats_3_steps", "running_stats_cumulative", "stats_large_mean", "saves_input_and_residual",
                 "modules_under_use_backend", "rejects_single_value_per_channel"):
        cases[f"special-{name}"] = dict(special=name)
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------------------------
# the worker (runs with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

def _fwd_bwd(fn, add, x, r, w, b, rm, rv, dy, case, affine, running):
    xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    ww = w.clone().requires_grad_() if affine else None
    bb = b.clone().requires_grad_() if affine else None
    m, v = (rm.clone(), rv.clone()) if running else (None, None)
    slope = case.get("slope", 0.2)
    if add:
        y = fn(xx, rr, m, v, ww, bb, case["training"], 0.1, 1e-5, case["act"], slope)
    else:
        y = fn(xx, m, v, ww, bb, case["training"], 0.1, 1e-5, case["act"], slope)
    y.backward(dy)
    return dict(y=y, grad_x=xx.grad, grad_weight=ww.grad if affine else None,
                grad_bias=bb.grad if affine else None, running_mean=m, running_var=v,
                grad_residual=rr.grad if add else None)


def _triton(op):
    from functools import partial

    from aegan_fast.ops import library
    return partial(getattr(library, op), "triton")


def _run_case(case):
    import torch
    from aegan_fast.kernels import host
    from aegan_fast.ops import reference as R

    if "special" in case:
        return globals()["_special_" + case["special"]]()
    dtype = getattr(torch, case.get("dtype", "float32"))
    N, C, H, W = case.get("shape", SHAPE)
    host.TILE_OVERRIDE = case.get("tile")
    host.FORCE_INT64 = case.get("int64", False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g) * 2 + 0.5
    r = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(C, generator=g) * 0.5 + 1
    b = torch.randn(C, generator=g) * 0.5
    rm, rv = torch.randn(C, generator=g) * 0.3, torch.rand(C, generator=g) + 0.5
    dy = torch.randn(N, C, H, W, generator=g).to(dtype)
    affine, running = case.get("affine", True), case.get("running", True)
    add = case["op"] == "bn_add_act"
    if case["act"] != "identity":
        from ops_parity import away_from_kink
        x, r = away_from_kink(case["op"], x, r, w if affine else None, b if affine else None, rm, rv,
                              case["training"])
    x, r = x.to(dtype), r.to(dtype)
    if case["layout"] == "channels_last":
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    if case.get("grad_layout", case["layout"]) == "channels_last":
        dy = dy.to(memory_format=torch.channels_last)
    ref_fn = R.bn_add_act if add else R.bn_act
    got = _fwd_bwd(_triton(case["op"]), add, x, r, w, b, rm, rv, dy, case, affine, running)
    if dtype == torch.float32:
        ref = _fwd_bwd(ref_fn, add, x, r, w, b, rm, rv, dy, case, affine, running)
        for k in ref:
            _close(k, got[k], ref[k])
    else:
        # Low precision: judged against fp32 truth on the same rounded inputs; within 2 ulps of each
        # tensor's scale and no worse than the reference's own error in that dtype (it rounds twice).
        f32 = lambda t: t.float()  # noqa: E731
        truth = _fwd_bwd(ref_fn, add, f32(x), f32(r), w, b, rm, rv, f32(dy), case, affine, running)
        low = _fwd_bwd(ref_fn, add, x, r, w, b, rm, rv, dy, case, affine, running)
        rtol = 8e-3 if dtype == torch.bfloat16 else 1e-3
        for k in truth:
            if truth[k] is None:
                continue
            _close(k, got[k], truth[k], rtol)
            t, d = truth[k].float(), (got[k].float() - truth[k].float()).abs()
            if dtype == torch.bfloat16 and got[k].dtype == torch.bfloat16:
                # The interpreter stores bf16 by truncation (every |y| <= |truth|, measured), not round
                # to nearest as a GPU does: one ulp per element then, where the reference, rounding
                # to nearest twice, may land closer. Bound: one bf16 ulp of each element.
                ulp = torch.ldexp(torch.ones_like(t), torch.frexp(t)[1] - 8)
                if not (d <= ulp + 1e-6 * t.abs().max()).all():
                    raise AssertionError(f"{k}: triton error beyond one bf16 ulp: {(d - ulp).max().item():.3g}")
                continue
            err, err_ref = d.max().item(), (low[k].float() - t).abs().max().item()
            if err > 1.5 * err_ref + 1e-6 * t.abs().max().item():
                raise AssertionError(f"{k}: triton error {err:.3g} worse than the {dtype} reference's {err_ref:.3g}")
    if case["layout"] == "channels_last" and not got["y"].is_contiguous(memory_format=torch.channels_last):
        raise AssertionError("channels_last input gave an output in another memory format")
    return "ok"


def _special_running_stats_3_steps():
    """Running statistics after three training steps equal nn.BatchNorm2d's (momentum 0.1)."""
    import torch
    bn = torch.nn.BatchNorm2d(5)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    rm2, rv2 = rm.clone(), rv.clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(*SHAPE, generator=g) * 3 + 1
        bn(x)
        _triton("bn_act")(x, rm, rv, bn.weight, bn.bias, True, 0.1, bn.eps, "relu", 0.0)
        _triton("bn_add_act")(x, torch.zeros_like(x), rm2, rv2, bn.weight, bn.bias, True, 0.1, bn.eps, "identity", 0.0)
    for got in ((rm, rv), (rm2, rv2)):
        _close("running_mean", got[0], bn.running_mean)
        _close("running_var", got[1], bn.running_var)
    return "ok"


def _special_running_stats_cumulative():
    """momentum=None (cumulative average): the module passes 1/num_batches_tracked as the factor."""
    import torch
    bn = torch.nn.BatchNorm2d(5, momentum=None)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    g = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        x = torch.randn(*SHAPE, generator=g).to(memory_format=torch.channels_last)
        bn(x)
        _triton("bn_act")(x, rm, rv, bn.weight, bn.bias, True, 1.0 / step, bn.eps, "identity", 0.0)
    _close("running_mean", rm, bn.running_mean)
    _close("running_var", rv, bn.running_var)
    return "ok"


def _special_stats_large_mean():
    """|mean| >> std: the chunked Welford statistics stay accurate where E[x^2]-E[x]^2 would not."""
    import torch
    from aegan_fast.kernels import bn_act, host
    host.TILE_OVERRIDE = 64
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(4, 3, 17, 19, generator=g, dtype=torch.float64) * 1e-2 + 1e3
    x = x64.float()
    _, mean, var = bn_act.forward(x, None, None, None, None, None, True, 1e-5, 0, 0.0)
    xd = x.double()
    ref_mean, ref_var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    rel = ((var.double() - ref_var).abs() / ref_var).max().item()
    if rel > 1e-3:
        raise AssertionError(f"variance relative error {rel:.3g} (naive fp32 sum of squares is ~1e2 here)")
    _close("mean", mean, ref_mean, 1e-6)
    return "ok"


def _special_saves_input_and_residual():
    """The one contract: backward keeps x (and the residual, for bn_add_act with a non-identity
    activation, so z is recomputed exactly), never the output."""
    import torch
    x, r = torch.randn(*SHAPE, requires_grad=True), torch.randn(*SHAPE, requires_grad=True)
    w, b = torch.ones(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    for op, act, want in (("bn_act", "leaky_relu", [x]), ("bn_add_act", "relu", [x, r]),
                          ("bn_add_act", "identity", [x])):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if op == "bn_act":
                y = _triton(op)(x, None, None, w, b, True, 0.1, 1e-5, act, 0.2)
            else:
                y = _triton(op)(x, r, None, None, w, b, True, 0.1, 1e-5, act, 0.2)
        big = sorted(t.data_ptr() for t in saved if t.numel() == x.numel())
        if big != sorted(t.data_ptr() for t in want) or y.data_ptr() in big:
            raise AssertionError(f"{op}/{act}: saved {[tuple(t.shape) for t in saved]}")
    return "ok"


def _special_modules_under_use_backend():
    """The modules on CPU tensors with ops.use_backend("triton") (interpreter): nn.BatchNorm2d's
    output, gradients and running statistics."""
    import torch
    from aegan_fast import ops
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(5)
    ours = ops.BatchNormAct2d(5, "leaky_relu", 0.2)
    x = torch.randn(*SHAPE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with ops.use_backend("triton"):
        if ops.resolve("cpu") != "triton":
            raise AssertionError(f"use_backend('triton') resolved to {ops.resolve('cpu')}")
        y = ours(x)
    y2 = torch.nn.functional.leaky_relu(plain(x2), 0.2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    for name, a, b in (("y", y, y2), ("grad_x", x.grad, x2.grad), ("grad_weight", ours.weight.grad, plain.weight.grad),
                       ("running_mean", ours.running_mean, plain.running_mean),
                       ("running_var", ours.running_var, plain.running_var)):
        _close(name, a, b)
    return "ok"


def _special_rejects_single_value_per_channel():
    import torch
    return expect_error(lambda: _triton("bn_act")(torch.randn(1, 5, 1, 1), None, None, None, None, True, 0.1, 1e-5,
                                                  "relu", 0.0), ValueError, "more than 1 value per channel")


def _reset():
    """A case may shrink the tile or force int64 offsets; the next one starts from the defaults."""
    from aegan_fast.kernels import host
    host.TILE_OVERRIDE = None
    host.FORCE_INT64 = False


if __name__ == "__main__":
    worker_main(sys.argv[1:], CASES, _run_case, _reset)
