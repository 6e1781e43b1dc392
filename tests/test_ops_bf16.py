"""The fused ops on bf16 activations with fp32 parameters (the trainer's bf16 path: bf16
channels_last activations, fp32 weight, bias and running buffers), on the cpp kernels with every
instruction set this CPU runs (base, avx2, avx512: csrc/bn_act_cpu.cpp picks one at run time).

Truth is the reference module in fp64 on the same bf16 values upcast, so the only errors measured
are each implementation's own. Bounds, from how cpp computes: it reads the exact bf16 inputs, works
in fp32 and rounds each activation-sized result (out, grad x, grad residual) once to bf16, so each
element is off by at most half a bf16 ulp (bf16 keeps 8 significant bits: half an ulp is at most
2^-8 of the value) plus fp32 noise (~1e-6 of the tensor's scale, from sums over N*H*W values and
the cancelling dz - mean(dz) - xhat*mean(dz*xhat)); the bound is 2^-8 |truth| + 1e-5 max|truth|,
element by element (truncating instead of rounding, up to one ulp = 2^-7, fails it). grad weight / bias and the running
statistics are fp32 results of fp32 arithmetic on exact inputs (no bf16 rounding): 1e-4 of the
tensor's scale. And cpp must be no less accurate than the reference run in bf16 itself (which
rounds twice, after the BatchNorm and after the activation / add): within 1.5x its error.
"""
from __future__ import annotations

import pytest
import torch

from aegan_fast import ops
from aegan_fast.ops import BatchNormAct2d, BatchNormAddAct2d, dispatch
from ops_parity import away_from_kink

WHY_NOT = dispatch.availability()["cpp"]
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"cpp backend unavailable: {WHY_NOT}")

ISAS_ALL = ("base", "avx2", "avx512")
if WHY_NOT is None:
    from aegan_fast import _C
    ISAS = ISAS_ALL[:ISAS_ALL.index(_C.best_cpu_isa()) + 1]
else:
    ISAS = ("base",)
CASES = [("bn_act", "leaky_relu"), ("bn_act", "relu"), ("bn_add_act", "identity"), ("bn_add_act", "leaky_relu")]
SHAPES = [(3, 5, 7, 9), (4, 64, 16, 16)]  # odd sizes (vector tails everywhere); C=64, several threads
FMTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@pytest.fixture(params=ISAS)
def isa(request):
    before = _C.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _C.set_cpu_isa(before)


def make(shape, op, act, fmt, seed=0):
    N, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g) * 2 + 0.5
    r = torch.randn(N, C, H, W, generator=g)
    grad = torch.randn(N, C, H, W, generator=g)
    state = dict(weight=torch.rand(C, generator=g) + 0.5, bias=torch.randn(C, generator=g) * 0.1,
                 running_mean=torch.randn(C, generator=g) * 0.1, running_var=torch.rand(C, generator=g) + 0.5)
    if act != "identity":
        # 0.05 (in units of the pre-activation) clears the kink by more than bf16 rounding of x or
        # the residual can move it back (|x| * k * 2^-9 ~ 0.01 here): both sides then agree on
        # every element's side of the kink, which is not what this file tests.
        x, r = away_from_kink(op, x, r, state["weight"], state["bias"], None, None, True, gap=0.05)
    x, r, grad = (t.to(torch.bfloat16).contiguous(memory_format=fmt) for t in (x, r, grad))
    return x, r, grad, state


def module_step(op, act, x, r, grad, state, backend, dtype=torch.float32):
    """One training forward + backward through the module (parameters and buffers in ``dtype``)."""
    C = x.shape[1]
    m = (BatchNormAct2d(C, act, 0.2) if op == "bn_act" else BatchNormAddAct2d(C, act, 0.2)).to(dtype)
    m.load_state_dict({**{k: v.to(dtype) for k, v in state.items()}, "num_batches_tracked": torch.tensor(0)})
    x = x.detach().to(dtype if dtype == torch.float64 else x.dtype).requires_grad_()
    r = r.detach().to(x.dtype).requires_grad_()
    with ops.use_backend(backend):
        y = m(x) if op == "bn_act" else m(x, r)
    y.backward(grad.to(x.dtype))
    return dict(out=y.detach(), dx=x.grad, dres=r.grad if op == "bn_add_act" else None, dw=m.weight.grad,
                db=m.bias.grad, rm=m.running_mean, rv=m.running_var)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", list(FMTS))
@pytest.mark.parametrize("op,act", CASES)
def test_bf16_against_fp64_truth(isa, op, act, layout, shape):
    fmt = FMTS[layout]
    x, r, grad, state = make(shape, op, act, fmt)
    got = module_step(op, act, x, r, grad, state, "cpp")
    low = module_step(op, act, x, r, grad, state, "reference")
    truth = module_step(op, act, x, r, grad, state, "reference", torch.float64)
    for k in ("out", "dx", "dres", "dw", "db", "rm", "rv"):
        if truth[k] is None:
            continue
        g, t = got[k], truth[k]
        act_sized = k in ("out", "dx", "dres")
        # the contract: activation-sized results in x's dtype and layout, the rest fp32
        assert g.dtype == (torch.bfloat16 if act_sized else torch.float32), k
        if act_sized:
            assert g.is_contiguous(memory_format=fmt), f"{k} lost the input's layout"
        err = (g.double() - t).abs()
        scale = t.abs().max().item()
        if act_sized:
            bound = 2.0 ** -8 * t.abs() + 1e-5 * scale
            assert (err <= bound).all(), f"{k}: {(err > bound).sum().item()} elements off by more than 1 bf16 ulp, " \
                                         f"worst {err.max().item():.3g}"
        else:
            assert err.max().item() <= 1e-4 * scale, f"{k}: error {err.max().item():.3g} of scale {scale:.3g}"
        err_low = (low[k].double() - t).abs().max().item()
        assert err.max().item() <= 1.5 * err_low + 1e-6 * scale, \
            f"{k}: cpp error {err.max().item():.3g}, reference bf16 error {err_low:.3g}"


