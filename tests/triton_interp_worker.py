"""Triton parity cases, run in a child process with TRITON_INTERPRET=1 (see test_ops_triton.py).

Why a child process: the interpreter is chosen when ``@triton.jit`` runs, i.e. when the kernels
are imported, and it is process-wide. Running the cases in their own interpreter-mode process
keeps every other test (torch.compile, a real GPU) free of it, whatever the import order.

    TRITON_INTERPRET=1 python tests/triton_interp_worker.py [case-substring ...]

prints one JSON object {case_id: "ok" | "FAIL: ..."} on its last line. ``CASES`` is importable
without triton (the parent parametrises over it).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import traceback

SHAPE = (3, 5, 7, 9)  # odd on purpose: no dimension is a power of two or a multiple of a block


def _cases():
    cases = {}
    for op, act, training, layout in itertools.product(("bn_act", "bn_add_act"), ("identity", "relu", "leaky_relu"),
                                                       (True, False), ("nchw", "channels_last")):
        cases[f"kernels-{op}-{act}-{'train' if training else 'eval'}-{layout}"] = dict(
            entry="kernels", op=op, act=act, training=training, layout=layout)
    for act, training, layout in itertools.product(("identity", "leaky_relu"), (True, False),
                                                   ("nchw", "channels_last")):
        cases[f"kernels-bn_act-memeff-{act}-{'train' if training else 'eval'}-{layout}"] = dict(
            entry="kernels", op="bn_act", act=act, training=training, layout=layout, memory_efficient=True)
    for dtype, (op, act, layout) in itertools.product(("bfloat16", "float16"), (
            ("bn_act", "leaky_relu", "channels_last"), ("bn_add_act", "relu", "nchw"))):
        cases[f"kernels-{op}-{act}-train-{layout}-{dtype}"] = dict(
            entry="kernels", op=op, act=act, training=True, layout=layout, dtype=dtype)
    cases["kernels-bn_act-memeff-leaky_relu-train-nchw-bfloat16"] = dict(
        entry="kernels", op="bn_act", act="leaky_relu", training=True, layout="nchw", dtype="bfloat16",
        memory_efficient=True)
    # small tiles: several tiles per program and several programs per channel block, so the chunked
    # Welford loop and the cross-program merge both run
    for op, layout in itertools.product(("bn_act", "bn_add_act"), ("nchw", "channels_last")):
        cases[f"kernels-{op}-leaky_relu-train-{layout}-tile64"] = dict(
            entry="kernels", op=op, act="leaky_relu", training=True, layout=layout, tile=64, shape=(4, 6, 11, 13))
    cases["kernels-bn_act-noaffine-norunning-train"] = dict(entry="kernels", op="bn_act", act="relu", training=True,
                                                            layout="nchw", affine=False, running=False)
    cases["kernels-bn_add_act-noaffine-eval-channels_last"] = dict(
        entry="kernels", op="bn_add_act", act="leaky_relu", training=False, layout="channels_last", affine=False)
    # the torch.library ops (triton_op + register_autograd) that the backend uses
    for op, training, layout in itertools.product(("bn_act", "bn_add_act"), (True, False), ("nchw", "channels_last")):
        cases[f"library-{op}-leaky_relu-{'train' if training else 'eval'}-{layout}"] = dict(
            entry="library", op=op, act="leaky_relu", training=training, layout=layout)
    cases["library-bn_act-memeff-leaky_relu-train-channels_last"] = dict(
        entry="library", op="bn_act", act="leaky_relu", training=True, layout="channels_last", memory_efficient=True)
    cases["library-bn_add_act-identity-train-nchw"] = dict(entry="library", op="bn_add_act", act="identity",
                                                           training=True, layout="nchw")
    cases["library-bn_act-mixed-layout-grad"] = dict(entry="library", op="bn_act", act="relu", training=True,
                                                     layout="channels_last", grad_layout="nchw")
    # special checks
    for name in ("running_stats_3_steps", "running_stats_cumulative", "stats_large_mean", "memeff_saves_output",
                 "memeff_inplace_after_is_caught", "rejects_single_value_per_channel"):
        cases[f"special-{name}"] = dict(special=name)
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------------------------
# the worker (runs with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

def _tol(dtype):
    import torch
    return {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]


def _close(name, got, ref, tol):
    import torch
    if got is None or ref is None:
        if (got is None) != (ref is None):
            raise AssertionError(f"{name}: one side is None (got {got is None}, ref {ref is None})")
        return
    got, ref = got.detach().float(), ref.detach().float()
    scale = 1.0 + ref.abs().max().item()
    err = (got - ref).abs().max().item()
    if not err <= tol * scale or not torch.isfinite(got).all():
        raise AssertionError(f"{name}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}")


def _run_case(case):
    import torch
    from aegan_fast.kernels import _common
    from aegan_fast.ops import reference as R

    if "special" in case:
        return globals()["_special_" + case["special"]]()
    dtype = getattr(torch, case.get("dtype", "float32"))
    N, C, H, W = case.get("shape", SHAPE)
    _common.TILE_OVERRIDE = case.get("tile")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, C, H, W, generator=g) * 2 + 0.5).to(dtype)
    r = torch.randn(N, C, H, W, generator=g).to(dtype)
    w = torch.randn(C, generator=g) * 0.5 + 1
    b = torch.randn(C, generator=g) * 0.5
    rm, rv = torch.randn(C, generator=g) * 0.3, torch.rand(C, generator=g) + 0.5
    dy = torch.randn(N, C, H, W, generator=g).to(dtype)
    if case["layout"] == "channels_last":
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    if case.get("grad_layout", case["layout"]) == "channels_last":
        dy = dy.to(memory_format=torch.channels_last)
    affine, running = case.get("affine", True), case.get("running", True)
    add = case["op"] == "bn_add_act"
    if case["entry"] == "library":
        from aegan_fast.ops import _triton
        entry = _triton.register()
        fast = entry.bn_add_act if add else entry.bn_act
    else:
        from aegan_fast.kernels import bn_act, bn_add_act
        fast = bn_add_act.bn_add_act if add else bn_act.bn_act
    results = []
    for fn in (R.bn_add_act if add else R.bn_act, fast):
        xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        ww = w.clone().requires_grad_() if affine else None
        bb = b.clone().requires_grad_() if affine else None
        m, v = (rm.clone(), rv.clone()) if running else (None, None)
        if add:
            y = fn(xx, rr, m, v, ww, bb, case["training"], 0.1, 1e-5, case["act"], 0.2)
        else:
            y = fn(xx, m, v, ww, bb, case["training"], 0.1, 1e-5, case["act"], 0.2,
                   case.get("memory_efficient", False))
        y.backward(dy)
        results.append(dict(y=y, grad_x=xx.grad, grad_weight=ww.grad if affine else None,
                            grad_bias=bb.grad if affine else None, running_mean=m, running_var=v,
                            grad_residual=rr.grad if add else None))
    ref, got = results
    tol = _tol(dtype)
    for k in ref:
        _close(k, got[k], ref[k], tol)
    if case["layout"] == "channels_last" and not got["y"].is_contiguous(memory_format=torch.channels_last):
        raise AssertionError("channels_last input gave an output in another memory format")
    return "ok"


def _special_running_stats_3_steps():
    """Running statistics after three training steps equal nn.BatchNorm2d's (momentum 0.1)."""
    import torch
    from aegan_fast.kernels import bn_act, bn_add_act
    bn = torch.nn.BatchNorm2d(5)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    rm2, rv2 = rm.clone(), rv.clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(*SHAPE, generator=g) * 3 + 1
        bn(x)
        bn_act.bn_act(x, rm, rv, bn.weight, bn.bias, True, 0.1, bn.eps, "relu", 0.0)
        bn_add_act.bn_add_act(x, torch.zeros_like(x), rm2, rv2, bn.weight, bn.bias, True, 0.1, bn.eps)
    for got in ((rm, rv), (rm2, rv2)):
        _close("running_mean", got[0], bn.running_mean, 1e-6)
        _close("running_var", got[1], bn.running_var, 1e-6)
    return "ok"


