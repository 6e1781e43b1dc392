"""The cuda and triton kernels on a real GPU: parity with the reference (cuDNN), running statistics,
the saved-tensor contract, torch.library.opcheck on the one op schema, and torch.compile(fullgraph=True).

Tolerances are the cpp tests' (tests/test_ops_cpp.py): fp32 to rtol 1e-5 with atol 1e-5 x the
expected tensor's scale, low precision against an fp32 truth on the same rounded inputs and no
worse than the reference's own error in that dtype.

Every test skips with a reason where there is no CUDA device or the kernel does not load (the
reason is the dispatcher's: e.g. "extension built without CUDA").
"""
from __future__ import annotations

import itertools
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from ops_parity import away_from_kink, close

from aegan_fast import ops
from aegan_fast.ops import library, reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU backends cannot run here")
KERNELS = ("cuda", "triton")


@pytest.fixture(params=KERNELS)
def backend(request):
    reason = ops.availability()[request.param]
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    return SimpleNamespace(name=request.param, bn_act=partial(library.bn_act, request.param),
                           bn_add_act=partial(library.bn_add_act, request.param))


def _close(name, got, ref, rtol=1e-5):
    close(got, ref, rtol, name)


def _run(fn, add, x, r, w, b, rm, rv, dy, training, act):
    xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
    m, v = rm.clone(), rv.clone()
    if add:
        y = fn(xx, rr, m, v, ww, bb, training, 0.1, 1e-5, act, 0.2)
    else:
        y = fn(xx, m, v, ww, bb, training, 0.1, 1e-5, act, 0.2)
    y.backward(dy)
    return dict(y=y, grad_x=xx.grad, grad_weight=ww.grad, grad_bias=bb.grad, running_mean=m, running_var=v,
                grad_residual=rr.grad if add else None)


def _inputs(shape, dtype, layout, seed=0, act="identity", training=True, add=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    N, C, H, W = shape
    kw = dict(device="cuda", generator=g)
    x = torch.randn(N, C, H, W, **kw) * 2 + 0.5
    r = torch.randn(N, C, H, W, **kw)
    dy = torch.randn(N, C, H, W, **kw).to(dtype)
    w = torch.randn(C, **kw) * 0.5 + 1
    b = torch.randn(C, **kw) * 0.5
    rm, rv = torch.randn(C, **kw) * 0.3, torch.rand(C, **kw) + 0.5
    if act != "identity":
        x, r = away_from_kink("bn_add_act" if add else "bn_act", x, r, w, b, rm, rv, training)
    x, r = x.to(dtype), r.to(dtype)
    if layout == "channels_last":
        x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
    return x, r, w, b, rm, rv, dy


CASES = list(itertools.product(("bn_act", "bn_add_act"), ("identity", "relu", "leaky_relu"), (True, False),
                               ("nchw", "channels_last")))


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (16, 64, 32, 32)], ids=["odd", "realistic"])
@pytest.mark.parametrize("op,act,training,layout", CASES,
                         ids=[f"{o}-{a}-{'train' if t else 'eval'}-{l}" for o, a, t, l in CASES])
