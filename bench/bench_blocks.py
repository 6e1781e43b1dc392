"""GPU benchmark of the fused blocks (aegan_fast/ops/blocks.py): models.ResBlock and the transposed up
block (models._up), forward + backward in training mode, channels_last, N=16 C=64 at 128² and 256²
(the up block's output; its input is half that), fp32 and bf16. Three implementations, rounds
interleaved (bench/timing.py), medians:

    fused     ops.use_backend("triton"): the block as one op (conv3x3 / convt4x4 + bn_act kernels)
    eager     ops.use_backend("reference"): F.conv2d / F.conv_transpose2d + cuDNN BatchNorm + activation
    compiled  torch.compile of the reference block (compiled inside use_backend("reference"))

    python -m bench.bench_blocks [--quick] [--no-compile]
    python -m bench --only blocks

Needs a CUDA GPU: without one it prints one line saying so and exits 0 (the suite shows the section
as skipped with that reason). No figure from it is recorded yet: none has run on a GPU. When one
does, record device, date and figures in bench/RESULTS.md and set dispatch.block_kernel's `auto`
from them.

Before timing, each implementation's output and gradients are checked against eager in relative L2
(fp32: 1e-4, TF32 off for every implementation; bf16: 5e-2, far below a broken kernel's O(1)); a
mismatch is an error row, not a timing.

Bytes (the count model): "algorithmic traffic" of the fused schedule as implemented, in passes over
one activation-sized tensor A = N*C*H*W elements of the activation dtype, the same count for every
implementation so GB/s compare like with like (weights and per-channel vectors ignored; a conv's
halo and K-block re-reads not counted). ResBlock forward: conv1 reads x, writes y1 (2); conv2 reads
y1, writes y2 (2); BN2 apply reads y2, x, writes out (3) = 7. Backward: BN2 reduce reads dout, y2
(2), apply reads dout, y2, writes dy2 (3); wgrad2 reads dy2, y1 (2); dgrad2 with BN1's reductions
in its epilogue reads dy2, y1, writes da1 in fp32 (2 + f); BN1 apply reads da1, y1, writes dy1
(f + 2); wgrad1 reads dy1, x (2); dgrad1 reads dy1, writes dx (2); dx += dout (3) = 18 + 2f, with
f = 4 / element size (1 in fp32, 2 in bf16). Total 27 passes fp32, 29 bf16. Up block, in passes over the output
A_out = N*Co*2H*2W (the input is A_out/4 at Ci = Co): forward convT reads x (1/4), writes y (1), BN
apply reads y, writes out (2); backward BN reduce + apply (5), dgrad reads dy, writes dx (1 + 1/4),
wgrad reads dy, x (1 + 1/4) = 10.75 passes.

FLOPs: 2 multiply-adds per conv tap: ResBlock 3 passes (forward, dgrad, wgrad) x 2 convs x
2*N*H*W*C*C*9; up block 3 x 2*N*H*W*Ci*Co*16 (H, W of its input). Fractions are of this run's
measured device-to-device copy bandwidth (read + write) and bf16 matmul peak (bench/timing.py's
measure_peaks).
"""
from __future__ import annotations

import argparse

import torch

from bench import timing

N, C = 16, 64
SIZES = (128, 256)
STEPS = 5  # fwd+bwd steps per sample: one synchronize per sample, not per step
DEVICE = "cuda"  # a dry run of the code paths can set "cpu" under TRITON_INTERPRET=1 (with tiny sizes)


def unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch sees none)"
    return None


def passes(kind: str, dtype: torch.dtype) -> float:
    """Activation-sized passes per forward + backward (the module docstring's count model)."""
    if kind == "res":
        f = 4 / torch.empty((), dtype=dtype).element_size()
        return 7 + 18 + 2 * f
    return 10.75


def flops(kind: str, size: int) -> float:
    if kind == "res":
        return 3 * 2 * 2 * N * size * size * C * C * 9
    h = size // 2
    return 3 * 2 * N * h * h * C * C * 16


