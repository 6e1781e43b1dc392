"""Whole training steps of each stage: the default fast path against two plain baselines, in one
run, rounds interleaved.

    reference  plain PyTorch: ops=reference (torch BatchNorm + activation), fp32 NCHW, torch's default
               (per-parameter) Adam, no compile: what a plain port of the authors' code runs
    autocast   the same plain port as a savvy user would first speed it up: fp32 master weights and
               inputs in channels_last, every step under one ``torch.autocast(bf16)``; plain Adam
    fast       what `python -m aegan_fast.train` runs by default: ops=auto, precision=auto (bf16 +
               channels_last where the device has native bf16), fused Adam, compile per --compile auto
    (plus any explicit variant: ops backend × precision × channels_last × fused, see ``Variant``)

A step is exactly the trainer's (training.take_step on a state from training.new_state) on identically
seeded nets and one batch of random images. What to compare is the ratio within one run (absolute
times on these shared machines are noise). FLOPs are counted once per case by
torch.utils.flop_counter on the reference step.

    .venv/bin/python -m bench.bench_train_step [--stages ae embed] [--resolutions 64 128] [--rounds 5]
    .venv/bin/python -m bench.bench_train_step --stages embed --resolutions 128 --profile   # top ops
    .venv/bin/python -m bench.bench_train_step --stages ae embed finetune --resolutions demo  # what `make train` runs
    .venv/bin/python -m bench.bench_train_step --stages embed finetune --resolutions 64 --variants fast fast_r1  # R1's cost
    .venv/bin/python -m bench --only steps      # every stage at R=64/128/256, in the suite's table
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from aegan_fast import ops
from aegan_fast.config import preset
from aegan_fast.data import ImageSet
from aegan_fast.models import ModelConfig
from aegan_fast.training import STAGES, enter_stage, new_state, take_step
from bench.timing import Case, Context, Row, fill_peak_fractions, measure, measure_peaks, progress, table

# shape -> (model config, batch, embed_steps): at R=64 the demo's widths with the paper's layers
# (transposed up convs, φ on), the paper's widths above; "demo": exactly what `make train` runs
# (the demo preset's nets, batch and embed_steps).
_DEMO = preset("demo")
SHAPES = {
    64: (ModelConfig(resolution=64, max_channels=128), 32, 4),
    128: (ModelConfig(resolution=128), 16, 1),
    256: (ModelConfig(resolution=256), 16, 1),
    "demo": (_DEMO.model, _DEMO.batch, _DEMO.embed_steps),
}


@dataclass(frozen=True)
class Variant:
    ops: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    fused_adam: bool = True
    guard: bool = True      # the trainer's divergence guard (aegan_fast/guard.py) sees every update
    r1_gamma: float = 0.0   # --r1-gamma D_E=γ D_R=γ: what the R1 penalty's double backward costs
    autocast: bool = False  # the whole step under torch.autocast(bf16) (the plain port's speed-up)


VARIANTS = {
    "reference": Variant(ops="reference", precision="fp32", channels_last=False, fused_adam=False, guard=False),
    "autocast": Variant(ops="reference", precision="fp32", channels_last=True, fused_adam=False, guard=False,
                        autocast=True),
    "fast": Variant(),
    # A step that takes R1 (the trainer takes it on one step in --r1-every); not in the default
    # comparison: --variants fast fast_r1
    "fast_r1": Variant(r1_gamma=1.0),
}
# The plain paths every other variant is compared with, when they are in the run.
BASELINES = ("reference", "autocast")
DEFAULT_VARIANTS = ["reference", "autocast", "fast"]


def make_step(stage_name: str, shape: int | str, variant: Variant | str = "fast", batch: int | None = None):
    """A zero-argument closure running one training step of stage_name (ae | embed | finetune | direct)
    on a SHAPES entry with the variant's ops, precision and optimizer; weights seeded identically for
    every variant. Its ``.describe`` says what it runs."""
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    model, batch_size, embed_steps = SHAPES[shape]
    resolution = model.resolution
    batch_size = batch or batch_size
    stage = STAGES[stage_name]
    cfg = preset("demo")
    cfg.model, cfg.batch, cfg.embed_steps, cfg.device, cfg.seed = model, batch_size, embed_steps, "cpu", 0
    cfg.ops, cfg.precision, cfg.channels_last = variant.ops, variant.precision, variant.channels_last
    cfg.embed_cache_mb = 1024
    cfg.r1_gamma = {"D_E": variant.r1_gamma, "D_R": variant.r1_gamma} if variant.r1_gamma else {}
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (64, 3, resolution, resolution), dtype=torch.uint8, generator=g), "random")
    st = new_state(cfg, data, "cpu", fused_adam=variant.fused_adam, guard=variant.guard)
    emb = enter_stage(stage, st)
    idx, mirror = data.sample_indices(batch_size, g)
    batch = st.batch(data.gather(idx, mirror, "cpu"), idx, mirror)
    prec = st.precision

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if variant.autocast else contextlib.nullcontext()

    def step():
        with ops.use_backend(cfg.ops), autocast():
            return take_step(stage, st, batch, emb)
    step.describe = (f"ops={variant.ops}, {prec.describe()}" + (", torch.autocast(bf16)" if variant.autocast else "")
                     + f", {'fused' if variant.fused_adam else 'loop'} Adam"
                     + (", guard" if variant.guard else "") + (f", R1 γ={variant.r1_gamma:g}" if variant.r1_gamma else ""))
    step.images = batch_size
    step.state = st
    return step


def step_rows(section: str, stage_name: str, resolution: int | str, variants, rounds: int,
              batch: int | None = None) -> list[Row]:
    """One row per variant: a training step of ``stage_name`` at ``resolution``, rounds interleaved
    (bench/timing.py), each compared with the plain baselines (BASELINES) among them: the fast path
    with both, the autocast port with the fp32 one. FLOPs are counted once, on a reference step
    (torch.utils.flop_counter; R1's double backward not included)."""
    name = f"{stage_name} R={resolution}" if isinstance(resolution, int) else f"{stage_name} {resolution}"
    progress(f"{section}: building {name}")
    steps = {v: make_step(stage_name, resolution, v, batch=batch) for v in variants}
    counter = FlopCounterMode(display=False)
    with counter:  # the reference's warm-up when it is one of the variants
        (steps.get("reference") or make_step(stage_name, resolution, "reference", batch=batch))()
    flops = counter.get_total_flops()
    def baselines(v: str) -> tuple:
        plain = BASELINES[:BASELINES.index(v)] if v in BASELINES else BASELINES
        return tuple(f"{name} {b}" for b in plain if b in steps)

    rows = measure(section, [
        Case(f"{name} {v}", fn, flops, "FLOP", baselines(v),
             f"batch {fn.images}, {flops / 1e9:.1f} GFLOP; {fn.describe}", warmed=v == "reference")
        for v, fn in steps.items()], rounds)
    for row, fn in zip(rows, steps.values()):
        if row.status == "ok":
            row.note = f"{fn.images / row.median_s:.1f} img/s; " + row.note
    return rows


def top_ops(stage_name: str, resolution: int, variant: str, rows: int = 12) -> str:
    """A markdown table of the ops with the most self CPU time in two steps (after two warm-ups)."""
    from torch.profiler import ProfilerActivity, profile
    step = make_step(stage_name, resolution, variant)
    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(), step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"{variant}: {step.describe}", "| op | self CPU ms per step | share | calls per step |", "|---|---:|---:|---:|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 2e3:.1f} | {e.self_cpu_time_total / total:.1%} | {e.count // 2} |")
    lines.append(f"| total | {total / 2e3:.0f} | | |")
    return "\n".join(lines)


def _shape(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=["ae", "embed"], choices=list(STAGES))
    p.add_argument("--resolutions", nargs="+", type=_shape, default=[64, 128], choices=list(SHAPES),
                   help="64, 128, 256, or demo: the demo preset exactly (what `make train` runs)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print each variant's top ops (torch.profiler) instead")
    args = p.parse_args(argv)
    if args.profile:
        for resolution in args.resolutions:
            for stage_name in args.stages:
                for v in args.variants:
                    print(f"\n{stage_name} step R={resolution}, " + top_ops(stage_name, resolution, v))
        return
    ctx = Context(quick=False)
    rows = measure_peaks(ctx)
    for resolution in args.resolutions:
        for stage_name in args.stages:
            rows += step_rows("steps", stage_name, resolution, args.variants, args.rounds)
    fill_peak_fractions(rows, ctx.peaks)
    print(table(rows, {}, "# bench_train_step: medians of interleaved rounds; × baseline = its median / this one's "
                          "(>1 faster); of peak = rate / this run's measured peak"))


if __name__ == "__main__":
    main()
