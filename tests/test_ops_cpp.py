"""cpp kernel (csrc/, aegan_fast._C): parity with aegan_fast.ops.reference, the torch.library
ops (opcheck, double backward, torch.compile) and the activation codes shared with C++. The plain
CMake build with its C++ tests (ctest) is a build step of `make test` (make native-test), not a test here.

Tolerances (tests/ops_parity.py). fp32: rtol 1e-5, with atol = 1e-5 x the largest |value| of the
expected tensor (ATen sums in fp32 vectorised partial sums, cpp in fp32 blocks merged in fp64). bf16 / fp16 are checked against an fp32 computation on the same
(rounded) inputs: see test_low_precision for the bound and why.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aegan_fast import ops
from aegan_fast.ops import BatchNormAct2d, BatchNormAddAct2d, activations, dispatch, library, reference
from ops_parity import away_from_kink, close

WHY_NOT = dispatch.availability()["cpp"]


CPP = SimpleNamespace(bn_act=partial(library.bn_act, "cpp"), bn_add_act=partial(library.bn_add_act, "cpp")) \
    if WHY_NOT is None else None
needs_cpp = pytest.mark.skipif(CPP is None, reason=f"cpp backend unavailable: {WHY_NOT}")
ROOT = Path(__file__).resolve().parents[1]


def run(fn, op, x, residual, w, b, rm, rv, training, act, slope, grad, momentum=0.1, eps=1e-5):
    """One forward + backward; returns the output, every gradient and the running statistics."""
    x = x.detach().clone().requires_grad_()
    r = residual.detach().clone().requires_grad_() if residual is not None else None
    w = w.detach().clone().requires_grad_() if w is not None else None
    b = b.detach().clone().requires_grad_() if b is not None else None
    rm = rm.clone() if rm is not None else None
    rv = rv.clone() if rv is not None else None
    if op == "bn_act":
        y = fn(x, rm, rv, w, b, training, momentum, eps, act, slope)
    else:
        y = fn(x, r, rm, rv, w, b, training, momentum, eps, act, slope)
    y.backward(grad)
    return dict(out=y.detach(), dx=x.grad, dres=r.grad if r is not None else None,
                dw=w.grad if w is not None else None, db=b.grad if b is not None else None, rm=rm, rv=rv)


def make_inputs(N, C, H, W, channels_last=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g) * 2 + 0.5
    r = torch.randn(N, C, H, W, generator=g)
    grad = torch.randn(N, C, H, W, generator=g)
    w = torch.rand(C, generator=g) + 0.5
    b = torch.randn(C, generator=g) * 0.1
    rm = torch.randn(C, generator=g) * 0.1
    rv = torch.rand(C, generator=g) + 0.5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, r, grad = (t.to(dtype).contiguous(memory_format=fmt) for t in (x, r, grad))
    return x, r, grad, w, b, rm, rv


def check_parity(op, shape, act, training, channels_last=False, slope=0.2, affine=True):
    x, r, grad, w, b, rm, rv = make_inputs(*shape, channels_last=channels_last)
    if not affine:
        w = b = None
    if act != "identity":
        x, r = away_from_kink(op, x, r, w, b, rm, rv, training)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x, r = x.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt)
    res = r if op == "bn_add_act" else None
    got = run(getattr(CPP, op), op, x, res, w, b, rm, rv, training, act, slope, grad)
    want = run(getattr(reference, op), op, x, res, w, b, rm, rv, training, act, slope, grad)
    for k in ("out", "dx", "dres", "dw", "db", "rm", "rv"):
        if want[k] is None:
            assert got[k] is None, k
            continue
        close(got[k], want[k], name=k)
    if channels_last:
        assert got["out"].is_contiguous(memory_format=torch.channels_last)
        assert got["dx"].is_contiguous(memory_format=torch.channels_last)


ODD = (3, 5, 7, 9)


@needs_cpp
@pytest.mark.parametrize("op", ["bn_act", "bn_add_act"])
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_parity_odd_shape(op, act, training, channels_last):
    check_parity(op, ODD, act, training, channels_last)


@needs_cpp
@pytest.mark.parametrize("op", ["bn_act", "bn_add_act"])
@pytest.mark.parametrize("slope", [0.0, 3.0, -0.5])
def test_parity_other_slopes(op, slope):
    """The derivative comes from z recomputed from x (and the residual), never from the output's
    sign, so any slope is right, a negative one included."""
    check_parity(op, ODD, "leaky_relu", True, slope=slope)


@needs_cpp
@pytest.mark.parametrize("op", ["bn_act", "bn_add_act"])
def test_parity_without_affine(op):
    check_parity(op, ODD, "relu", True, affine=False)


@needs_cpp
@pytest.mark.parametrize("op,act,training,channels_last", [
    ("bn_act", "leaky_relu", True, False),
    ("bn_add_act", "relu", True, True),
    ("bn_act", "relu", False, True),
])
def test_parity_realistic(op, act, training, channels_last):
    """N=16, C=64, 128x128: the paper's batch at a real layer size (16.7M values, 2^18 per channel),
    where the order of summation matters most."""
    check_parity(op, (16, 64, 128, 128), act, training, channels_last)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["bn_act", "bn_add_act"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_low_precision(dtype, op, channels_last):
    """bf16/fp16 storage, fp32 arithmetic. The truth is the reference in fp32 on the same rounded
    inputs and grad. cpp rounds each stored result once, so its error is about one unit in the last
    place of the output (bf16: 2^-8 = 3.9e-3 relative; fp16: 2^-11) on top of fp32 noise; the
    bound is 2 ulps (bf16 8e-3, fp16 1e-3) relative to each tensor's scale, and the cpp error must
    also be no worse than the reference run in low precision itself (which rounds twice: after the
    BatchNorm and after the activation / residual add)."""
    x, r, grad, w, b, rm, rv = make_inputs(4, 6, 10, 11, channels_last=channels_last, dtype=dtype)
    res = r if op == "bn_add_act" else None
    got = run(getattr(CPP, op), op, x, res, w, b, rm, rv, True, "leaky_relu", 0.2, grad)
    f32 = lambda t: t.float() if t is not None else None  # noqa: E731
    truth = run(getattr(reference, op), op, f32(x), f32(res), w, b, rm, rv, True, "leaky_relu", 0.2, f32(grad))
    low = run(getattr(reference, op), op, x, res, w, b, rm, rv, True, "leaky_relu", 0.2, grad)
    rtol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    for k in ("out", "dx", "dres", "dw", "db", "rm", "rv"):
        if truth[k] is None:
            continue
        assert got[k].dtype == (dtype if k in ("out", "dx", "dres") else torch.float32), k
        close(got[k].float(), truth[k], rtol=rtol, name=k)
        err_cpp = (got[k].float() - truth[k]).abs().max().item()
        err_ref = (low[k].float() - truth[k]).abs().max().item()
        assert err_cpp <= 1.5 * err_ref + 1e-6 * truth[k].abs().max().item(), (k, err_cpp, err_ref)


@pytest.fixture
def cpp_backend():
    if CPP is None:
        pytest.skip(f"cpp backend unavailable: {WHY_NOT}")
    with ops.use_backend("cpp"):
        yield


def no_worse_than_reference(got, ref32, truth64, name, factor=3.0):
    """For quantities that are ill-conditioned sums (e.g. a BN weight gradient reached through a later
    BatchNorm, where terms cancel to 1e-4 of their size), fp32 has no 1e-5 relative precision on
    either side; the meaningful check is that cpp's error against an fp64 run is no worse than
    `factor` x the fp32 reference's own error."""
    err = (got.double() - truth64.double()).abs().max().item()
    err_ref = (ref32.double() - truth64.double()).abs().max().item()
    scale = truth64.abs().max().item()
    assert err <= factor * err_ref + 1e-6 * scale, f"{name}: cpp error {err:.3g}, fp32 reference error {err_ref:.3g}"


