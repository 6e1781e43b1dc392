"""The benchmark suite behind ``python -m bench``: one process, one table, one JSON file per run.

Sections, in order (``--only`` picks some; ``peaks`` and ``features`` always run, every fraction of
peak needs them and they cost seconds):

    peaks     this machine's measured peaks, in this run: copy bandwidth (dst.copy_(src), read + write),
              fp32 and bf16 matmul 2048², conv 3×3 64→64 N16 64×64 forward fp32 NCHW and bf16
              channels_last (bench/timing.py's measure_peaks). A peak is the best of its rounds (a
              best case; a median on a loaded machine undercounts it); the table shows medians like
              every other row.
    features  what torch and the OS say about the CPU (named, never chosen by here)
    ops       the fused BN ops forward + backward, fp32 NCHW and bf16 channels_last (bench_ops.py)
    loaders   images/s of the data loaders at R=128 (bench_loaders.py)
    steps     a training step of each stage, eager fp32 reference vs the default fast path
              (bench_train_step.py)
    sampling  batch 8 and batch 1 for every sampler backend that runs here vs eager fp32
              (bench_sampling.py)
    blocks    the fused ResBlock and up block on a GPU, fused vs eager vs torch.compile (bench_blocks.py);
              skipped, saying so, without a CUDA device

Every row is timed by bench/timing.py: within a section every row is warmed up, then the rows take
turns round by round with their baseline, so load from other processes falls on all alike; compare
ratios within one run (absolute times on these shared machines are noise). A row that cannot run
here says why; a row that fails is reported in the table and the suite goes on, exiting 1 at the end.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.timing import (Case, Context, Row, failed, fill_peak_fractions, measure, measure_peaks, progress, skipped,
                          table)

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------- sections

def section_peaks(ctx: Context) -> list[Row]:
    return measure_peaks(ctx)


def features() -> dict:
    flags: list[str] = []
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            if key.strip() == "flags":
                have = set(value.split())
                flags = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in have]
                break
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": bool(bf16()) if bf16 is not None else None,
        "cpuinfo_flags": flags if cpuinfo.exists() else None,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def section_ops(ctx: Context) -> list[Row]:
    from bench import bench_ops

    shape = (16, 64, 64, 64) if ctx.quick else (16, 64, 128, 128)
    impls = ["reference", "cpp"] + ([] if ctx.quick else ["compiled"])
    layouts = [("fp32", torch.float32, False, "NCHW"), ("bf16", torch.bfloat16, True, "channels_last")]
    rows: list[Row] = []
    if ctx.quick:
        rows.append(skipped("ops", "compiled", "not in --quick (a cold torch.compile per op and dtype)"))
    numel = math.prod(shape)
    for op in ("bn_act", "bn_add_act"):
        cases = []
        for impl in impls:
            if impl == "cpp" and bench_ops.WHY_NOT is not None:
                rows.append(skipped("ops", f"{op} cpp", f"cpp backend unavailable: {bench_ops.WHY_NOT}"))
                continue
            for dname, dtype, cl, layout in layouts:
                name = f"{op} {impl} {dname} {layout}"
                eager_same, eager_fp32 = f"{op} reference {dname} {layout}", f"{op} reference fp32 NCHW"
                baselines = tuple(dict.fromkeys(b for b in (eager_same, eager_fp32) if b != name))
                nbytes = bench_ops.PASSES[op] * numel * (2 if dtype == torch.bfloat16 else 4)
                cases.append(Case(name, bench_ops.fwd_bwd_case(op, impl, dtype, cl, shape), nbytes, "B", baselines))
        rows += measure("ops", cases, ctx.rounds(7, 3))
    return rows


def section_loaders(ctx: Context) -> list[Row]:
    from bench import bench_loaders

    try:
        makers = bench_loaders.loaders(128)
    except Exception as e:  # noqa: BLE001 - no emoji set here (offline, not prepared) is a reason, not a failure
        return [skipped("loaders", "all", f"the emoji set at R=128 is not available: {type(e).__name__}: {e}")]
    names = ["naive-png", "torch"] + ([] if ctx.quick else ["naive-raw", "torch-mmap", "dali-cpu-png"])
    rows = []
    if "dali-cpu-jpeg" in makers and not ctx.quick:
        # a prepared set holds one encoding of its files at a time: a JPEG loader taking turns with the
        # PNG ones would have its files replaced under it (bench_loaders times it after them, alone)
        rows.append(skipped("loaders", "dali-cpu-jpeg", "not interleaved with the PNG loaders (one encoding of the "
                                                         "prepared files at a time): python -m bench.bench_loaders"))
    if "dali-cpu-png" not in makers and not ctx.quick:
        rows.append(skipped("loaders", "dali", f"DALI unavailable: {bench_loaders.dali_unavailable()}"))
    rows += bench_loaders.measure_loaders("loaders", makers, names, ("naive-png",), 1.0 if ctx.quick else 3.0,
                                          ctx.rounds(3, 2))
    return rows


def section_steps(ctx: Context) -> list[Row]:
    from bench import bench_train_step as bts

    resolutions = (64,) if ctx.quick else (64, 128, 256)
    batch = 8 if ctx.quick else None
    rows = []
    for R in resolutions:
        for stage in ("ae", "embed", "finetune"):
            rows += bts.step_rows("steps", stage, R, bts.DEFAULT_VARIANTS, ctx.rounds(3 if R < 256 else 2, 2), batch)
    return rows


def section_sampling(ctx: Context) -> list[Row]:
    from bench import bench_sampling as bsamp
    from aegan_fast.sampling import sampler_backends

    R = 128 if ctx.quick else 512
    rows = []
    backends = None
    if ctx.quick:
        backends = {"eager", "auto"}
        rows.append(skipped("sampling", "eager-folded, compile, onnxruntime, openvino-*",
                            "not in --quick (each folds the paper-size nets and compiles or exports them again)"))
    for backend, why in sampler_backends("cpu").items():
        if why:
            rows.append(skipped("sampling", backend, why))
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    else:
        rows.append(skipped("sampling", "cuda", "no CUDA device visible to torch"))
    for device in devices:
        flops_per_image = None
        for batch in (1, 8):  # batch 1 first: its eager call is the cheap one to count FLOPs on
            progress(f"sampling: building the samplers at {R}², batch {batch}, {device}")
            with redirect_stdout(sys.stderr):  # bench_sampling prints its progress
                cases = bsamp.sampler_cases(R, batch, device=device, backends=backends)
            if flops_per_image is None:
                counter = FlopCounterMode(display=False)
                with counter:
                    cases["eager"]()
                flops_per_image = counter.get_total_flops() / batch
            prefix = f"{device} {R}² b{batch}"
            measured = measure("sampling", [  # sampler_cases has warmed every sampler up at this batch
                Case(f"{prefix} {name}", fn, flops_per_image * batch, "FLOP",
                     tuple(f"{prefix} {b}" for b in bsamp.baselines_of(name, cases)), warmed=True, device=device)
                for name, fn in cases.items()], ctx.rounds(3, 2), pause_s=0.5)
            for row in measured:
                if row.status == "ok":
                    row.note = (f"{batch / row.median_s:.2f} img/s" if batch > 1 else
                                f"latency {row.median_s * 1e3:.0f} ms") + (f"; {row.note}" if row.note else "")
            rows += measured
    return rows


def section_blocks(ctx: Context) -> list[Row]:
    from bench import bench_blocks

    return bench_blocks.section(ctx)


SECTIONS: dict[str, Callable[[Context], list[Row]]] = {
    "peaks": section_peaks,
    "ops": section_ops,
    "loaders": section_loaders,
    "steps": section_steps,
    "sampling": section_sampling,
    "blocks": section_blocks,
}
ALWAYS = ("peaks",)


def run(sections: list[str], quick: bool, out: Path | None, argv: list[str]) -> int:
    t0 = time.perf_counter()
    ctx = Context(quick)
    feats = features()
    progress("features: " + ", ".join(f"{k}={v}" for k, v in feats.items()))
    chosen = [s for s in SECTIONS if s in ALWAYS or s in sections]
    rows: list[Row] = []
    for name in chosen:
        progress(f"section {name}")
        try:
            with redirect_stdout(sys.stderr):
                rows += SECTIONS[name](ctx)
        except Exception as e:  # noqa: BLE001 - a section that cannot even build its rows is one error row
            progress(f"section {name} FAILED\n{traceback.format_exc()}")
            rows.append(failed(name, "(section)", e))
    if len(chosen) > 1:
        # other processes' load comes and goes on these shared cores: a peak measured once, under
        # load, undercounts and inflates every fraction; the best of the start and the end is kinder
        progress("section peaks, again")
        with redirect_stdout(sys.stderr):
            rows += SECTIONS["peaks"](ctx)
    fill_peak_fractions(rows, ctx.peaks)
    wall = time.perf_counter() - t0
    date = datetime.datetime.now(datetime.timezone.utc)
    mode = "--quick: R=64 steps at batch 8, 128² sampling, ops at N16 C64 64², 2–3 rounds" if quick else \
        "full: ops at N16 C64 128², steps at R=64/128/256, 512² sampling"
    header = (f"# python -m bench  {date:%Y-%m-%d %H:%M} UTC  {socket.gethostname()}  {mode}; "
              f"medians of interleaved rounds; × baseline = its median / this one's (>1 faster); "
              f"of peak = rate / this run's measured peak (best of the start and the end); wall {wall:.0f} s")
    print(table(rows, feats, header), flush=True)
    errors = [r for r in rows if r.status == "error"]
    out = out or RESULTS / f"{date:%Y-%m-%d}-{socket.gethostname()}{'-quick' if quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": [sys.executable, "-m", "bench", *argv], "date": date.isoformat(), "host": socket.gethostname(),
        "quick": quick, "sections": chosen, "wall_s": wall, "features": feats, "peaks": ctx.peaks,
        "rows": [asdict(r) for r in rows]}, indent=1, allow_nan=True) + "\n")
    progress(f"wrote {out}")
    if errors:
        progress(f"{len(errors)} row(s) failed: " + "; ".join(f"{r.section}/{r.name}" for r in errors))
        return 1
    return 0