def test_parity(backend, shape, op, act, training, layout):
    add = op == "bn_add_act"
    args = _inputs(shape, torch.float32, layout, act=act, training=training, add=add)
    ref = _run(R.bn_add_act if add else R.bn_act, add, *args, training, act)
    got = _run(backend.bn_add_act if add else backend.bn_act, add, *args, training, act)
    for k in ref:
        _close(k, got[k], ref[k])
    if layout == "channels_last":
        assert got["y"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", ["bn_act", "bn_add_act"])
def test_parity_low_precision(backend, dtype, op):
    """Against fp32 truth on the same rounded inputs: within 2 ulps of each tensor's scale, and no
    worse than the reference run in that dtype (which rounds twice)."""
    add = op == "bn_add_act"
    x, r, w, b, rm, rv, dy = _inputs((16, 64, 32, 32), dtype, "channels_last", act="leaky_relu", add=add)
    fn_ref = R.bn_add_act if add else R.bn_act
    got = _run(backend.bn_add_act if add else backend.bn_act, add, x, r, w, b, rm, rv, dy, True, "leaky_relu")
    low = _run(fn_ref, add, x, r, w, b, rm, rv, dy, True, "leaky_relu")
    truth = _run(fn_ref, add, x.float(), r.float(), w, b, rm, rv, dy.float(), True, "leaky_relu")
    rtol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    for k in truth:
        if truth[k] is None:
            continue
        _close(k, got[k], truth[k], rtol)
        err = (got[k].float() - truth[k].float()).abs().max().item()
        err_ref = (low[k].float() - truth[k].float()).abs().max().item()
        assert err <= 1.5 * err_ref + 1e-6 * truth[k].abs().max().item(), (k, err, err_ref)


@pytest.mark.parametrize("op,act,want", [("bn_act", "leaky_relu", "x"), ("bn_add_act", "relu", "x,r"),
                                         ("bn_add_act", "identity", "x")])
def test_saves_input_and_residual(backend, op, act, want):
    """The one contract: backward keeps x (and the residual with a non-identity activation), never the output."""
    x, r, w, b, *_ = _inputs((4, 8, 15, 17), torch.float32, "nchw")
    x.requires_grad_()
    r.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if op == "bn_act":
            y = backend.bn_act(x, None, None, w, b, True, 0.1, 1e-5, act, 0.2)
        else:
            y = backend.bn_add_act(x, r, None, None, w, b, True, 0.1, 1e-5, act, 0.2)
    big = sorted(t.data_ptr() for t in saved if t.numel() == x.numel())
    assert big == sorted({"x": x, "r": r}[n].data_ptr() for n in want.split(",")), [t.shape for t in saved]
    assert y.data_ptr() not in big


def test_running_stats_match_module(backend):
    bn = torch.nn.BatchNorm2d(64).cuda()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 64, 32, 32, device="cuda", generator=g) * 3 + 1
        bn(x)
        backend.bn_act(x, rm, rv, bn.weight, bn.bias, True, 0.1, bn.eps, "relu", 0.0)
    _close("running_mean", rm, bn.running_mean)
    _close("running_var", rv, bn.running_var)


def test_opcheck(backend):
    aeg = torch.ops.aegan_fast
    k = backend.name
    x, r, w, b, rm, rv, dy = _inputs((3, 5, 7, 9), torch.float32, "channels_last")
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.library.opcheck(aeg.bn_act, (xg, wg, b, None, None, True, 1e-5, "leaky_relu", 0.2, k))
    torch.library.opcheck(aeg.bn_act, (x, w, b, rm, rv, False, 1e-5, "relu", 0.0, k))
    torch.library.opcheck(aeg.bn_add_act, (xg, r, wg, b, None, None, True, 1e-5, "leaky_relu", 0.2, k))
    _, mean, var = aeg.bn_act(x, w, b, None, None, True, 1e-5, "relu", 0.0, k)
    torch.library.opcheck(aeg.bn_act_backward, (dy, x, w, b, mean, var, True, 1e-5, "relu", 0.0, k))
    torch.library.opcheck(aeg.bn_add_act_backward, (dy, x, r, w, b, mean, var, True, 1e-5, "relu", 0.0, k))


def test_compile_fullgraph_residual_block(backend):
    """A residual block through the backend compiles without graph breaks and matches eager."""
    from aegan_fast.ops import BatchNormAct2d, BatchNormAddAct2d

    class Block(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
            self.bn1 = BatchNormAct2d(c, "leaky_relu", 0.2)
            self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)
            self.bn2 = BatchNormAddAct2d(c, "identity")

        def forward(self, x):
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), x)

    torch.manual_seed(0)
    block = Block(16).cuda()
    eager = Block(16).cuda()
    eager.load_state_dict(block.state_dict())
    x = torch.randn(4, 16, 24, 24, device="cuda")
    with ops.use_backend(backend.name):
        compiled = torch.compile(block, fullgraph=True)
        y_c = compiled(x)
        y_e = eager(x)
        _close("y", y_c, y_e, 1e-4)
        y_c.square().mean().backward()
        y_e.square().mean().backward()
    _close("grad conv1", block.conv1.weight.grad, eager.conv1.weight.grad, 1e-4)
    _close("running_var", block.bn1.running_var, eager.bn1.running_var)