def _train_modules(backend, momentum, dtype=torch.float32, steps=5):
    with ops.use_backend(backend):
        return _train_modules_here(momentum, dtype, steps)


def _train_modules_here(momentum, dtype, steps):
    torch.manual_seed(0)
    a = BatchNormAct2d(5, "leaky_relu", 0.2, momentum=momentum).to(dtype)
    s = BatchNormAddAct2d(5, "relu", momentum=momentum).to(dtype)
    for step in range(steps):
        x = torch.randn(3, 5, 7, 9, generator=torch.Generator().manual_seed(step)) * (step + 1) + step
        y = s(a(x.to(dtype)), x.to(dtype))
        y.square().mean().backward()
    return a, s


@needs_cpp
@pytest.mark.parametrize("momentum", [0.1, None])
def test_modules_running_stats_after_steps(cpp_backend, momentum):
    """Modules on the cpp backend track running stats like nn.BatchNorm2d over several training
    steps (momentum and cumulative average), then agree in eval mode; state_dict keys are
    nn.BatchNorm2d's."""
    cpp = _train_modules("cpp", momentum)
    ref = _train_modules("reference", momentum)
    f64 = _train_modules("reference", momentum, torch.float64)
    plain = nn.BatchNorm2d(5)
    for m, rm, tm in zip(cpp, ref, f64):
        assert set(m.state_dict()) == set(plain.state_dict())
        close(m.running_mean, rm.running_mean, name="running_mean")
        close(m.running_var, rm.running_var, name="running_var")
        assert int(m.num_batches_tracked) == int(rm.num_batches_tracked) == 5
        no_worse_than_reference(m.weight.grad, rm.weight.grad, tm.weight.grad, "weight.grad")
        no_worse_than_reference(m.bias.grad, rm.bias.grad, tm.bias.grad, "bias.grad")
    x = torch.randn(3, 5, 7, 9)
    cpp[0].eval(), ref[0].eval()
    out_cpp = cpp[0](x)
    with ops.use_backend("reference"):
        out_ref = ref[0](x)
    close(out_cpp, out_ref, name="eval output")


