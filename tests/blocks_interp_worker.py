"""Fused block parity cases for test_blocks_triton.py, run in a child process with TRITON_INTERPRET=1
(interp_harness.py says why, and how to run this file).

What a parity case does: a stock-module block (nn.Conv2d(padding_mode="reflect") / nn.ConvTranspose2d and
nn.BatchNorm2d: the layout of checkpoints saved before the fused path existed) is randomised; its
state_dict loads (strict) into two fresh models.ResBlock / models._up blocks, one run under
ops.use_backend("triton") (the fused op), the other under ops.use_backend("reference") (F.conv2d,
F.batch_norm): two training steps, each forward + backward with every gradient compared (x, conv
weights, BN weights and biases), then the running statistics and num_batches_tracked, then one eval
step (output and gradients again).

Tolerances: fp32 to 1e-5 of each tensor's scale (ops_parity.close), the running statistics to 1e-6.
bf16 (activations and conv weights in bf16, BatchNorm parameters and statistics fp32, as the
trainer keeps them): the output against the fp32 reference block on the same rounded inputs and
weights, no worse than 2x the bf16 reference block's own error + one bf16 ulp of scale; the
gradients against fp64 evaluated at the fused op's own forward state (see _exact_grads and the
comment at the check for why and for the bound).
"""
from __future__ import annotations

import itertools
import sys

from interp_harness import close as _close, expect_error, worker_main

SMALL = (3, 5, 7, 9)   # odd on purpose: no dimension is a power of two or a multiple of a block
WIDE = (2, 64, 8, 8)   # the models' channel count: several channel blocks in the kernels


def _cases():
    cases = {}
    for act, layout in itertools.product(("relu", "leaky_relu"), ("nchw", "channels_last")):
        cases[f"resblock-{act}-{layout}-fp32"] = dict(block="res", act=act, layout=layout, shape=SMALL)
    cases["resblock-leaky_relu-channels_last-fp32-C64"] = dict(block="res", act="leaky_relu",
                                                               layout="channels_last", shape=WIDE)
    cases["resblock-relu-nchw-fp32-C64"] = dict(block="res", act="relu", layout="nchw", shape=WIDE)
    cases["resblock-identity-nchw-fp32-momentum_none"] = dict(block="res", act="identity", layout="nchw",
                                                              shape=SMALL, momentum=None)
    cases["resblock-leaky_relu-channels_last-bf16"] = dict(block="res", act="leaky_relu", layout="channels_last",
                                                           shape=SMALL, dtype="bfloat16")
    cases["resblock-relu-nchw-bf16-C64"] = dict(block="res", act="relu", layout="nchw", shape=WIDE,
                                                dtype="bfloat16")
    for layout in ("nchw", "channels_last"):
        cases[f"up_block-{layout}-fp32"] = dict(block="up", act="relu", layout=layout, shape=SMALL, cout=6)
    cases["up_block-nchw-fp32-momentum_none"] = dict(block="up", act="relu", layout="nchw", shape=SMALL, cout=6,
                                                     momentum=None)
    cases["up_block-channels_last-fp32-C64"] = dict(block="up", act="relu", layout="channels_last",
                                                    shape=(2, 64, 4, 4), cout=32)
    cases["up_block-channels_last-bf16"] = dict(block="up", act="relu", layout="channels_last", shape=SMALL,
                                                cout=6, dtype="bfloat16")
    for name in ("auto_never_fused", "explicit_triton_is_fused", "other_device_is_an_error",
                 "sync_batchnorm_world2_not_fused", "unsupported_inputs_not_fused", "saves_x_y1_y2",
                 "not_twice_differentiable", "opcheck"):
        cases[f"special-{name}"] = dict(special=name)
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------------------------
# the worker (runs with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

def _stock(case, g):
    """The block as stock modules, randomised (BN affine and running statistics too)."""
    import torch
    from torch import nn
    N, C, H, W = case["shape"]
    m = nn.Module()
    if case["block"] == "res":
        m.conv1 = nn.Conv2d(C, C, 3, 1, 1, bias=False, padding_mode="reflect")
        m.bn1 = nn.BatchNorm2d(C)
        m.conv2 = nn.Conv2d(C, C, 3, 1, 1, bias=False, padding_mode="reflect")
        m.bn2 = nn.BatchNorm2d(C)
        bns = (m.bn1, m.bn2)
    else:
        m = nn.Sequential(nn.ConvTranspose2d(C, case["cout"], 4, 2, 1, bias=False), nn.BatchNorm2d(case["cout"]))
        bns = (m[1],)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.3) + (1.0 if p.dim() == 1 else 0))
        for bn in bns:
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.5)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return m.state_dict()


