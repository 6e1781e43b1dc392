"""Data loader throughput (issue 4): images/s of each loader on the prepared emoji set at R=128 and
256, batch 16, 2 workers/threads, against a naive DataLoader that PIL-decodes every item; and the
trainer's data-wait fraction in a stage-1 run at R=128.

    .venv/bin/python bench/bench_loaders.py            # prints the markdown table for bench/RESULTS.md
    .venv/bin/python -m pytest bench/bench_loaders.py --benchmark-only

Loaders:
- naive-raw: torch DataLoader (2 worker processes) whose Dataset opens each source .webp with PIL,
  flattens alpha, resizes to R (Lanczos), flips and normalises: what a first attempt looks like.
- naive-png: the same DataLoader decoding the prepared set's PNG files (already at R) per item.
- torch: aegan_fast TorchLoader over images.npy read into RAM (2 threads).
- torch-mmap: the same, memory-mapped (``data_cache_mb`` 0), as for a set larger than RAM.
- dali-cpu-png / dali-cpu-jpeg: DaliLoader with DALI's CPU decoder (2 threads) on PNG / JPEG q95 files.
Each is warmed up (first batches, worker start), then timed over a fixed wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aegan_fast.data import (DaliLoader, TorchLoader, dali_unavailable, ensure_encoded, fetch_emoji, load_dataset,
                             open_prepared)
from aegan_fast.data.images import square, to_rgb

BATCH, WORKERS = 16, 2


class NaiveFiles(torch.utils.data.Dataset):
    """One PIL decode (and resize, when the file is not at R) per item."""

    def __init__(self, files, resolution):
        self.files, self.resolution = [str(f) for f in files], resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            im = square(to_rgb(im), self.resolution)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.float().div_(127.5).sub_(1.0)


def naive_loader(files, resolution):
    ds = NaiveFiles(files, resolution)
    return iter(torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True,
                                            persistent_workers=True, prefetch_factor=4))


def _loop(make):
    """Endless batches from make(), which may raise StopIteration at the end of an epoch."""
    it = make()
    while True:
        try:
            yield next(it)
        except StopIteration:
            it = make()


def throughput(batches, warmup: int = 5, seconds: float = 6.0) -> float:
    for _ in range(warmup):
        next(batches)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = next(batches)
        n += (x[0] if isinstance(x, tuple) else x).shape[0]
    return n / (time.perf_counter() - t0)


def emoji_set(resolution: int):
    data = load_dataset(None, resolution)
    return data, sorted(fetch_emoji().glob("*.webp")) or sorted(fetch_emoji().rglob("*.webp"))


def loaders(resolution: int):
    """name -> zero-argument factory of an endless batch iterator (with a close() when it has one)."""
    data, raw = emoji_set(resolution)
    root = data.root
    out = {
        "naive-raw": lambda: _loop(lambda: naive_loader(raw, resolution)),
        "naive-png": lambda: _loop(lambda: naive_loader(ensure_encoded(root, "png", progress=False), resolution)),
        "torch": lambda: TorchLoader(open_prepared(root), BATCH, 0, "cpu", workers=WORKERS),
        "torch-mmap": lambda: TorchLoader(open_prepared(root, cache_mb=0), BATCH, 0, "cpu", workers=WORKERS),
    }
    if dali_unavailable() is None:
        out["dali-cpu-png"] = lambda: DaliLoader(open_prepared(root), BATCH, 0, "cpu", workers=WORKERS, encoded="png")
        out["dali-cpu-jpeg"] = lambda: DaliLoader(open_prepared(root), BATCH, 0, "cpu", workers=WORKERS,
                                                  encoded="jpeg")
    return out


def stage1_data_wait(resolution: int = 128, kimg: float = 0.4) -> dict:
    """A stage-1 run on the emoji set with the auto loader: the trainer's own data_wait figures."""
    from aegan_fast.config import preset
    from aegan_fast.training import train

    cfg = preset("demo")
    cfg.model.resolution = resolution
    cfg.batch = BATCH
    cfg.kimg = {"ae": kimg + 1.0, "embed": 0.0, "finetune": 0.0}  # stopped after kimg, inside stage 1
    cfg.eval_metrics, cfg.eval_n = (), 16
    cfg.log_every_steps, cfg.sample_every_kimg, cfg.ckpt_every_kimg = 5, 0, 0
    cfg.device, cfg.loader = "cpu", "auto"
    data = load_dataset(None, resolution)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp), progress=False, data=data, stop_after_steps=int(kimg * 1000) // BATCH)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "ae" and "losses" in r][1:]  # the first interval warms up
    wait = float(np.mean([r["data_wait"] for r in steps]))
    return {"data_wait": wait, "img_per_s": float(np.mean([r["img_per_s"] for r in steps])), "intervals": len(steps)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default="128,256")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--only", help="comma-separated loader names")
    args = p.parse_args(argv)
    torch.set_num_threads(WORKERS)
    results = {}
    for r in (int(x) for x in args.resolutions.split(",")):
        for name, make in loaders(r).items():
            if args.only and name not in args.only.split(","):
                continue
            it = make()
            results[(name, r)] = throughput(it, seconds=args.seconds)
            if hasattr(it, "close"):
                it.close()
            print(f"R={r} {name}: {results[(name, r)]:.0f} img/s", file=sys.stderr, flush=True)
    names = list(dict.fromkeys(n for n, _ in results))
    res = sorted({r for _, r in results})
    print("| loader | " + " | ".join(f"R={r} img/s | × naive-raw | × naive-png" for r in res) + " |")
    print("|---|" + "---|---|---|" * len(res))
    for n in names:
        cells = []
        for r in res:
            v = results.get((n, r))
            raw, png = results.get(("naive-raw", r)), results.get(("naive-png", r))
            cells += [f"{v:.0f}" if v else "–", f"{v / raw:.1f}" if v and raw else "–", f"{v / png:.1f}" if v and png else "–"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    if 128 in res:
        w = stage1_data_wait(128)
        print(f"\nstage-1 training at R=128, batch {BATCH}, loader auto (torch): data_wait = {100 * w['data_wait']:.2f}% "
              f"of step time ({w['img_per_s']:.1f} img/s, {w['intervals']} log intervals)")


# --------------------------------------------------------------------------- pytest-benchmark entry points

@pytest.mark.parametrize("name", ["naive-png", "torch", "dali-cpu-png"])
def test_loader_r128(benchmark, name):
    makers = loaders(128)
    if name not in makers:
        pytest.skip(f"DALI not installed: {dali_unavailable()}")
    it = makers[name]()
    for _ in range(3):
        next(it)
    benchmark.pedantic(lambda: next(it), rounds=30, iterations=1)
    if hasattr(it, "close"):
        it.close()


if __name__ == "__main__":
    main()
