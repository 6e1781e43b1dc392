"""What "agrees with the reference" means for the fused-op kernels, shared by the cpp, triton
(interpreter worker) and GPU parity tests.

``close``: rtol, with atol = rtol x the largest |value| of the expected tensor. The weight and bias
gradients are sums over N*H*W values and the two sides sum in different orders, so only an error
relative to the tensor's scale is meaningful (an element that is a near-cancelling sum has no
relative precision on either side). fp32 uses rtol 1e-5.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from aegan_fast.ops import reference


def close(actual, expected, rtol=1e-5, name=""):
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{name}: one side is None"
        return
    actual, expected = actual.detach(), expected.detach()
    if actual.dtype != expected.dtype:
        actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    atol = rtol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def away_from_kink(op, x, r, w, b, rm, rv, training, gap=1e-3):
    """Move inputs whose pre-activation lies within `gap` of 0 (the ReLU kink) out to +-gap. There
    the derivative jumps, and two correct implementations that round the pre-activation differently
    (a kernel: one fp32 fused x*scale+shift(+r); ATen: BN output rounded, then + r) can pick
    different sides for a value a few ulps from 0 -- at N=16 C=64 128x128 a few dozen of 16.7M
    elements -- which is not an error of either. For bn_add_act only the residual moves (statistics
    unchanged); for bn_act a few inputs move by ~1e-3 / (w * invstd), changing the statistics by ~1e-9."""
    f64 = lambda t: t.double() if t is not None else None  # noqa: E731
    z = reference.bn_act(x.double(), f64(rm), f64(rv), f64(w), f64(b), training, 0.0, 1e-5, "identity", 0.0)
    if op == "bn_add_act":
        z = z + r.double()
    step = torch.where(z >= 0, gap, -gap) * (z.abs() < gap)
    if op == "bn_add_act":
        return x, (r.double() + step).to(r.dtype)
    std = (x.double().var((0, 2, 3), unbiased=False) if training else rv.double()).add(1e-5).sqrt()
    k = (w.double() if w is not None else torch.ones_like(std)) / std
    return (x.double() + step / k.view(1, -1, 1, 1)).to(x.dtype), r


@contextmanager
def count_fused_forwards(kernel: str = "cpp"):
    """Counts the forward calls that reach ``kernel``'s adapter inside the block (``.calls``): a test
    that means the fused ops to run can say that they did."""
    from aegan_fast.ops import library
    real = library.adapter(kernel, "cpu")
    counter = SimpleNamespace(calls=0)

    def forward(*args):
        counter.calls += 1
        return real.forward(*args)

    library._adapters[kernel] = dataclasses.replace(real, forward=forward)
    try:
        yield counter
    finally:
        library._adapters[kernel] = real