class _Block(nn.Module):
    """The models' residual block: conv3x3 -> BN+act -> conv3x3 -> BN, + identity."""

    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn1 = BatchNormAct2d(c, "leaky_relu", 0.2)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn2 = BatchNormAddAct2d(c, "identity")

    def forward(self, x):
        return self.bn2(self.c2(self.bn1(self.c1(x))), x)


def _stack(depth=3, c=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[_Block(c) for _ in range(depth)])


def _saved_bytes(model, x):
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sum(seen.values())


@needs_cpp
def test_saves_less_than_reference_same_grads(cpp_backend):
    """A 3-block residual stack: the fused ops give the reference's output and gradients (to fp32
    precision, judged against an fp64 run) and autograd keeps fewer bytes than with the reference
    (which saves the BatchNorm output and the activation's input separately)."""
    x = torch.randn(4, 8, 16, 16)
    model = _stack()
    out, nbytes = _saved_bytes(model, x)
    out.square().mean().backward()
    with ops.use_backend("reference"):
        ref = _stack()
        out_ref, ref_bytes = _saved_bytes(ref, x)
        out_ref.square().mean().backward()
        f64 = _stack().double()
        f64(x.double()).square().mean().backward()
    close(out.detach(), out_ref.detach(), name="output vs reference")
    names = [n for n, _ in ref.named_parameters()]
    for n, a, r, t in zip(names, [p.grad for p in model.parameters()], [p.grad for p in ref.parameters()],
                          [p.grad for p in f64.parameters()]):
        no_worse_than_reference(a, r, t, n)
    assert nbytes < ref_bytes, (nbytes, ref_bytes)


