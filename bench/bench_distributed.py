"""Training throughput of one machine's cores laid out three ways, and what the gradient all-reduces cost.

    python -m bench.bench_distributed [--rounds 2] [--layouts 1x2 2x1 agents] [--grad-bucket-mb 0 1] [--data DIR]

    1x2      one process, all cores as its OpenMP threads (the plain run)
    2x1      ``torchrun --standalone --nproc_per_node=2``: two processes, half the cores each
    agents   two torchrun agents (``--nnodes=2 --nproc_per_node=1``, c10d on 127.0.0.1), as two nodes run

Each round runs the demo preset (R=64, global batch 32) for a few dozen steps a stage in every
layout (and, for the multi-process ones, every ``--grad-bucket-mb``), in turn, so that load from
other processes falls on all alike. img/s and ``comm_wait`` (the share of the ranks' time spent
blocked on gradient all-reduces) are the trainer's own figures from metrics.jsonl, median over each
stage's log rows after the first (grids, evaluations and checkpoints are left out of them, so
bench/timing.py does not apply). On a CPU the layouts share the same cores: this measures what
data parallelism costs and wins on one machine (smaller per-process batches, fewer threads per
process, the all-reduces), not extra hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("ae", "embed", "finetune")
LAYOUTS = ("1x2", "2x1", "agents")
KIMG = {"ae": 0.96, "embed": 0.48, "finetune": 0.32}  # 30, 15 and 10 steps of 32 images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(layout: str, args: list[str], job: str) -> list[list[str]]:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    if layout == "1x2":
        return [[sys.executable, *args]]
    if layout == "2x1":
        return [[torchrun, "--standalone", "--nproc_per_node=2", *args]]
    port = _free_port()
    return [[torchrun, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job}", *args] for _ in range(2)]


def run_once(layout: str, bucket_mb: float, data: str | None, run: Path, threads: int) -> dict:
    """One training run; {stage: (img/s, comm_wait)} from its metrics.jsonl."""
    args = ["-m", "aegan_fast.train", "--run-dir", str(run), "--no-progress", "--device", "cpu",
            "--kimg", *[f"{s}={k}" for s, k in KIMG.items()], "--ckpt-every-kimg", "0", "--sample-every-kimg", "0",
            "--log-every-steps", "5", "--eval-n", "64", "--grad-bucket-mb", str(bucket_mb)]
    args += ["--data", data] if data else []
    procs = 1 if layout == "1x2" else 2
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // procs)))
    agents = []
    for cmd in _commands(layout, args, run.name):
        agents.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
        time.sleep(0.5 if len(agents) == 1 and layout == "agents" else 0)  # the first hosts the c10d store
    errors = [a.communicate()[1] for a in agents]
    if any(a.returncode for a in agents):
        raise SystemExit(f"{layout} run failed:\n" + "\n".join(e[-2000:] for e in errors))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for stage in STAGES:
        steps = [row for row in rows if row.get("stage") == stage and "losses" in row][1:]
        out[stage] = (statistics.median(r["img_per_s"] for r in steps) if steps else float("nan"),
                      statistics.median(r.get("comm_wait", 0.0) for r in steps) if steps else float("nan"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--grad-bucket-mb", type=float, nargs="+", default=[0.0, 1.0],
                   help="bucket sizes to compare in the multi-process layouts (0: one all-reduce after each backward)")
    p.add_argument("--data", help="image folder or prepared set (default: the built-in emoji set)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores shared by the processes")
    args = p.parse_args(argv)
    cases = [(layout, mb) for layout in args.layouts for mb in (args.grad_bucket_mb if layout != "1x2" else [0.0])]
    results: dict[tuple, list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for layout, mb in cases:
                run = Path(tmp) / f"{layout}-{mb:g}-{k}"
                results[layout, mb].append(run_once(layout, mb, args.data, run, args.threads))
                print(f"round {k + 1}: {layout} bucket {mb:g} MiB: " + ", ".join(
                    f"{s} {v[0]:.1f} img/s" for s, v in results[layout, mb][-1].items()), file=sys.stderr)
    base = ("1x2", 0.0) if ("1x2", 0.0) in results else cases[0]
    print(f"\nimg/s over the global batch (median of {args.rounds} rounds), demo preset R=64, batch 32, "
          f"{args.threads} cores; ratio against {base[0]}; comm: share of the ranks' time blocked on gradient all-reduces")
    print(f"{'stage':9s} {'layout':8s} {'bucket':>8s} {'img/s':>7s} {'ratio':>6s} {'comm':>6s}")
    for stage in STAGES:
        ref = statistics.median(r[stage][0] for r in results[base])
        for layout, mb in cases:
            rate = statistics.median(r[stage][0] for r in results[layout, mb])
            comm = statistics.median(r[stage][1] for r in results[layout, mb])
            bucket = "—" if layout == "1x2" else f"{mb:g} MiB"
            print(f"{stage:9s} {layout:8s} {bucket:>8s} {rate:7.1f} {rate / ref:5.2f}× {100 * comm:5.1f}%")


if __name__ == "__main__":
    main()
