"""GPU benchmark of the fused BatchNorm ops: forward + backward, training mode, channels_last,
N=16 C=64 256x256, fp32 and bf16; eager F.batch_norm + activation (cuDNN) vs the cuda and triton
backends. Prints medians, the speedup over eager, and achieved bandwidth as a fraction of this
GPU's copy bandwidth measured in the same run.

    python bench/bench_ops_gpu.py [--iters 50] [--shape 16 64 256 256]

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
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

PASSES = {"bn_act": 8, "bn_add_act": 9}


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = _time(lambda: dst.copy_(src), iters)
    return 2 * nbytes / statistics.median(times)


def _time(fn, iters: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


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


def bench_one(fn, op: str, x, r, w, b, rm, rv, dy, iters: int) -> float:
    x = x.detach().requires_grad_()
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()

    def step():
        if op == "bn_act":
            y = fn(x, rm, rv, w, b, True, 0.1, 1e-5, "leaky_relu", 0.2)
        else:
            y = fn(x, r, rm, rv, w, b, True, 0.1, 1e-5, "identity")
        y.backward(dy)
        x.grad = w.grad = b.grad = None

    return statistics.median(_time(step, iters))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--shape", type=int, nargs=4, default=[16, 64, 256, 256], metavar=("N", "C", "H", "W"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  shape {tuple(a.shape)} channels_last")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    impls = implementations()
    for name, entry in impls.items():
        if isinstance(entry, str):
            print(f"{name}: unavailable ({entry})")
    N, C, H, W = a.shape
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device="cuda").manual_seed(0)
        make = lambda: torch.randn(N, C, H, W, device="cuda", generator=g).to(dtype).contiguous(
            memory_format=torch.channels_last)
        x, r, dy = make(), make(), make()
        w, b = torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
        rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
        nbytes = x.numel() * x.element_size()
        for op in ("bn_act", "bn_add_act"):
            base = None
            for name, entry in impls.items():
                if isinstance(entry, str):
                    continue
                fn = entry[0] if op == "bn_act" else entry[1]
                t = bench_one(fn, op, x, r, w, b, rm, rv, dy, a.iters)
                base = base or t
                gbs = PASSES[op] * nbytes / t
                print(f"{str(dtype).split('.')[-1]:9s} {op:10s} {name:14s} {t * 1e3:8.3f} ms  "
                      f"x{base / t:5.2f} vs eager  {gbs / 1e9:7.0f} GB/s  {gbs / bw:6.1%} of copy")
    return 0


def test_bench_ops_gpu():
    """So a pytest run over bench/ shows this as skipped (with the reason) rather than silently absent."""
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert main(["--iters", "5"]) == 0


if __name__ == "__main__":
    raise SystemExit(main())
