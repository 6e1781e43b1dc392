"""GPU benchmark of the fused BatchNorm ops: forward + backward, training mode, channels_last,
N=16 C=64 256x256, fp32 and bf16; eager F.batch_norm + activation (cuDNN) vs the cuda and triton
backends. Prints medians of interleaved rounds (bench/timing.py), the speedup over eager, and achieved
bandwidth as a fraction of this GPU's copy bandwidth measured in the same run.

    python -m bench.bench_ops_gpu [--rounds 10] [--shape 16 64 256 256]

Skips (exit 0, says why) without a CUDA device. Not run yet: no GPU has been available; record the
device, date and figures in bench/RESULTS.md when it is, and set dispatch.AUTO_ORDER (and
AUTO_MIN_PER_CHANNEL for CUDA) from them.

Bytes counted ("algorithmic traffic", the same for every implementation so GB/s compare like with
like): bn_act = 3 activation-sized passes forward (read x for statistics; read x, write y) + 5
backward (read dy, x; read dy, x, write dx) = 8; bn_add_act with identity = 4 forward (x; x, r, y)
+ 5 backward = 9. The floor of any implementation is 4 (bn_act) / 6 (bn_add_act) passes.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.bench_ops import PASSES
from bench.timing import Case, Context, fill_peak_fractions, measure, measure_peaks, skipped, table

REPEAT = 5  # fwd+bwd calls per sample: one synchronize per sample, not per call


def eager_bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation="relu",
                 negative_slope=0.01):
    return F.leaky_relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps),
                        negative_slope)


def eager_bn_add_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
                     activation="identity", negative_slope=0.01):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual


def implementations():
    """name -> (bn_act, bn_add_act) or the reason it cannot run."""
    import functools

    from aegan_fast import ops
    from aegan_fast.ops import library
    impls = {"eager (cuDNN)": (eager_bn_act, eager_bn_add_act)}
    for name in ("cuda", "triton"):
        why = ops.availability()[name]
        impls[name] = why if why is not None else (functools.partial(library.bn_act, name),
                                                   functools.partial(library.bn_add_act, name))
    return impls


def step_fn(fn, op: str, x, r, w, b, rm, rv, dy):
    x = x.detach().requires_grad_()
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()

    def step():
        if op == "bn_act":
            y = fn(x, rm, rv, w, b, True, 0.1, 1e-5, "leaky_relu", 0.2)
        else:
            y = fn(x, r, rm, rv, w, b, True, 0.1, 1e-5, "identity")
        y.backward(dy)
        x.grad = w.grad = b.grad = None

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=4, default=[16, 64, 256, 256], metavar=("N", "C", "H", "W"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    torch.backends.cudnn.benchmark = True
    ctx = Context(quick=False)
    rows = measure_peaks(ctx, "peaks", "cuda")
    impls = implementations()
    N, C, H, W = a.shape
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device="cuda").manual_seed(0)
        make = lambda: torch.randn(N, C, H, W, device="cuda", generator=g).to(dtype).contiguous(
            memory_format=torch.channels_last)
        x, r, dy = make(), make(), make()
        w, b = torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
        rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
        nbytes = x.numel() * x.element_size()
        dname = str(dtype).split(".")[-1]
        for op in ("bn_act", "bn_add_act"):
            base = f"{dname} {op} eager (cuDNN)"
            cases = []
            for name, entry in impls.items():
                if isinstance(entry, str):
                    continue
                fn = entry[0] if op == "bn_act" else entry[1]
                cases.append(Case(f"{dname} {op} {name}", step_fn(fn, op, x, r, w, b, rm, rv, dy), PASSES[op] * nbytes,
                                  "B", () if name == "eager (cuDNN)" else (base,), peaks=("cuda_copy",), device="cuda",
                                  repeat=REPEAT))
            rows += measure("ops", cases, a.rounds)
    rows += [skipped("ops", name, entry) for name, entry in impls.items() if isinstance(entry, str)]
    fill_peak_fractions(rows, ctx.peaks)
    print(table(rows, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "shape": f"{tuple(a.shape)} channels_last"},
                "# bench_ops_gpu: medians of interleaved rounds; × baseline = its median / this one's (>1 faster); "
                "of peak = of this run's measured copy bandwidth"))
    return 1 if any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