def make_block(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    """The block on the GPU, channels_last; conv weights in ``dtype``, BatchNorm in fp32 (as trained)."""
    from aegan_fast import models
    torch.manual_seed(0)
    m = models.ResBlock(C, "relu") if kind == "res" else models._up(C, C, "transposed")
    m = m.to(DEVICE, memory_format=torch.channels_last)
    for mod in m.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            mod.to(dtype)
    return m


def step_fn(m: torch.nn.Module, backend: str, x: torch.Tensor, dy: torch.Tensor, compiled: bool = False):
    """One forward + backward (every gradient, no accumulation into .grad) on ``backend``."""
    from aegan_fast import ops
    params = list(m.parameters())
    fn = torch.compile(m, dynamic=False) if compiled else m

    def step():
        with ops.use_backend(backend):  # a compiled graph bakes in the backend of its first call
            y = fn(x)
        return (y, *torch.autograd.grad(y, [x, *params], dy))
    return step


def _check(name: str, got, want, dtype: torch.dtype) -> None:
    """A sanity check against a broken kernel or compile, in relative L2: accuracy is
    tests/test_blocks_triton.py's. A max-norm bound would trip on ReLU kinks: an element of
    BN(y) within a bf16 rounding of 0 takes the other derivative on one side (measured 4% of
    scale at one element of an up block's grad x), which is no error of either."""
    rtol = 1e-4 if dtype == torch.float32 else 5e-2
    for i, (a, b) in enumerate(zip(got, want)):
        err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
        if not err <= rtol:
            raise AssertionError(f"{name}: output/gradient {i} differs from eager by {err:.3g} relative (L2)")


def section(ctx, compile_: bool | None = None) -> list:
    """The suite's ``blocks`` section (also what main() prints)."""
    why = unavailable()
    if why is not None:
        return [timing.skipped("blocks", "all", why)]
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    # fp32 rows are fp32 for every implementation (the fused kernels never use TF32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    try:
        return _section(ctx, (not ctx.quick) if compile_ is None else compile_)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = flags


def _section(ctx, compile_: bool) -> list:
    from aegan_fast import ops
    rows = timing.measure_peaks(ctx, "blocks", DEVICE)
    fused_why = ops.availability()["triton"]
    impls = ["fused", "eager"] + (["compiled"] if compile_ else [])
    if fused_why is not None:
        rows.append(timing.skipped("blocks", "fused", f"triton backend unavailable: {fused_why}"))
        impls.remove("fused")
    if not compile_:
        rows.append(timing.skipped("blocks", "compiled", "not in --quick / --no-compile (a cold torch.compile per "
                                                        "block, dtype and size)"))
    sizes = SIZES[:1] if ctx.quick else SIZES
    for kind in ("res", "up"):
        for size in sizes:
            for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                label = f"{'resblock' if kind == 'res' else 'up block'} N{N} C{C} {size}² {dname} channels_last"
                timing.progress(f"blocks: building {label}")
                m = make_block(kind, dtype)
                h = size if kind == "res" else size // 2
                g = torch.Generator(device=DEVICE).manual_seed(0)
                x = torch.randn(N, C, h, h, device=DEVICE, generator=g).to(dtype).contiguous(
                    memory_format=torch.channels_last).requires_grad_()
                out_shape = (N, C, size, size)
                dy = torch.randn(out_shape, device=DEVICE, generator=g).to(dtype).contiguous(
                    memory_format=torch.channels_last)
                nbytes = passes(kind, dtype) * N * C * size * size * x.element_size()
                steps = {"eager": step_fn(m, "reference", x, dy)}
                if "fused" in impls:
                    steps["fused"] = step_fn(m, "triton", x, dy)
                if "compiled" in impls:
                    steps["compiled"] = step_fn(m, "reference", x, dy, compiled=True)
                want = steps["eager"]()  # training mode throughout: outputs depend on the batch alone
                cases = []
                for impl, step in steps.items():
                    name = f"{label} {impl}"
                    try:
                        got = step()  # the warm-up (and the compile)
                        if impl != "eager":
                            _check(name, got, want, dtype)
                    except Exception as e:  # noqa: BLE001 - a failing implementation is an error row
                        rows.append(timing.failed("blocks", name, e))
                        continue
                    base = () if impl == "eager" else (f"{label} eager",) + (
                        (f"{label} compiled",) if impl == "fused" and "compiled" in steps else ())
                    cases.append(timing.Case(name, step, nbytes, "B", base, f"{passes(kind, dtype):g} passes",
                                             peaks=("cuda_copy",), warmed=True, device=DEVICE, repeat=STEPS))
                measured = timing.measure("blocks", cases, ctx.rounds(9, 3))
                for row in measured:
                    if row.status == "ok" and ctx.peaks.get("cuda_matmul_bf16"):
                        rate = flops(kind, size) / row.median_s
                        row.note += (f"; {rate / 1e12:.1f} TFLOP/s = {rate / ctx.peaks['cuda_matmul_bf16']:.0%} "
                                     f"of bf16 matmul peak")
                rows += measured
                del steps, m, x, dy
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="128² only, 3 rounds, no torch.compile")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    a = p.parse_args(argv)
    why = unavailable()
    if why is not None:
        print(f"bench_blocks: skipped: {why}")
        return 0
    ctx = timing.Context(a.quick)
    rows = section(ctx, compile_=False if a.no_compile else None)
    timing.fill_peak_fractions(rows, ctx.peaks)
    feats = {"cuda": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(timing.table(rows, feats, "# bench/bench_blocks.py: medians of interleaved rounds; × baseline = its "
                                   "median / this one's (>1 faster); of peak = of this run's measured copy bandwidth"))
    return 1 if any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
