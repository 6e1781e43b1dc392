"""Training throughput on one process vs ``torchrun --nproc_per_node=N`` on the same machine.

    python -m bench.bench_distributed [--nproc 2] [--rounds 2] [--data DIR]

Each round runs the demo preset (R=64, global batch 32) for a few dozen steps a stage, once as one
process and once under torchrun with gloo, taking turns so that load from other processes falls on
both alike. img/s is read from the runs' metrics.jsonl (the trainer's own figure over the global
batch: grids, evaluation and checkpoints left out), median over each stage's log rows after the
first (figures from the trainers' own logs, not timed here, so bench/timing.py does not apply). On a
CPU the comparison is one process with all cores as OpenMP threads against N processes
with cores/N threads each (torchrun's OMP_NUM_THREADS), so it measures the cost of the gradient
all-reduce and of smaller per-process batches, not extra hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ("ae", "embed", "finetune")


def run_once(nproc: int, data: str | None, root: Path, tag: str, kimg: dict, threads: int) -> dict[str, float]:
    run = root / tag
    args = ["-m", "aegan_fast.train", "--run-dir", str(run), "--no-progress", "--device", "cpu",
            "--kimg", *[f"{s}={k}" for s, k in kimg.items()], "--ckpt-every-kimg", "0", "--sample-every-kimg", "0",
            "--log-every-steps", "5", "--eval-n", "64"] + (["--data", data] if data else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // nproc)))
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for stage in STAGES:
        rates = [row["img_per_s"] for row in rows if row.get("stage") == stage and "losses" in row][1:]
        out[stage] = statistics.median(rates) if rates else float("nan")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data", help="image folder or prepared set (default: the built-in emoji set)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores shared by the processes")
    args = p.parse_args(argv)
    kimg = {"ae": 0.96, "embed": 0.48, "finetune": 0.32}  # 30, 15 and 10 steps of 32 images
    results: dict[int, list[dict]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for nproc in results:
                results[nproc].append(run_once(nproc, args.data, Path(tmp), f"n{nproc}-{k}", kimg, args.threads))
                print(f"round {k + 1}: {nproc} process(es): " +
                      ", ".join(f"{s} {v:.1f}" for s, v in results[nproc][-1].items()), file=sys.stderr)
    print(f"\nimg/s (median over rounds), demo preset R=64, global batch 32, {args.threads} cores")
    print(f"{'stage':10s} {'1 process':>10s} {f'{args.nproc} processes':>12s} {'ratio':>7s}")
    for stage in STAGES:
        one = statistics.median(r[stage] for r in results[1])
        many = statistics.median(r[stage] for r in results[args.nproc])
        print(f"{stage:10s} {one:10.1f} {many:12.1f} {many / one:7.2f}×")


if __name__ == "__main__":
    main()
