"""The resize-conv up layer as four phase convolutions (aegan_fast/ops/upsample.py) against the plain
nearest ×2 + reflect-padded 3×3 conv (ops/reference.py): forward, every gradient, both layouts,
odd shapes, fp32 and bf16, the export form, and which backend runs which.

Tolerance fp32: rtol 1e-5 with atol 1e-5 × the tensor's scale (tests/ops_parity.py). The phase form
sums up to four 3×3 taps into one weight before the products, so its sums run in another order."""
from __future__ import annotations

import pytest
import torch

from aegan_fast import ops
from aegan_fast.models import ResizeConv2d
from aegan_fast.ops import reference, upsample
from ops_parity import close

SHAPES = [(2, 5, 3, 4, 7), (1, 3, 1, 1, 2), (3, 8, 5, 2, 3), (2, 16, 6, 6, 16)]  # N, C_in, H, W, C_out


def _inputs(shape, channels_last, dtype=torch.float32, seed=0):
    n, cin, h, w, cout = shape
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, cin, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5)
    bias = torch.randn(cout, generator=g)
    grad = torch.randn(n, cout, 2 * h, 2 * w, generator=g).to(dtype).contiguous(memory_format=fmt)
    return x, weight, bias, grad


def _run(fn, x, weight, bias, grad):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    y = fn(x, weight, bias)
    y.backward(grad)
    return y, x.grad, weight.grad, bias.grad if bias is not None else None


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_phase_convolutions_equal_the_plain_resize_conv(shape, channels_last, with_bias):
    x, weight, bias, grad = _inputs(shape, channels_last)
    bias = bias if with_bias else None
    got = _run(upsample.resize_conv3x3, x, weight, bias, grad)
    want = _run(reference.resize_conv3x3, x, weight, bias, grad)
    for name, a, b in zip(("out", "grad x", "grad weight", "grad bias"), got, want):
        close(a, b, rtol=1e-5, name=name)
    if shape[2] * shape[3] > 1:  # a 1×1 map is both layouts at once
        assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_bf16_under_autocast_is_near_fp32_truth():
    """The trainer's case: bf16 channels_last activations, fp32 weights, under torch.autocast. Against
    the plain formula in fp32 on the same (rounded) inputs, within the plain formula's own bf16 error
    (×1.5: both round the products' inputs to bf16, the phase form its summed weights too)."""
    x, weight, bias, grad = _inputs((4, 32, 6, 5, 16), True, torch.bfloat16, seed=3)
    truth = _run(reference.resize_conv3x3, x.float(), weight, bias, grad.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(upsample.resize_conv3x3, x, weight, bias, grad)
        plain = _run(reference.resize_conv3x3, x, weight, bias, grad)
    assert got[0].dtype == torch.bfloat16
    for name, a, p, t in zip(("out", "grad x", "grad weight", "grad bias"), got, plain, truth):
        scale = t.abs().max()
        err, plain_err = ((a.float() - t).abs().max() / scale).item(), ((p.float() - t).abs().max() / scale).item()
        assert err <= 1.5 * plain_err + 1e-3, (name, err, plain_err)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_export_form_interleaves_as_the_autograd_function_does(channels_last):
    """Without gradients (sampling, ONNX export) the phases are interleaved by stock ops; with them by
    ``_Interleave``: the same values, the same layout."""
    x, weight, bias, _ = _inputs((2, 4, 3, 5, 6), channels_last)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"),
                                   upsample.phase_weights(weight), bias.repeat(4))
    fn, stock = upsample._Interleave.apply(y), upsample.interleave(y)
    assert torch.equal(fn, stock) and fn.stride() == stock.stride()
    conv = ResizeConv2d(4, 6)
    with torch.no_grad():  # the module's own no-grad path goes through ``interleave``
        close(conv(x), reference.resize_conv3x3(x, conv.weight, conv.bias), name="no-grad module")

def test_the_reference_backend_runs_the_plain_formula(monkeypatch):
    """ops=reference (the bench's plain port) keeps interpolate + pad + conv; every other backend the
    phase form."""
    seen = []
    monkeypatch.setattr(upsample, "resize_conv3x3", lambda *a: seen.append("phases") or reference.resize_conv3x3(*a))
    conv, x = ResizeConv2d(3, 4), torch.randn(1, 3, 4, 4)
    with ops.use_backend("reference"):
        conv(x)
    assert seen == []
    conv(x)
    assert seen == ["phases"]
