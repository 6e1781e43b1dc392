"""CPU benchmark of the fused BatchNorm ops: forward + backward in training mode, bf16 and fp32;
reference eager vs the cpp backend vs torch.compile of the reference, and what the cpp kernels reach
against this machine's bandwidth. Every figure is timed by bench/timing.py (interleaved rounds,
medians).

    .venv/bin/python -m bench --only ops                       # fwd+bwd, fp32 NCHW and bf16 channels_last
    .venv/bin/python -m bench.bench_ops --passes               # the cpp passes alone vs read+write bandwidth
    .venv/bin/python -m bench.bench_ops --sweep                # auto's crossover: reference vs cpp per layer size
    .venv/bin/python -m bench.bench_ops --sweep --dtype bf16 --channels-last   # the trainer's bf16 layout

Ops as the models use them: bn_act with LeakyReLU(0.2) (conv -> BN -> act), bn_add_act with identity
(the end of a residual block).

Bytes ("algorithmic traffic", the same count for every implementation, as bench_ops_gpu.py): bn_act
= 3 activation-sized passes forward (read x for statistics; read x, write y) + 5 backward (read dy, x;
read dy, x, write dx) = 8; bn_add_act = 4 forward (x; x, r, y) + 5 backward = 9. GB/s = bytes /
median time.

Every fwd+bwd call allocates its outputs, as a training step does; on this kind of VM first touch of
fresh pages costs about as much as a pass over memory, and all implementations pay it. ``--passes``
writes into preallocated buffers (the _C functions' out= arguments) to measure the cpp passes
themselves, against the faster of an activation-sized dst.copy_(src) and an in-place add_ (both
read and write one activation: copy_ into a second buffer can run below what a read+write pass
reaches on these VMs).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import sys
from typing import Callable

import torch

from aegan_fast import ops
from aegan_fast.ops import library, reference
from bench.timing import Case, Context, Row, fill_peak_fractions, measure, measure_peaks, table

WHY_NOT = ops.availability()["cpp"]

PASSES = {"bn_act": 8, "bn_add_act": 9}
SLOPE = 0.2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("reference", "cpp", "compiled")
_compiled: dict[str, object] = {}


def _impl(name, op):
    if name == "reference":
        return getattr(reference, op)
    if name == "cpp":
        if WHY_NOT is not None:
            raise RuntimeError(f"cpp backend unavailable: {WHY_NOT}")
        return functools.partial(getattr(library, op), "cpp")
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
    allocates its outputs and gradients as a training step does. RuntimeError for cpp when the
    extension is unavailable (``WHY_NOT`` says why)."""
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


def pass_rows(shape: tuple[int, int, int, int], rounds: int, peaks: dict[str, float]) -> list[Row]:
    """The cpp kernels of bn_act (leaky_relu) into preallocated buffers, against the read + write
    bandwidth of one activation (the faster of dst.copy_(src) and an in-place add_, measured in the
    same rounds; into ``peaks`` as ``activation_rw``). fwd_apply: the forward apply pass alone (eval
    mode: read x, write y = 2 passes). bwd_apply_eval: eval-mode backward, one fused pass (read dy,
    x, write dx = 3). fwd_train: statistics + apply (3). bwd_train: reduction + apply (5)."""
    from aegan_fast import _C
    N, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(N, C, H, W, generator=g), torch.randn(N, C, H, W, generator=g)
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1
    rm, rv = torch.zeros(C), torch.ones(C)
    out, dst = torch.empty_like(x), torch.empty_like(x).copy_(x)
    _, mean, var = _C.bn_forward(x, None, w, b, None, None, True, 1e-5, 2, SLOPE)
    act = x.numel() * x.element_size()
    bw = ("copy", "activation_rw")
    tiny = dict(min_sample_s=0.01)  # small shapes: many calls per sample, above the timer's noise
    rows = measure("passes", [
        Case("copy_", lambda: dst.copy_(x), 2 * act, "B", peaks=("copy",), **tiny),
        Case("add_ in place", lambda: dst.add_(1.0), 2 * act, "B", peaks=("copy",), **tiny),
        Case("cpp fwd_apply", lambda: _C.bn_forward(x, None, w, b, rm, rv, False, 1e-5, 2, SLOPE, out=out),
             2 * act, "B", peaks=bw, **tiny),
        Case("cpp bwd_apply_eval", lambda: _C.bn_backward(dy, x, None, w, b, mean, var, False, 1e-5, 2, SLOPE, False,
                                                          dx=out), 3 * act, "B", peaks=bw, **tiny),
        Case("cpp fwd_train", lambda: _C.bn_forward(x, None, w, b, None, None, True, 1e-5, 2, SLOPE, out=out),
             3 * act, "B", peaks=bw, **tiny),
        Case("cpp bwd_train", lambda: _C.bn_backward(dy, x, None, w, b, mean, var, True, 1e-5, 2, SLOPE, False, dx=out),
             5 * act, "B", peaks=bw, **tiny),
    ], rounds)
    peaks["activation_rw"] = max((r.rate for r in rows[:2] if r.status == "ok"), default=0.0)
    return rows


# ----------------------------------------------------------------------------------------------
# auto's crossover: BatchNormAct2d forward+backward, reference vs cpp, per layer size
# ----------------------------------------------------------------------------------------------

