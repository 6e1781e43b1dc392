"""A whole stage-2 training step with each ops backend: reference, cpp and auto, in one run.

The step is exactly what `python -m aegan_fast.train` runs in stage 2: G_E/D_E on cached real
embeddings (`embed_steps` of them), F(G_E(z)) → φ vs D_R, all four optimizers. Two shapes:

    R=64   the demo preset's nets (max_channels 128), batch 32, embed_steps 4
    R=128  the reference widths, batch 16, embed_steps 1

Every backend runs on identically seeded weights and the same batch; rounds alternate between
the backends so load from other processes falls on all alike. What to compare is the ratio (absolute
times on these shared machines are noise) and `auto` against the better of reference and cpp: the
dispatcher's promise is that auto is never slower than either. The step's FLOPs (counted by
torch.utils.flop_counter) over its median time, against this machine's fp32 matmul rate measured in
the same run, say how close to the machine's peak a step runs.

    .venv/bin/python bench/bench_train_step.py [rounds]        # medians, ratios, fraction of peak
    .venv/bin/python -m pytest bench/bench_train_step.py --benchmark-only
"""
from __future__ import annotations

import statistics
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aegan_fast import ops
from aegan_fast.config import preset
from aegan_fast.data import ImageSet
from aegan_fast.models import ModelConfig, build_nets
from aegan_fast.stages import EMBED, Batch, RealEmbeddings, make_optimizers, prepare_stage

SHAPES = {  # name -> (model config, batch, embed_steps)
    "R=64 demo": (ModelConfig(resolution=64, max_channels=128), 32, 4),
    "R=128": (ModelConfig(resolution=128), 16, 1),
}
BACKENDS = ("reference", "cpp", "auto")


def make_step(backend: str, shape: str):
    """A closure running one stage-2 step with the given ops backend (weights seeded identically)."""
    model, batch_size, embed_steps = SHAPES[shape]
    torch.manual_seed(0)
    cfg = preset("demo")
    cfg.model, cfg.batch, cfg.embed_steps, cfg.device = model, batch_size, embed_steps, "cpu"
    nets = build_nets(cfg.model)
    opts = make_optimizers(nets, cfg)
    prepare_stage(EMBED, nets, opts, cfg)
    g = torch.Generator().manual_seed(0)
    R = model.resolution
    data = ImageSet(torch.randint(0, 256, (64, 3, R, R), dtype=torch.uint8, generator=g), "random")
    emb = RealEmbeddings(nets["H"], data, g, "cpu", model.embed_channels * model.embed_size ** 2, 2**30)
    idx, mirror = data.sample_indices(batch_size, g)
    batch = Batch(data.gather(idx, mirror, "cpu"), idx, mirror)

    def step():
        with ops.use_backend(backend):
            return EMBED.step(nets, opts, batch, emb, cfg)
    return step


def step_flops(shape: str) -> int:
    counter = FlopCounterMode(display=False)
    step = make_step("reference", shape)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_flops_per_s(n: int = 2048, rounds: int = 15) -> float:
    """The machine's fp32 matmul peak: the best of several rounds (a peak is a best case; the median
    of a few rounds on a loaded machine undercounts it and overstates the step's fraction)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def unavailable(backend: str) -> str | None:
    return None if backend == "auto" else ops.availability()[backend]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_stage2_step(benchmark, backend, shape):
    if unavailable(backend):
        pytest.skip(f"{backend} backend unavailable: {unavailable(backend)}")
    step = make_step(backend, shape)
    benchmark.group = f"stage-2 step {shape}"
    benchmark.extra_info.update(backend=backend, images=SHAPES[shape][1])
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)


def main(rounds: int = 7) -> None:
    backends = [b for b in BACKENDS if not unavailable(b)]
    for b in BACKENDS:
        if unavailable(b):
            print(f"{b}: unavailable ({unavailable(b)})")
    peak = matmul_flops_per_s()
    print(f"fp32 matmul 2048² on this machine (best of 15): {peak / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    for shape in SHAPES:
        batch = SHAPES[shape][1]
        flops = step_flops(shape)
        steps = {b: make_step(b, shape) for b in backends}
        times: dict[str, list[float]] = {b: [] for b in backends}
        for b in backends:
            steps[b]()  # warm-up
        for _ in range(rounds):
            for b in backends:
                t = time.perf_counter()
                steps[b]()
                times[b].append(time.perf_counter() - t)
        med = {b: statistics.median(t) for b, t in times.items()}
        print(f"\nstage-2 step {shape}, batch {batch}, {flops / 1e9:.1f} GFLOP per step, {rounds} interleaved rounds")
        for b, t in times.items():
            print(f"  {b:<10} median {med[b] * 1e3:7.0f} ms  {batch / med[b]:6.1f} img/s  "
                  f"{flops / med[b] / peak:5.1%} of matmul peak  (min {min(t) * 1e3:.0f}, max {max(t) * 1e3:.0f})")
        if "reference" in med:
            for b in med:
                if b != "reference":
                    print(f"  {b} / reference speed-up: {med['reference'] / med[b]:.3f}x")
        if {"reference", "cpp", "auto"} <= set(med):
            best = min(med["reference"], med["cpp"])
            print(f"  auto vs the better of reference and cpp: {best / med['auto']:.3f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