def _ours(case, state, dtype):
    """A models.ResBlock / models._up block loaded (strict) from the stock modules' state_dict; conv
    weights in ``dtype``, BatchNorm in fp32."""
    import torch
    from aegan_fast import models
    C = case["shape"][1]
    if case["block"] == "res":
        m = models.ResBlock(C, case["act"], 0.2)
        bns, convs = (m.bn1, m.bn2), (m.conv1, m.conv2)
    else:
        m = models._up(C, case["cout"], "transposed")
        bns, convs = (m[1],), (m[0],)
    m.load_state_dict(state, strict=True)
    for bn in bns:
        bn.momentum = case.get("momentum", 0.1)
    for conv in convs:
        conv.to(dtype)
    if case["layout"] == "channels_last":
        m.to(memory_format=torch.channels_last)
    return m


def _step(m, backend, x, dy):
    from aegan_fast import ops
    x = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    with ops.use_backend(backend):
        y = m(x)
    y.backward(dy)
    out = {"y": y, "grad_x": x.grad}
    out.update({f"grad {k}": p.grad for k, p in m.named_parameters()})
    return out


def _buffers(m):
    return {k: b.clone() for k, b in m.named_buffers()}


def _run(case, state, dtype, backend, xs, dys, fmt):
    """[step results...] for 2 training steps and one eval step, and the buffers after training."""
    m = _ours(case, state, dtype)
    m.train()
    cvt = lambda t: t.to(dtype).contiguous(memory_format=fmt)  # noqa: E731
    res = [_step(m, backend, cvt(xs[0]), cvt(dys[0])), _step(m, backend, cvt(xs[1]), cvt(dys[1]))]
    bufs = _buffers(m)
    m.eval()
    res.append(_step(m, backend, cvt(xs[2]), cvt(dys[2])))
    return res, bufs