def _scale_shift(state, eps=1e-5):
    """The per-channel factors exactly as the cpp binding folds them (fp32 from fp32 inputs)."""
    invstd = (state["running_var"].double() + eps).rsqrt().float()
    scale = state["weight"] * invstd
    return scale, state["bias"] - state["running_mean"] * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", list(FMTS))
@pytest.mark.parametrize("residual", [False, True])
def test_apply_pass_rounds_like_torch(isa, dtype, layout, residual):
    """The forward apply pass in eval mode (no statistics: per-channel factors fixed) on every
    instruction set equals torch's own fp32 computation of act(x*scale + shift (+ r)) rounded to the
    storage dtype, bit for bit: round to nearest even, ties, subnormal results, inf and NaN
    included. This is what guards the vectorised storage conversions."""
    N, C, H, W = 3, 37, 5, 7  # C = 37: a vector body and a tail in every channels_last row
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, H, W, generator=g)
    x.view(-1)[:64] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0] * 12 + [1e-39] * 4)
    x.view(-1)[64:400] *= 1e-37  # results in the bf16 / fp16 subnormal range
    r = torch.randn(N, C, H, W, generator=g)
    state = dict(weight=torch.rand(C, generator=g) + 0.5, bias=torch.randn(C, generator=g) * 0.1,
                 running_mean=torch.randn(C, generator=g) * 0.1, running_var=torch.rand(C, generator=g) + 0.5)
    fmt = FMTS[layout]
    x, r = (t.to(dtype).contiguous(memory_format=fmt) for t in (x, r))
    scale, shift = _scale_shift(state)
    z = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if residual:
        z = z + r.float()
    want = torch.where(z < 0, z * 0.2, z).to(dtype)
    out, _, _ = _C.bn_forward(x, r if residual else None, state["weight"], state["bias"], state["running_mean"],
                              state["running_var"], False, 1e-5, 2, 0.2)
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)


def test_isa_choice():
    """The kernels run the best instruction set the CPU has unless told otherwise; an unknown or
    unsupported one is a clear error that changes nothing."""
    import os
    if os.environ.get("AEGAN_CPU_ISA") is None:
        assert _C.cpu_isa() == _C.best_cpu_isa()
    before = _C.cpu_isa()
    with pytest.raises(ValueError, match="instruction set must be one of base, avx2, avx512"):
        _C.set_cpu_isa("sse9")
    assert _C.cpu_isa() == before
    assert _C.set_cpu_isa("base") == before
    try:
        assert _C.cpu_isa() == "base"
    finally:
        _C.set_cpu_isa(before)


def test_no_fp32_copy_of_the_activation():
    """bf16 channels_last in, fp32 parameters: the cpp path allocates nothing activation-sized in
    fp32 (no upcast copy of x, the output, grad_out or grad x), only bf16 tensors, in its layout."""
    from torch.profiler import ProfilerActivity, profile
    shape = (4, 16, 32, 32)
    x, r, grad, state = make(shape, "bn_add_act", "leaky_relu", torch.channels_last)
    numel = x.numel()
    module_step("bn_add_act", "leaky_relu", x, r, grad, state, "cpp")  # warm up (lazy loads)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = module_step("bn_add_act", "leaky_relu", x, r, grad, state, "cpp")
    allocs = [e.self_cpu_memory_usage for e in prof.events()]  # each allocation, charged to the op that made it
    assert max(allocs) >= 2 * numel, "the profiler saw no activation-sized allocation at all"
    assert max(allocs) < 4 * numel, f"an fp32-sized allocation of {max(allocs)} bytes ({numel} values)"
    for k in ("out", "dx", "dres"):
        assert got[k].dtype == torch.bfloat16 and got[k].is_contiguous(memory_format=torch.channels_last), k


def test_auto_threshold_per_layout():
    """auto's size threshold is looked up by dtype and layout: bf16 channels_last has its own
    measured entry, everything else the device type's (measured in fp32)."""
    key = dispatch.size_key("cpu", torch.bfloat16, True)
    assert key == "cpu/bf16/channels_last"
    for dtype, cl in ((torch.float32, True), (torch.bfloat16, False), (torch.float32, False)):
        assert dispatch.size_key("cpu", dtype, cl) == "cpu"
    limit = dispatch.AUTO_MIN_PER_CHANNEL[key]
    assert ops.resolve("cpu", limit - 1, "auto", torch.bfloat16, True) == "reference"
    assert ops.resolve("cpu", limit, "auto", torch.bfloat16, True) == "cpp"
    # a module routes by its input's dtype and layout
    n = limit  # values per channel: N * H * W
    x = torch.randn(n // 16, 3, 4, 4).to(torch.bfloat16)
    bn = BatchNormAct2d(3, "leaky_relu")
    assert bn._kernel(x.contiguous(memory_format=torch.channels_last)) == "cpp"
    fp32_limit = dispatch.AUTO_MIN_PER_CHANNEL["cpu"]
    assert bn._kernel(x) == ("cpp" if n >= fp32_limit else "reference")