def _special_running_stats_cumulative():
    """momentum=None (cumulative average): the module passes 1/num_batches_tracked as the factor."""
    import torch
    from aegan_fast.kernels import bn_act
    bn = torch.nn.BatchNorm2d(5, momentum=None)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    g = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        x = torch.randn(*SHAPE, generator=g).to(memory_format=torch.channels_last)
        bn(x)
        bn_act.bn_act(x, rm, rv, bn.weight, bn.bias, True, 1.0 / step, bn.eps, "identity", 0.0)
    _close("running_mean", rm, bn.running_mean, 1e-6)
    _close("running_var", rv, bn.running_var, 1e-6)
    return "ok"


def _special_stats_large_mean():
    """|mean| >> std: the chunked Welford statistics stay accurate where E[x^2]-E[x]^2 would not."""
    import torch
    from aegan_fast.kernels import _common, bn_act
    _common.TILE_OVERRIDE = 64
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(4, 3, 17, 19, generator=g, dtype=torch.float64) * 1e-2 + 1e3
    x = x64.float()
    _, mean, var = bn_act.bn_act_forward(x, None, None, None, None, True, 1e-5, "identity", 0.0)
    xd = x.double()
    ref_mean, ref_var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    rel = ((var.double() - ref_var).abs() / ref_var).max().item()
    if rel > 1e-3:
        raise AssertionError(f"variance relative error {rel:.3g} (naive fp32 sum of squares is ~1e2 here)")
    _close("mean", mean, ref_mean, 1e-6)
    return "ok"