@needs_cpp
def test_inplace_on_saved_input_is_caught(cpp_backend):
    """The saved input is version-checked: modifying it in place before backward is an error, not
    a silent wrong gradient."""
    bn = BatchNormAct2d(5, "leaky_relu", 0.2)
    x = torch.randn(3, 5, 7, 9, requires_grad=True)
    h = x * 1.0
    y = bn(h)
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # an in-place op on the output is fine: the output is not saved
    y = bn(x * 1.0)
    y.relu_()
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def second_order(fn, op, x, r, w, b, rm, rv, training, act, slope):
    """R1's shape of a double backward: first gradients of a loss with create_graph, then the gradient
    of their squared norm with respect to every input (x, residual, weight, bias)."""
    x, r, w, b = (t.detach().clone().requires_grad_() for t in (x, r, w, b))
    ins = [x, w, b] if op == "bn_act" else [x, r, w, b]
    y = fn(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, act, slope) if op == "bn_act" else \
        fn(x, r, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, act, slope)
    probe = torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)  # a loss whose gradient is not a constant
    first = torch.autograd.grad((y * probe).sum() + y.float().pow(3).sum() / y.numel(), ins, create_graph=True)
    penalty = sum(g.float().square().sum() for g in first)
    return first, torch.autograd.grad(penalty, ins)