def _run_case(case):
    import torch

    if "special" in case:
        return globals()["_special_" + case["special"]]()
    dtype = getattr(torch, case.get("dtype", "float32"))
    fmt = torch.channels_last if case["layout"] == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    state = _stock(case, g)
    N, C, H, W = case["shape"]
    out_shape = (N, C, H, W) if case["block"] == "res" else (N, case["cout"], 2 * H, 2 * W)
    xs = [(torch.randn(N, C, H, W, generator=g) * 1.5 + 0.3).to(dtype) for _ in range(3)]
    dys = [torch.randn(out_shape, generator=g).to(dtype) for _ in range(3)]
    calls, restore = _counting()
    try:
        got, got_bufs = _run(case, state, dtype, "triton", xs, dys, fmt)
    finally:
        restore()
    want_op = "resblock_op" if case["block"] == "res" else "up_block_op"
    if calls != [want_op] * 3:
        raise AssertionError(f"the fused op was not what ran: calls {calls}")
    if dtype == torch.float32:
        ref, ref_bufs = _run(case, state, dtype, "reference", xs, dys, fmt)
        for i, (a, b) in enumerate(zip(got, ref)):
            for k in b:
                if case["act"] == "identity" and k == "grad bn1.bias" and i < 2:
                    # exactly 0 in training: a constant added to a1 is a constant per channel of
                    # y2 (reflect padding keeps constants), which BN2's batch mean removes; both
                    # sides hold rounding noise, bounded by the scale of its neighbour's gradient
                    bound = 1e-5 * b["grad bn1.weight"].abs().max().item()
                    if max(a[k].abs().max().item(), b[k].abs().max().item()) > bound:
                        raise AssertionError(f"step {i} {k}: {a[k]} / {b[k]}, expected 0 (bound {bound:.3g})")
                    continue
                _close(f"step {i} {k}", a[k], b[k])
        for k in ref_bufs:
            if k.endswith("num_batches_tracked"):
                if not torch.equal(got_bufs[k], ref_bufs[k]):
                    raise AssertionError(f"{k}: {got_bufs[k]} vs {ref_bufs[k]}")
            else:
                _close(k, got_bufs[k], ref_bufs[k], 1e-6)
    else:
        # forward: against the fp32 reference block (same rounded inputs and conv weights), no worse
        # than 2x the bf16 reference's own error + one bf16 ulp of scale
        f32 = [t.float() for t in xs], [t.float() for t in dys]
        rounded = {k: (v.to(dtype).float() if v.dim() == 4 else v) for k, v in state.items()}
        truth, truth_bufs = _run(case, rounded, torch.float32, "reference", *f32, fmt)
        low, _ = _run(case, state, dtype, "reference", xs, dys, fmt)
        for i, (a, t, lo) in enumerate(zip(got, truth, low)):
            scale = t["y"].abs().max().item()
            err, err_ref = ((v["y"].float() - t["y"]).abs().max().item() for v in (a, lo))
            if err > 2 * err_ref + 2 ** -8 * scale:
                raise AssertionError(f"step {i} y: fused bf16 error {err:.3g} (scale {scale:.3g}), "
                                     f"the bf16 reference's {err_ref:.3g}")
        # backward: against fp64 at the op's own forward state (_exact_grads says why), 1.5e-2 of
        # each gradient's scale: the interpreter stores bf16 by truncation, not rounding to nearest
        # as a GPU does (triton_interp_worker.py), so the bf16 dy2 and dy1 carry a one-sided error
        # of up to one ulp that dgrad/wgrad sum coherently (measured up to 8.6e-3 here)
        for i, (a, (name, args, outputs)) in enumerate(zip(got, calls.log)):
            exact = _exact_grads(name, args, outputs, dys[i])
            keys = ["grad_x", *(f"grad {k}" for k in (
                ("conv1.weight", "conv2.weight", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias")
                if name == "resblock_op" else ("0.weight", "1.weight", "1.bias")))]
            for k, e in zip(keys, exact):
                _close(f"step {i} {k}", a[k].double(), e, 1.5e-2)
        for k in truth_bufs:
            if not k.endswith("num_batches_tracked"):
                _close(k, got_bufs[k], truth_bufs[k], 1e-2)  # statistics of bf16-rounded conv outputs
    if case["layout"] == "channels_last" and not got[0]["y"].is_contiguous(memory_format=torch.channels_last):
        raise AssertionError("channels_last input gave an output in another memory format")
    if got[0]["y"].dtype != dtype:
        raise AssertionError(f"output dtype {got[0]['y'].dtype} for {dtype} input")
    return "ok"


_REAL: dict = {}


def _resblock(C=5, act="leaky_relu"):
    from aegan_fast import models
    return models.ResBlock(C, act, 0.2)


def _counting():
    """Patch the block ops to record their calls; returns (calls, restore): calls holds the op
    names, calls.log (name, args, outputs) per call."""
    from aegan_fast.ops import blocks

    if not _REAL:  # the unpatched ops, taken before the first patch; every restore() puts them back
        _REAL.update(resblock_op=blocks.resblock_op, up_block_op=blocks.up_block_op)

    class Calls(list):
        log: list

    calls = Calls()
    calls.log = []

    def spy(*a, _real, _n):
        out = _real(*a)
        calls.append(_n)
        calls.log.append((_n, a, out))
        return out

    for name in ("resblock_op", "up_block_op"):
        setattr(blocks, name, lambda *a, _real=_REAL[name], _n=name: spy(*a, _real=_real, _n=_n))

    def restore():
        for name in ("resblock_op", "up_block_op"):
            setattr(blocks, name, _REAL[name])
    return calls, restore


def _exact_grads(name, args, outputs, grad):
    """Every gradient of the block in fp64, evaluated at the fused op's own forward state: its y1,
    y2 (resp. y) and statistics are the values, the plain formulas give the derivatives. The bf16
    backward is judged against this: an fp32 truth recomputed from scratch decides the ReLU kinks
    on unrounded y1, and an element of z1 = BN1(y1) within a bf16 rounding of 0 (a few in 10^4,
    measured: z = -1.2e-3 in fp32, +7.9e-6 from the bf16-rounded y1) then flips a derivative and
    moves a BN-parameter gradient by 5-15%, which is no error of either side."""
    import torch
    import torch.nn.functional as F
    from aegan_fast.ops import reference
    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    at = lambda value, t: t + (value.detach().double() - t).detach()  # noqa: E731  value of one, gradient of t

    def bn(y, mean, var, g, b, training, eps):
        if training:
            dims = (0, 2, 3)
            mean = at(mean, y.mean(dims))
            var = at(var, y.var(dims, unbiased=False))
        shape = (1, -1, 1, 1)
        return (y - mean.double().view(shape)) * torch.rsqrt(var.double().view(shape) + eps) * g.view(shape) + \
            b.view(shape)

    if name == "resblock_op":
        x, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, training, eps, act, slope, _ = args
        _, y1, y2, m1, v1, m2, v2 = outputs
        if not training:
            m1, v1, m2, v2 = rm1, rv1, rm2, rv2
        leaves = [d(t) for t in (x, w1, w2, g1, b1, g2, b2)]
        X, W1, W2, G1, B1, G2, B2 = leaves
        conv = lambda a, w: F.conv2d(F.pad(a, (1, 1, 1, 1), mode="reflect"), w)  # noqa: E731
        Y1 = at(y1, conv(X, W1))
        A1 = reference.activate(bn(Y1, m1, v1, G1, B1, training, eps), act, slope)
        out = bn(at(y2, conv(A1, W2)), m2, v2, G2, B2, training, eps) + X
    else:
        x, w, g, b, rm, rv, training, eps, _ = args
        _, y, m, v = outputs
        if not training:
            m, v = rm, rv
        leaves = [d(t) for t in (x, w, g, b)]
        X, Wt, G, B = leaves
        Y = at(y, F.conv_transpose2d(X, Wt, stride=2, padding=1))
        out = torch.relu(bn(Y, m, v, G, B, training, eps))
    return torch.autograd.grad(out, leaves, grad.double())


def _special_auto_never_fused():
    """``auto`` (and reference, cpp) take the per-op path on every device: no GPU measurement yet."""
    import torch
    from aegan_fast import models, ops
    x = torch.randn(*SMALL)
    for dev in ("cpu", "meta"):
        t = x.to(dev)
        for backend in ("auto", "reference", "cpp"):
            if ops.block_kernel(t, "relu", backend=backend) is not None:
                raise AssertionError(f"{backend} on {dev} picked a block kernel")
    calls, restore = _counting()
    try:
        with ops.use_backend("auto"):
            _resblock()(x).sum().backward()
            models._up(5, 4, "transposed")(x).sum().backward()
    finally:
        restore()
    if calls:
        raise AssertionError(f"auto ran the fused ops: {calls}")
    return "ok"


def _special_explicit_triton_is_fused():
    import torch
    from aegan_fast import models, ops
    x = torch.randn(*SMALL)
    calls, restore = _counting()
    try:
        with ops.use_backend("triton"):
            if ops.block_kernel(x, "leaky_relu") != "triton":
                raise AssertionError(f"block_kernel under use_backend('triton'): {ops.block_kernel(x, 'leaky_relu')}")
            _resblock()(x)
            models._up(5, 4, "transposed")(x)
            models._up(5, 4, "resize_conv")(x)  # no block op for the resize conv: layer by layer
    finally:
        restore()
    if calls != ["resblock_op", "up_block_op"]:
        raise AssertionError(f"calls {calls}")
    return "ok"


def _special_other_device_is_an_error():
    """An explicit triton request for tensors it cannot run on is a clear error, not a fallback."""
    import torch
    from aegan_fast import ops
    x = torch.randn(*SMALL, device="meta")
    try:
        with ops.use_backend("triton"):
            ops.block_kernel(x, "relu")
    except ops.BackendUnavailable as e:
        if "cannot run on meta tensors" in str(e):
            return "ok"
        raise
    raise AssertionError("no error for triton on meta tensors")


def _special_sync_batchnorm_world2_not_fused():
    """Inside ops.sync_batchnorm() with two ranks (torch.distributed mocked: the decision is all that
    is tested; sync_bn's own tests run real ranks) the block goes layer by layer, through sync_bn."""
    import torch
    import torch.distributed as dist
    from aegan_fast import ops
    from aegan_fast.ops import sync_bn
    x = torch.randn(*SMALL)
    saved = dist.is_initialized, dist.get_world_size, sync_bn.run
    synced = []
    dist.is_initialized = lambda: True
    dist.get_world_size = lambda group=None: 2
    sync_bn.run = lambda kernel, x, residual, *a: synced.append(kernel) or (x if residual is None else x + residual)
    calls, restore = _counting()
    try:
        with ops.use_backend("triton"), ops.sync_batchnorm():
            if ops.block_kernel(x, "relu") is not None:
                raise AssertionError("block_kernel picked the fused op inside sync_batchnorm with world 2")
            _resblock()(x)
    finally:
        dist.is_initialized, dist.get_world_size, sync_bn.run = saved
        restore()
    if calls or synced != ["triton", "triton"]:
        raise AssertionError(f"fused calls {calls}, synced BN calls {synced}")
    with ops.use_backend("triton"), ops.sync_batchnorm():  # no process group: unsynced, fused
        if ops.block_kernel(x, "relu") != "triton":
            raise AssertionError("without torch.distributed the fused path is not taken")
    return "ok"


def _special_unsupported_inputs_not_fused():
    """Cases the block op does not take fall back to the per-op path (which handles them)."""
    import torch
    from aegan_fast import ops
    x = torch.randn(*SMALL)
    w = torch.randn(5, 5, 3, 3)
    with ops.use_backend("triton"):
        for why, t, act, wt in (("H=1", torch.randn(3, 5, 1, 9), "relu", None),
                                ("W=1", torch.randn(3, 5, 7, 1), "relu", None),
                                ("fp16", x.half(), "relu", None), ("3-D", torch.randn(5, 7, 9), "relu", None),
                                ("activation", x, "tanh", None), ("weight dtype", x, "relu", w.double()),
                                ("weight device", x, "relu", w.to("meta"))):
            if ops.block_kernel(t, act, wt) is not None:
                raise AssertionError(f"{why}: the fused path was taken")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if ops.block_kernel(x, "relu", w) is not None:
                raise AssertionError("autocast: the fused path was taken")
        calls, restore = _counting()
        try:
            y = _resblock(5, "relu")(torch.randn(3, 5, 1, 9))  # the per-op path: reflect pad's own error
        except RuntimeError as e:
            if "Padding size should be less than" not in str(e):
                raise
        finally:
            restore()
        if calls:
            raise AssertionError(f"fused op ran for H=1: {calls}")
    return "ok"


def _special_saves_x_y1_y2():
    """The contract: backward keeps x, y1, y2 (three activation-sized tensors), never the output
    or the normalised a1."""
    import torch
    from aegan_fast import ops
    m = _resblock(5, "relu")
    x = torch.randn(*SMALL, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with ops.use_backend("triton"):
            y = m(x)
    big = [t for t in saved if t.numel() == x.numel()]
    ptrs = {t.data_ptr() for t in big}
    if len(big) != 3 or x.data_ptr() not in ptrs or y.data_ptr() in ptrs:
        raise AssertionError(f"saved {[tuple(t.shape) for t in saved]}")
    return "ok"


def _special_not_twice_differentiable():
    import torch
    from aegan_fast import ops
    m = _resblock(5, "relu")
    x = torch.randn(*SMALL, requires_grad=True)
    with ops.use_backend("triton"):
        (gx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    return expect_error(lambda: gx.sum().backward(), RuntimeError, "not twice differentiable")


def _special_opcheck():
    """The schemas, fake kernels and autograd registrations agree with the kernels (torch.library.opcheck)."""
    import torch
    from aegan_fast.ops import blocks
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 4, 6, generator=g)
    w = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    p = lambda: (torch.rand(5, generator=g) + 0.5).requires_grad_()  # noqa: E731
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    for training in (True, False):
        rs = (torch.zeros(5), torch.ones(5)) if not training else (None, None)
        args = (x.clone().requires_grad_(), w(5, 5, 3, 3).requires_grad_(), w(5, 5, 3, 3).requires_grad_(),
                p(), p(), p(), p(), *rs, *rs, training, 1e-5, "leaky_relu", 0.2, "triton")
        torch.library.opcheck(blocks.resblock_op, args, test_utils=tests)
        rs = (torch.zeros(3), torch.ones(3)) if not training else (None, None)
        args = (x.clone().requires_grad_(), w(5, 3, 4, 4).requires_grad_(), p()[:3].detach().requires_grad_(),
                p()[:3].detach().requires_grad_(), *rs, training, 1e-5, "triton")
        torch.library.opcheck(blocks.up_block_op, args, test_utils=tests)
    return "ok"


if __name__ == "__main__":
    worker_main(sys.argv[1:], CASES, _run_case)
