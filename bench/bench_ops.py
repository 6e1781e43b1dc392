"""CPU benchmark of the fused BatchNorm ops (issue 3): forward + backward in training mode, fp32,
N=16 C=64 at 128x128 and 256x256; reference eager vs the cpp backend vs torch.compile of the
reference; plus this machine's copy bandwidth and the cpp apply passes alone, all in the same run.

    .venv/bin/python -m pytest bench/bench_ops.py --benchmark-only --benchmark-json=.benchmarks/ops.json
    .venv/bin/python bench/report_ops.py .benchmarks/ops.json
    .venv/bin/python bench/bench_ops.py --sweep    # auto's crossover: reference vs cpp per layer size
    .venv/bin/python bench/bench_ops.py --sweep --dtype bf16 --channels-last   # the trainer's bf16 layout

Ops as the models use them: bn_act with LeakyReLU(0.2) (conv -> BN -> act), bn_add_act with identity
(the end of a residual block).

Bytes ("algorithmic traffic", the same count for every implementation, as bench_ops_gpu.py): bn_act
= 3 activation-sized passes forward (read x for statistics; read x, write y) + 5 backward (read dy, x;
read dy, x, write dx) = 8; bn_add_act = 4 forward (x; x, r, y) + 5 backward = 9. GB/s = bytes /
median time; the roofline is the faster of dst.copy_(src) and an in-place dst.add_(1), both reading
and writing one activation-sized tensor (see test_copy_bandwidth).

bf16 channels_last (the trainer's bf16 path: bf16 activations in channels_last, fp32 parameters and
running buffers): test_fwd_bwd_bf16 at 128x128, reference eager bf16 vs cpp vs torch.compile of the
reference; the report prints each against eager bf16. Other benches (python -m bench) build the same
closures with ``fwd_bwd_case``.

Every fwd+bwd call allocates its outputs, as a training step does; on this kind of VM first touch of
fresh pages costs about as much as a pass over memory, and all implementations pay it. The
`apply` benchmarks write into preallocated buffers (the _C functions' out= arguments) to measure the
cpp apply passes themselves against copy bandwidth.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time
from typing import Callable

import pytest
import torch

from aegan_fast import ops
from aegan_fast.ops import library, reference

WHY_NOT = ops.availability()["cpp"]


CPP = {op: functools.partial(getattr(library, op), "cpp") for op in ("bn_act", "bn_add_act")}

SHAPES = {"128": (16, 64, 128, 128), "256": (16, 64, 256, 256)}
ROUNDS = {"128": 7, "256": 5}
PASSES = {"bn_act": 8, "bn_add_act": 9}
SLOPE = 0.2
_data: dict[str, tuple] = {}
_compiled: dict[str, object] = {}


def data(shape_key):
    if shape_key not in _data:
        _data.clear()  # keep one shape's tensors alive at a time (256x256: 268 MB each)
        N, C, H, W = SHAPES[shape_key]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, C, H, W, generator=g)
        r = torch.randn(N, C, H, W, generator=g)
        dy = torch.randn(N, C, H, W, generator=g)
        _data[shape_key] = (x, r, dy, torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1)
    return _data[shape_key]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("reference", "cpp", "compiled")


def _impl(name, op):
    if name == "reference":
        return getattr(reference, op)
    if name == "cpp":
        if WHY_NOT is not None:
            pytest.skip(f"cpp backend unavailable: {WHY_NOT}")
        return CPP[op]
    if name != "compiled":
        raise ValueError(f"unknown impl {name!r}; choose one of {', '.join(IMPLS)}")
    if op not in _compiled:
        _compiled[op] = torch.compile(getattr(reference, op), fullgraph=True, dynamic=False)
    return _compiled[op]


def fwd_bwd_case(op: str, impl: str, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 shape: tuple[int, int, int, int] = (16, 64, 128, 128)) -> Callable[[], None]:
    """A zero-argument closure running one training forward + backward of ``op`` ("bn_act":
    LeakyReLU(0.2); "bn_add_act": identity) with ``impl`` ("reference" eager, "cpp", "compiled" =
    torch.compile of the reference) on activations of ``dtype`` in NCHW or channels_last, with fp32
    weight, bias and running buffers as the trainer keeps them. Inputs are made once, here; each call
    allocates its outputs and gradients as a training step does. Raises pytest's Skipped for cpp
    when the extension is unavailable (call it under pytest, or check ``WHY_NOT`` first)."""
    if op not in PASSES:
        raise ValueError(f"unknown op {op!r}; choose one of {', '.join(PASSES)}")
    fn = _impl(impl, op)
    N, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, r, dy = (torch.randn(N, C, H, W, generator=g).to(dtype).contiguous(memory_format=fmt) for _ in range(3))
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1
    rm, rv = torch.zeros(C), torch.ones(C)
    return lambda: _step(fn, op, x, r, dy, w, b, rm, rv)


def _step(fn, op, x, r, dy, w, b, rm, rv):
    x = x.detach().requires_grad_()
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
    if op == "bn_act":
        y = fn(x, rm, rv, w, b, True, 0.1, 1e-5, "leaky_relu", SLOPE)
    else:
        rr = r.detach().requires_grad_()
        y = fn(x, rr, rm, rv, w, b, True, 0.1, 1e-5, "identity", SLOPE)
    y.backward(dy)


@pytest.mark.parametrize("how", ["copy_", "add_"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_copy_bandwidth(benchmark, shape, how):
    """The roofline: an activation-sized dst.copy_(src) (read + write, preallocated), and an
    in-place x.add_(1) (read + write of the same bytes). On this VM copy_ into a separate buffer runs
    well below what a read+write pass can reach (the cpp passes beat it), so the report takes the
    faster of the two as the bandwidth to compare with and shows both."""
    x = data(shape)[0]
    dst = torch.empty_like(x).copy_(x)
    fn = (lambda: dst.copy_(x)) if how == "copy_" else (lambda: dst.add_(1.0))
    benchmark.group = f"ops {shape}"
    benchmark.extra_info.update(kind="copy", how=how, shape=shape, bytes=2 * x.numel() * x.element_size())
    benchmark.pedantic(fn, rounds=2 * ROUNDS[shape], warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("impl", ["reference", "cpp", "compiled"])
@pytest.mark.parametrize("op", ["bn_act", "bn_add_act"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fwd_bwd(benchmark, shape, op, impl):
    fn = _impl(impl, op)
    x, r, dy, w, b = data(shape)
    C = x.shape[1]
    rm, rv = torch.zeros(C), torch.ones(C)
    benchmark.group = f"ops {shape}"
    benchmark.extra_info.update(kind="fwd_bwd", shape=shape, op=op, impl=impl,
                                bytes=PASSES[op] * x.numel() * x.element_size())
    benchmark.pedantic(lambda: _step(fn, op, x, r, dy, w, b, rm, rv), rounds=ROUNDS[shape],
                       warmup_rounds=2 if impl == "compiled" else 1, iterations=1)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("op", ["bn_act", "bn_add_act"])
def test_fwd_bwd_bf16(benchmark, op, impl):
    """bf16 channels_last activations, fp32 parameters (the trainer's bf16 path), N16 C64 128x128."""
    shape = "128"
    fn = fwd_bwd_case(op, impl, torch.bfloat16, True, SHAPES[shape])
    benchmark.group = f"ops {shape} bf16 channels_last"
    benchmark.extra_info.update(kind="fwd_bwd", shape=shape, op=op, impl=impl, dtype="bf16", layout="channels_last",
                                bytes=PASSES[op] * torch.Size(SHAPES[shape]).numel() * 2)
    benchmark.pedantic(fn, rounds=ROUNDS[shape], warmup_rounds=2 if impl == "compiled" else 1, iterations=1)


@pytest.mark.parametrize("part", ["fwd_apply", "bwd_apply_eval", "fwd_train", "bwd_train"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpp_passes(benchmark, shape, part):
    """The cpp kernels into preallocated buffers. fwd_apply: the forward apply pass alone (eval
    mode: read x, write y = 2 passes). bwd_apply_eval: eval-mode backward, one fused pass (read dy,
    x, write dx = 3). fwd_train: statistics + apply (3). bwd_train: reduction + apply (5)."""
    if WHY_NOT is not None:
        pytest.skip(f"cpp backend unavailable: {WHY_NOT}")
    from aegan_fast import _C
    x, r, dy, w, b = data(shape)
    C = x.shape[1]
    rm, rv = torch.zeros(C), torch.ones(C)
    out = torch.empty_like(x)
    _, mean, var = _C.bn_forward(x, None, w, b, None, None, True, 1e-5, 2, SLOPE)
    passes, fn = {
        "fwd_apply": (2, lambda: _C.bn_forward(x, None, w, b, rm, rv, False, 1e-5, 2, SLOPE, out=out)),
        "bwd_apply_eval": (3, lambda: _C.bn_backward(dy, x, None, w, b, mean, var, False, 1e-5, 2, SLOPE, False,
                                                     dx=out)),
        "fwd_train": (3, lambda: _C.bn_forward(x, None, w, b, None, None, True, 1e-5, 2, SLOPE, out=out)),
        "bwd_train": (5, lambda: _C.bn_backward(dy, x, None, w, b, mean, var, True, 1e-5, 2, SLOPE, False,
                                                dx=out)),
    }[part]
    benchmark.group = f"ops {shape}"
    benchmark.extra_info.update(kind="cpp_pass", shape=shape, part=part, bytes=passes * x.numel() * x.element_size())
    benchmark.pedantic(fn, rounds=2 * ROUNDS[shape], warmup_rounds=1, iterations=1)


# ----------------------------------------------------------------------------------------------
# auto's crossover: BatchNormAct2d forward+backward, reference vs cpp, per layer size
# ----------------------------------------------------------------------------------------------

# (C, N, spatial sizes): the models' BatchNorm layers at R=64 and R=128 (H/F at C=64 on maps up to
# R; G_E, D_E at up to 512 channels on R/16 maps; phi and D_R at up to 512 channels on small maps),
# batch 16 (the paper's) and 32. Large C stops where N*C*S*S would pass ~17M values.
SWEEP = [(64, 16, (2, 4, 8, 16, 32, 64, 128)), (64, 32, (2, 4, 8, 16, 32, 64)),
         (256, 16, (2, 4, 8, 16, 32)), (256, 32, (2, 4, 8, 16)),
         (512, 16, (2, 4, 8, 16)), (512, 32, (2, 4, 8))]


def _module_step(bn, x, dy):
    x = x.detach().requires_grad_()
    bn(x).backward(dy)


def sweep(rounds: int = 7, min_seconds: float = 0.01, dtype: torch.dtype = torch.float32,
          channels_last: bool = False, sizes_max: int | None = None, stat=statistics.median) -> list[dict]:
    """Median seconds per BatchNormAct2d(leaky_relu 0.2) forward+backward, training, activations of
    ``dtype`` (NCHW or channels_last), fp32 parameters, with ops.use_backend("reference") and ("cpp"),
    rounds interleaved (ref, cpp, ref, ...) so load from other processes hits both alike.
    ``sizes_max`` drops maps larger than that (short runs); ``stat`` summarises each side's rounds
    (``min`` estimates the undisturbed time when other processes load the machine)."""
    rows = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for C, N, sizes in SWEEP:
        for S in sizes:
            if sizes_max is not None and S > sizes_max:
                continue
            g = torch.Generator().manual_seed(0)
            x, dy = (torch.randn(N, C, S, S, generator=g).to(dtype).contiguous(memory_format=fmt) for _ in range(2))
            bn = ops.BatchNormAct2d(C, "leaky_relu", 0.2)
            # enough calls per round that one round lasts >= min_seconds
            with ops.use_backend("reference"):
                t0 = time.perf_counter()
                _module_step(bn, x, dy)
                one = time.perf_counter() - t0
            calls = max(1, int(min_seconds / max(one, 1e-7)))
            times: dict[str, list[float]] = {"reference": [], "cpp": []}
            for r in range(rounds + 1):  # round 0 warms up
                for backend in ("reference", "cpp"):
                    with ops.use_backend(backend):
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            _module_step(bn, x, dy)
                        if r:
                            times[backend].append((time.perf_counter() - t0) / calls)
            ref, cpp = stat(times["reference"]), stat(times["cpp"])
            rows.append(dict(C=C, N=N, S=S, numel=x.numel(), reference_us=ref * 1e6, cpp_us=cpp * 1e6,
                             speedup=ref / cpp))
            print(f"C={C:4d} N={N:3d} {S:4d}x{S:<4d} {x.numel():>10,d} values ({N * S * S:>6,d}/channel)  reference {ref * 1e6:10.1f} us  "
                  f"cpp {cpp * 1e6:10.1f} us  cpp speedup {ref / cpp:5.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="CPU op benchmarks outside pytest")
    p.add_argument("--sweep", action="store_true", help="auto's crossover: reference vs cpp per layer size")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="activation dtype (parameters stay fp32)")
    p.add_argument("--channels-last", action="store_true", help="activations in channels_last")
    p.add_argument("--max-size", type=int, default=None, help="skip maps larger than this (short runs)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="summary of each side's rounds (min: on a machine other processes load)")
    a = p.parse_args(argv)
    if not a.sweep:
        p.error("nothing to do: pass --sweep (the other benchmarks run under pytest, see the docstring)")
    if WHY_NOT is not None:
        print(f"cpp backend unavailable: {WHY_NOT}", file=sys.stderr)
        return 1
    from aegan_fast import _C
    layout = "channels_last" if a.channels_last else "NCHW"
    print(f"# BatchNormAct2d fwd+bwd sweep  {datetime.date.today()}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  rounds {a.rounds} (interleaved, {a.stat})  {a.dtype} {layout}  "
          f"cpp isa {_C.cpu_isa()}")
    rows = sweep(a.rounds, dtype=DTYPES[a.dtype], channels_last=a.channels_last, sizes_max=a.max_size,
                 stat={"median": statistics.median, "min": min}[a.stat])
    slower = [r["numel"] for r in rows if r["speedup"] < 1.0]
    print(f"# largest size where cpp loses: {max(slower) if slower else 0:,d} values; "
          f"smallest where it wins: {min(r['numel'] for r in rows if r['speedup'] >= 1.0):,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