@needs_cpp
@pytest.mark.parametrize("op", ["bn_act", "bn_add_act"])
@pytest.mark.parametrize("act", activations.NAMES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape, channels_last", [((3, 5, 7, 9), False), ((4, 6, 5, 3), True)])
def test_double_backward_matches_the_reference(op, act, training, shape, channels_last):
    """The fused ops are twice differentiable (R1 runs on them): every first gradient and every
    gradient of their squared norm agrees with the reference's, in both layouts. fp32 at rtol 2e-5:
    the second pass differentiates the reference formula rebuilt on the saved tensors, so it differs
    from ATen's own only in the first backward's summation order (1e-5), squared in the penalty."""
    x, r, _, w, b, rm, rv = make_inputs(*shape, channels_last=channels_last, seed=11)
    x, r = away_from_kink(op, x, r, w, b, rm, rv, training)
    fused_first, fused = second_order(getattr(CPP, op), op, x, r, w, b, rm, rv, training, act, 0.2)
    ref_first, ref = second_order(getattr(reference, op), op, x, r, w, b, rm, rv, training, act, 0.2)
    names = ["x", "weight", "bias"] if op == "bn_act" else ["x", "residual", "weight", "bias"]
    for name, got, want in zip(names, fused_first, ref_first):
        close(got, want, rtol=1e-5, name=f"first d{name}")
    for name, got, want in zip(names, fused, ref):
        assert want.abs().max() > 0, name  # every input's second-order gradient is exercised
        close(got, want, rtol=2e-5, name=f"second d{name}")


@needs_cpp
def test_double_backward_in_bf16_is_near_fp32_truth():
    """The trainer's case: bf16 channels_last activations, fp32 weights. The second-order gradients
    of the fused op on bf16 inputs against the reference on the same inputs in fp32, at bf16's
    bound: 4 bf16 ulps (1.6e-2) of each tensor's scale, twice test_low_precision's 2 ulps because the
    rounding of the first pass is differentiated again in the second (measured: at most 6.5e-3)."""
    x, r, _, w, b, rm, rv = make_inputs(4, 6, 5, 3, channels_last=True, dtype=torch.bfloat16, seed=12)
    _, fused = second_order(CPP.bn_add_act, "bn_add_act", x, r, w, b, rm, rv, True, "leaky_relu", 0.2)
    _, truth = second_order(reference.bn_add_act, "bn_add_act", x.float(), r.float(), w, b, rm, rv, True,
                            "leaky_relu", 0.2)
    for name, got, want in zip(["x", "residual", "weight", "bias"], fused, truth):
        close(got.float(), want, rtol=1.6e-2, name=name)


@needs_cpp
def test_activation_codes_match_cpp():
    """One table in Python (ops/activations.py), one enum in C++ (csrc/bn_params.h): they agree."""
    from aegan_fast import _C
    assert _C.ACTIVATION_CODES == activations.CODES


@needs_cpp
def test_opcheck():
    """torch.library.opcheck on the one schema of each op (and its backward op) with the cpp kernel:
    schema, fake kernel, autograd registration and AOT dispatch agree with the real kernel."""
    aeg = torch.ops.aegan_fast
    x, r, grad, w, b, rm, rv = make_inputs(*ODD)
    xc, rc, gc = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, grad))
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    cases = [
        (aeg.bn_act, (x.clone().requires_grad_(), wg, bg, None, None, True, 1e-5, "leaky_relu", 0.2, "cpp")),
        (aeg.bn_act, (xc, None, None, rm, rv, False, 1e-5, "relu", 0.0, "cpp")),
        (aeg.bn_add_act, (xc.clone().requires_grad_(), rc.clone().requires_grad_(), wg, bg, None, None, True, 1e-5,
                          "relu", 0.0, "cpp")),
        (aeg.bn_add_act, (x, r, None, None, rm, rv, False, 1e-5, "identity", 0.0, "cpp")),
    ]
    _, mean, var = aeg.bn_act(x, w, b, None, None, True, 1e-5, "leaky_relu", 0.2, "cpp")
    cases += [
        (aeg.bn_act_backward, (grad, x, w, b, mean, var, True, 1e-5, "leaky_relu", 0.2, "cpp")),
        (aeg.bn_act_backward, (gc, xc, None, None, rm, rv, False, 1e-5, "relu", 0.0, "cpp")),
        (aeg.bn_add_act_backward, (gc, xc, rc, w, b, mean, var, True, 1e-5, "relu", 0.0, "cpp")),
        (aeg.bn_add_act_backward, (grad, x, None, w, b, mean, var, True, 1e-5, "identity", 0.0, "cpp")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_one_registration_per_op():
    """The ops are defined, faked and differentiated in one place, not once per backend."""
    import re
    text = "\n".join(p.read_text() for d in ("aegan_fast", "kernels") for p in (ROOT / d).rglob("*.py"))
    fakes = re.findall(r"(\w+)\.register_fake", text)
    autograds = re.findall(r"(\w+)\.register_autograd", text)
    ops_ = ["bn_act_op", "bn_add_act_op", "bn_act_backward_op", "bn_add_act_backward_op",  # ops/library.py
            "resblock_op", "resblock_backward_op", "up_block_op", "up_block_backward_op"]  # ops/blocks.py
    assert sorted(fakes) == sorted(ops_), fakes
    assert sorted(autograds) == sorted(ops_), autograds


@needs_cpp
def test_compile_residual_block_fullgraph(cpp_backend):
    """torch.compile(fullgraph=True) (inductor) of a residual block on the cpp backend: no graph
    break, the custom ops in the graph, and the same output, gradients and running stats as eager."""
    torch._dynamo.reset()
    eager, compiled_src = _stack(depth=1), _stack(depth=1)
    compiled = torch.compile(compiled_src, fullgraph=True)
    x = torch.randn(2, 8, 12, 12)
    for step in range(2):
        ye, yc = eager(x + step), compiled(x + step)
        close(yc, ye, name="compiled output")
        ye.square().mean().backward()
        yc.square().mean().backward()
    # 1e-4: inductor reorders the convolutions' backward sums and reflect-pad gradients (fp32), and
    # the conv weight gradients are reductions over N*H*W; the fused ops themselves are the same kernels.
    for (n, pe), pc in zip(eager.named_parameters(), compiled_src.parameters()):
        close(pc.grad, pe.grad, rtol=1e-4, name=f"compiled grad {n}")
    for (n, be), bc in zip(eager.named_buffers(), compiled_src.buffers()):
        close(bc.float(), be.float(), name=f"compiled buffer {n}")
    explained = torch._dynamo.explain(_stack(depth=1))(x)
    assert explained.graph_break_count == 0, explained.break_reasons


@needs_cpp
def test_model_steps_match_reference(cpp_backend):
    """Four Adam steps of the autoencoder (H, F: residual blocks, BN+ReLU, BN+add) and of G_E with
    --ops cpp vs --ops reference. Stated tolerance: losses agree to rtol 3e-4. The backends differ
    only by fp32 rounding (~1e-6 relative per BatchNorm), but Adam's first steps are sign-like
    (m / sqrt(v) ~ +-1 per weight) and ReLU masks flip, so that grows to ~1e-4 after a few steps;
    an fp64 run shows cpp is as close to the exact trajectory as the fp32 reference is."""
    from aegan_fast.models import ModelConfig, build_nets, sample_z
    cfg = ModelConfig(resolution=64, ae_channels=16, ge_base_channels=32, max_channels=32)
    losses = {}
    for backend, dtype in (("cpp", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        torch.manual_seed(0)
        nets = build_nets(cfg).to(dtype)
        H, F_, G = nets["H"], nets["F"], nets["G_E"]
        opt = torch.optim.Adam([*H.parameters(), *F_.parameters(), *G.parameters()], lr=1e-3, betas=(0.5, 0.999))
        x = (torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(dtype)
        z = sample_z(4, cfg.z_dim, torch.Generator().manual_seed(2)).to(dtype)
        trace = []
        with ops.use_backend(backend):
            for _ in range(4):
                rec = (F_(H(x)) - x).abs().mean()
                emb = G(z).square().mean()  # any smooth loss through G_E's BN+ReLU and residual blocks
                opt.zero_grad()
                (rec + emb).backward()
                opt.step()
                trace += [rec.item(), emb.item()]
        losses[(backend, dtype)] = torch.tensor(trace, dtype=torch.float64)
    cpp, ref, exact = losses[("cpp", torch.float32)], losses[("reference", torch.float32)], \
        losses[("reference", torch.float64)]
    torch.testing.assert_close(cpp, ref, rtol=3e-4, atol=0)
    no_worse_than_reference(cpp, ref, exact, "losses")


@needs_cpp
def test_bad_input_gives_clear_errors():
    from aegan_fast import _C
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _C.bn_forward(x.double(), None, None, None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="4-D"):
        _C.bn_forward(x[0], None, None, None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="contiguous in NCHW or channels_last"):
        _C.bn_forward(x.transpose(2, 3), None, None, None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        _C.bn_forward(x, None, torch.ones(4), None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="residual has shape"):
        _C.bn_forward(x, x[:1], None, None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="eval mode .* needs running_mean"):
        _C.bn_forward(x, None, None, None, None, None, False, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        _C.bn_forward(x[:1, :, :1, :1].contiguous(), None, None, None, None, None, True, 1e-5, 0, 0.0)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        _C.bn_forward(x, None, None, None, None, None, True, -1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="activation code must be"):
        _C.bn_backward(x, x, None, None, None, torch.zeros(3), torch.ones(3), True, 1e-5, 7, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        _C.bn_backward(x[:1], x, None, None, None, torch.zeros(3), torch.ones(3), True, 1e-5, 1, 0.0, False)
    with pytest.raises(RuntimeError, match="kernel 'cuda' does not run on cpu tensors|kernel 'cuda' is unavailable"):
        library.run("cuda", x, None, None, None, None, None, True, 0.1, 1e-5, "relu", 0.0)
    with pytest.raises(ValueError, match="unknown activation"):
        CPP.bn_act(x, None, None, None, None, True, 0.1, 1e-5, "gelu", 0.0)
    # a non-contiguous input in neither layout is made contiguous by the backend, not rejected
    xt = x.transpose(2, 3)
    close(CPP.bn_act(xt, None, None, None, None, True, 0.1, 1e-5, "relu", 0.0),
          reference.bn_act(xt, None, None, None, None, True, 0.1, 1e-5, "relu", 0.0))


def test_availability_reports_cpp():
    """The doctor's line for cpp: None when it loads, else a reason that says what to do."""
    reason = dispatch.availability()["cpp"]
    if CPP is None:
        assert reason and ("aegan_fast._C" in reason or "torch" in reason), reason
    else:
        assert reason is None