# (C, N, spatial sizes): the models' BatchNorm layers at R=64 and R=128 (H/F at C=64 on maps up to
# R; G_E, D_E at up to 512 channels on R/16 maps; phi and D_R at up to 512 channels on small maps),
# batch 16 (the paper's) and 32. Large C stops where N*C*S*S would pass ~17M values.
SWEEP = [(64, 16, (2, 4, 8, 16, 32, 64, 128)), (64, 32, (2, 4, 8, 16, 32, 64)),
         (256, 16, (2, 4, 8, 16, 32)), (256, 32, (2, 4, 8, 16)),
         (512, 16, (2, 4, 8, 16)), (512, 32, (2, 4, 8))]


def _module_step(bn, x, dy, backend):
    with ops.use_backend(backend):
        x = x.detach().requires_grad_()
        bn(x).backward(dy)


def sweep(rounds: int = 7, min_seconds: float = 0.01, dtype: torch.dtype = torch.float32,
          channels_last: bool = False, sizes_max: int | None = None, stat: str = "median") -> list[dict]:
    """Seconds per BatchNormAct2d(leaky_relu 0.2) forward+backward, training, activations of
    ``dtype`` (NCHW or channels_last), fp32 parameters, with ops.use_backend("reference") and ("cpp"),
    rounds interleaved (bench/timing.py), each sample at least ``min_seconds`` long. ``sizes_max``
    drops maps larger than that (short runs); ``stat`` summarises each side's rounds: "median", or
    "min" to estimate the undisturbed time when other processes load the machine."""
    rows = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for C, N, sizes in SWEEP:
        for S in sizes:
            if sizes_max is not None and S > sizes_max:
                continue
            g = torch.Generator().manual_seed(0)
            x, dy = (torch.randn(N, C, S, S, generator=g).to(dtype).contiguous(memory_format=fmt) for _ in range(2))
            bn = ops.BatchNormAct2d(C, "leaky_relu", 0.2)
            ref, cpp = measure("sweep", [
                Case(backend, functools.partial(_module_step, bn, x, dy, backend), x.numel(), "values",
                     min_sample_s=min_seconds) for backend in ("reference", "cpp")], rounds)
            ref_s, cpp_s = (r.best_s if stat == "min" else r.median_s for r in (ref, cpp))
            rows.append(dict(C=C, N=N, S=S, numel=x.numel(), reference_us=ref_s * 1e6, cpp_us=cpp_s * 1e6,
                             speedup=ref_s / cpp_s))
            print(f"C={C:4d} N={N:3d} {S:4d}x{S:<4d} {x.numel():>10,d} values ({N * S * S:>6,d}/channel)  "
                  f"reference {ref_s * 1e6:10.1f} us  cpp {cpp_s * 1e6:10.1f} us  cpp speedup {ref_s / cpp_s:5.2f}x",
                  flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="CPU op benchmarks beyond the suite's ops section")
    p.add_argument("--sweep", action="store_true", help="auto's crossover: reference vs cpp per layer size")
    p.add_argument("--passes", action="store_true", help="the cpp passes into preallocated buffers vs bandwidth")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--shape", type=int, nargs=4, default=[16, 64, 128, 128], metavar=("N", "C", "H", "W"),
                   help="--passes: the activation shape")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="activation dtype (parameters stay fp32)")
    p.add_argument("--channels-last", action="store_true", help="activations in channels_last")
    p.add_argument("--max-size", type=int, default=None, help="skip maps larger than this (short runs)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="summary of each side's rounds (min: on a machine other processes load)")
    a = p.parse_args(argv)
    if not (a.sweep or a.passes):
        p.error("nothing to do: pass --sweep or --passes (the fwd+bwd comparison is python -m bench --only ops)")
    if WHY_NOT is not None:
        print(f"cpp backend unavailable: {WHY_NOT}", file=sys.stderr)
        return 1
    from aegan_fast import _C
    if a.passes:
        ctx = Context(quick=False)
        rows = measure_peaks(ctx)
        rows += pass_rows(tuple(a.shape), 2 * a.rounds, ctx.peaks)
        fill_peak_fractions(rows, ctx.peaks)
        print(table(rows, {}, f"# cpp passes {tuple(a.shape)} fp32, cpp isa {_C.cpu_isa()}; of peak: copy = this "
                              f"run's peak copy bandwidth, activation_rw = the faster of copy_ and add_ here"))
    if a.sweep:
        layout = "channels_last" if a.channels_last else "NCHW"
        print(f"# BatchNormAct2d fwd+bwd sweep  {datetime.date.today()}  torch {torch.__version__}  "
              f"threads {torch.get_num_threads()}  rounds {a.rounds} (interleaved, {a.stat})  {a.dtype} {layout}  "
              f"cpp isa {_C.cpu_isa()}")
        rows = sweep(a.rounds, dtype=DTYPES[a.dtype], channels_last=a.channels_last, sizes_max=a.max_size, stat=a.stat)
        slower = [r["numel"] for r in rows if r["speedup"] < 1.0]
        print(f"# largest size where cpp loses: {max(slower) if slower else 0:,d} values; "
              f"smallest where it wins: {min(r['numel'] for r in rows if r['speedup'] >= 1.0):,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
