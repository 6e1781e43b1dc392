"""The cuda and triton backends on a real GPU: parity with the reference (cuDNN), running statistics,
memory_efficient, torch.library.opcheck and torch.compile(fullgraph=True).

Every test skips with a reason where there is no CUDA device or the backend does not load (the
reason is the dispatcher's: e.g. "extension built without CUDA").
"""
from __future__ import annotations

import itertools

import pytest
import torch

from aegan_fast.ops import dispatch, reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU backends cannot run here")
BACKENDS = ("cuda", "triton")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = dispatch.availability()[request.param]
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    return dispatch._load(request.param)


def _close(name, got, ref, tol):
    if ref is None:
        assert got is None, name
        return
    got, ref = got.detach().float(), ref.detach().float()
    scale = 1.0 + ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= tol * scale and torch.isfinite(got).all(), f"{name}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


def _run(fn, add, x, r, w, b, rm, rv, dy, training, act, memory_efficient):
    xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
    m, v = rm.clone(), rv.clone()
    if add:
        y = fn(xx, rr, m, v, ww, bb, training, 0.1, 1e-5, act, 0.2)
    else:
        y = fn(xx, m, v, ww, bb, training, 0.1, 1e-5, act, 0.2, memory_efficient)
    y.backward(dy)
    return dict(y=y, grad_x=xx.grad, grad_weight=ww.grad, grad_bias=bb.grad, running_mean=m, running_var=v,
                grad_residual=rr.grad if add else None)


def _inputs(shape, dtype, layout, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    N, C, H, W = shape
    kw = dict(device="cuda", generator=g)
    x = (torch.randn(N, C, H, W, **kw) * 2 + 0.5).to(dtype)
    r = torch.randn(N, C, H, W, **kw).to(dtype)
    dy = torch.randn(N, C, H, W, **kw).to(dtype)
    if layout == "channels_last":
        x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
    w = torch.randn(C, **kw) * 0.5 + 1
    b = torch.randn(C, **kw) * 0.5
    rm, rv = torch.randn(C, **kw) * 0.3, torch.rand(C, **kw) + 0.5
    return x, r, w, b, rm, rv, dy


CASES = list(itertools.product(("bn_act", "bn_add_act"), ("identity", "relu", "leaky_relu"), (True, False),
                               ("nchw", "channels_last")))


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (16, 64, 32, 32)], ids=["odd", "realistic"])
@pytest.mark.parametrize("op,act,training,layout", CASES,
                         ids=[f"{o}-{a}-{'train' if t else 'eval'}-{l}" for o, a, t, l in CASES])
def test_parity(backend, shape, op, act, training, layout):
    add = op == "bn_add_act"
    args = _inputs(shape, torch.float32, layout)
    ref = _run(R.bn_add_act if add else R.bn_act, add, *args, training, act, False)
    got = _run(backend.bn_add_act if add else backend.bn_act, add, *args, training, act, False)
    for k in ref:
        _close(k, got[k], ref[k], TOL[torch.float32])
    if layout == "channels_last":
        assert got["y"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", ["bn_act", "bn_add_act"])
def test_parity_low_precision(backend, dtype, op):
    add = op == "bn_add_act"
    args = _inputs((16, 64, 32, 32), dtype, "channels_last")
    ref = _run(R.bn_add_act if add else R.bn_act, add, *args, True, "leaky_relu", False)
    got = _run(backend.bn_add_act if add else backend.bn_act, add, *args, True, "leaky_relu", False)
    for k in ref:
        _close(k, got[k], ref[k], TOL[dtype])


@pytest.mark.parametrize("act", ["identity", "leaky_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_memory_efficient(backend, act, training):
    args = _inputs((4, 8, 15, 17), torch.float32, "nchw")
    ref = _run(R.bn_act, False, *args, training, act, False)
    got = _run(backend.bn_act, False, *args, training, act, True)
    for k in ref:
        _close(k, got[k], ref[k], TOL[torch.float32])
    x = args[0].clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = backend.bn_act(x, None, None, args[2], args[3], True, 0.1, 1e-5, act, 0.2, True)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == y.data_ptr(), "memory_efficient must save only the output"


def test_running_stats_match_module(backend):
    bn = torch.nn.BatchNorm2d(64).cuda()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 64, 32, 32, device="cuda", generator=g) * 3 + 1
        bn(x)
        backend.bn_act(x, rm, rv, bn.weight, bn.bias, True, 0.1, bn.eps, "relu", 0.0)
    _close("running_mean", rm, bn.running_mean, 1e-5)
    _close("running_var", rv, bn.running_var, 1e-5)


def _ops_of(name):
    ns = torch.ops.aegan_fast
    if name == "cuda":
        return [ns.bn_act_fwd_cuda.default, ns.bn_act_bwd_cuda.default]
    return [ns.triton_bn_act_fwd.default, ns.triton_bn_add_act_fwd.default]


def test_opcheck(backend):
    x, r, w, b, rm, rv, dy = _inputs((3, 5, 7, 9), torch.float32, "channels_last")
    x.requires_grad_()
    w.requires_grad_()
    if backend.name == "cuda":
        fwd, bwd = _ops_of("cuda")
        torch.library.opcheck(fwd, (x, r, w, b, None, None, True, 1e-5, "leaky_relu", 0.2, False))
        torch.library.opcheck(fwd, (x, None, w, b, rm, rv, False, 1e-5, "relu", 0.0, False))
        _, mean, var = fwd(x.detach(), None, w.detach(), b, None, None, True, 1e-5, "relu", 0.0, False)
        torch.library.opcheck(bwd, (dy, x.detach(), None, w.detach(), b, mean, var, True, 1e-5, "relu", 0.0,
                                    False, False))
    else:
        act_fwd, add_fwd = _ops_of("triton")
        torch.library.opcheck(act_fwd, (x, w, b, None, None, True, 1e-5, "leaky_relu", 0.2, False))
        torch.library.opcheck(act_fwd, (x, w, b, rm, rv, False, 1e-5, "relu", 0.0, True))
        torch.library.opcheck(add_fwd, (x, r, w, b, None, None, True, 1e-5, "leaky_relu", 0.2))


def test_compile_fullgraph_residual_block(backend, monkeypatch):
    """A residual block through the backend compiles without graph breaks and matches eager."""
    monkeypatch.setattr(dispatch, "_requested", backend.name)
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
    compiled = torch.compile(block, fullgraph=True)
    y_c = compiled(x)
    y_e = eager(x)
    _close("y", y_c, y_e, 1e-4)
    y_c.square().mean().backward()
    y_e.square().mean().backward()
    _close("grad conv1", block.conv1.weight.grad, eager.conv1.weight.grad, 1e-4)
    _close("running_var", block.bn1.running_var, eager.bn1.running_var, 1e-5)
