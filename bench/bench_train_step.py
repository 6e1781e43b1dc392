"""A stage-2 training step at R=128, batch 16 (the reference widths), with --ops reference vs cpp.

The whole step: G_E/D_E on cached real embeddings, F(G_E(z)) → φ vs D_R with all four optimizers,
exactly what `python -m aegan_fast.train` runs in stage 2. Both backends are measured in the same
run, on the same weights and batch; the ratio is what to compare (absolute times on these shared
machines are noise).

    .venv/bin/python bench/bench_train_step.py            # prints medians and the ratio
    .venv/bin/python -m pytest bench/bench_train_step.py --benchmark-only
"""
from __future__ import annotations

import statistics
import sys
import time

import pytest
import torch

from aegan_fast import ops
from aegan_fast.config import TrainConfig
from aegan_fast.data import ImageSet
from aegan_fast.models import ModelConfig, build_nets
from aegan_fast.stages import EMBED, Batch, RealEmbeddings, prepare_stage

RESOLUTION, BATCH = 128, 16


def make_step(backend: str):
    """A closure running one stage-2 step on the given ops backend (weights seeded identically)."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(resolution=RESOLUTION), batch=BATCH, device="cpu")
    nets = build_nets(cfg.model)
    opts = {k: torch.optim.Adam(nets[k].parameters(), lr=cfg.lr[k], betas=cfg.betas) for k in nets}
    prepare_stage(EMBED, nets, opts, cfg)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (64, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8, generator=g), "random")
    emb = RealEmbeddings(nets["H"], data, g, "cpu", cfg.model.embed_channels * cfg.model.embed_size ** 2, 2**30)
    idx, mirror = data.sample_indices(BATCH, g)
    batch = Batch(data.gather(idx, mirror, "cpu"), idx, mirror)

    def step():
        with ops.use_backend(backend):
            return EMBED.step(nets, opts, batch, emb, cfg)
    return step


def available(backend: str) -> str | None:
    return ops.availability()[backend]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_stage2_step_r128(benchmark, backend):
    if available(backend):
        pytest.skip(f"{backend} backend unavailable: {available(backend)}")
    step = make_step(backend)
    benchmark.group = "stage-2 step R=128 batch 16"
    benchmark.extra_info.update(backend=backend, images=BATCH)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)


def main(rounds: int = 7) -> None:
    """Rounds alternate between the backends, so load from other processes on a shared machine falls
    on both alike and the ratio stays meaningful."""
    backends = [b for b in ("reference", "cpp") if not available(b)]
    for b in ("reference", "cpp"):
        if available(b):
            print(f"{b}: unavailable ({available(b)})")
    steps = {b: make_step(b) for b in backends}
    times: dict[str, list[float]] = {b: [] for b in backends}
    for b in backends:
        steps[b]()  # warm-up
    for _ in range(rounds):
        for b in backends:
            t = time.perf_counter()
            steps[b]()
            times[b].append(time.perf_counter() - t)
    medians = {b: statistics.median(t) for b, t in times.items()}
    for b, t in times.items():
        print(f"{b:<10} median {medians[b] * 1e3:8.0f} ms/step  {BATCH / medians[b]:6.1f} img/s  "
              f"(min {min(t) * 1e3:.0f}, max {max(t) * 1e3:.0f}, {rounds} rounds)")
    if len(medians) == 2:
        print(f"cpp / reference speed-up: {medians['reference'] / medians['cpp']:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