def _special_memeff_saves_output():
    """memory_efficient keeps the output (not the input) for backward."""
    import torch
    from aegan_fast.kernels import bn_act
    x = torch.randn(*SHAPE, requires_grad=True)
    w, b = torch.ones(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    for memory_efficient in (False, True):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = bn_act.bn_act(x, None, None, w, b, True, 0.1, 1e-5, "leaky_relu", 0.2, memory_efficient)
        big = [t for t in saved if t.numel() == x.numel()]
        want = y if memory_efficient else x
        if len(big) != 1 or big[0].data_ptr() != want.data_ptr():
            raise AssertionError(f"memory_efficient={memory_efficient}: saved {[tuple(t.shape) for t in saved]}")
    return "ok"


def _special_memeff_inplace_after_is_caught():
    """Modifying the saved output in place before backward is an autograd error, never silent."""
    import torch
    from aegan_fast.kernels import bn_act
    x = torch.randn(*SHAPE, requires_grad=True)
    y = bn_act.bn_act(x, None, None, None, None, True, 0.1, 1e-5, "leaky_relu", 0.2, True)
    y.mul_(2)
    try:
        y.sum().backward()
    except RuntimeError as e:
        if "modified by an inplace operation" in str(e):
            return "ok"
        raise
    raise AssertionError("in-place change of the saved output went unnoticed")


def _special_rejects_single_value_per_channel():
    import torch
    from aegan_fast.kernels import bn_act
    try:
        bn_act.bn_act(torch.randn(1, 5, 1, 1), None, None, None, None, True, 0.1, 1e-5, "relu", 0.0)
    except ValueError as e:
        if "more than 1 value per channel" in str(e):
            return "ok"
        raise
    raise AssertionError("no error for one value per channel in training")


def main(argv):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    import torch
    torch.set_num_threads(1)
    wanted = [c for c in CASES if not argv or any(a in c for a in argv)]
    out = {}
    for cid in wanted:
        try:
            out[cid] = _run_case(CASES[cid])
        except Exception as e:  # report, keep going: the parent shows each case on its own
            out[cid] = f"FAIL: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        finally:
            from aegan_fast.kernels import _common
            _common.TILE_OVERRIDE = None
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
