"""Data loader throughput (issue 4): images/s of each loader on the prepared emoji set at R=128 and
256, batch 16, 2 workers/threads, against a naive DataLoader that PIL-decodes every item; and the
trainer's data-wait fraction in a stage-1 run at R=128.

    .venv/bin/python -m bench.bench_loaders            # prints the markdown table for bench/RESULTS.md
    .venv/bin/python -m bench --only loaders           # R=128, in the suite's table

Loaders:
- naive-raw: torch DataLoader (2 worker processes) whose Dataset opens each source .webp with PIL,
  flattens alpha, resizes to R (Lanczos), flips and normalises: what a first attempt looks like.
- naive-png: the same DataLoader decoding the prepared set's PNG files (already at R) per item.
- torch: aegan_fast TorchLoader over images.npy read into RAM (2 threads).
- torch-mmap: the same, memory-mapped (``data_cache_mb`` 0), as for a set larger than RAM.
- dali-cpu-png / dali-cpu-jpeg: DaliLoader with DALI's CPU decoder (2 threads) on PNG / JPEG q95 files.
The loaders reading one encoding of the prepared files take turns in interleaved rounds
(bench/timing.py); a sample is a loader's steady rate over a fixed wall time, after batches that drain
what its workers prefetched while the others had their turn. dali-cpu-jpeg is timed after them, on
its own: a prepared set holds one encoding of its files at a time, and the JPEG loader would have its
files replaced under it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aegan_fast.data import (DaliLoader, TorchLoader, dali_unavailable, ensure_encoded, fetch_emoji, load_dataset,
                             open_prepared)
from aegan_fast.data.images import square, to_rgb
from bench.timing import Case, Row, measure, table

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


def measure_loaders(section: str, makers: dict, names, baselines: tuple[str, ...], seconds: float, rounds: int,
                    prefix: str = "") -> list[Row]:
    """Images/s of each named loader that ``makers`` has, in interleaved rounds: a sample is its
    steady rate over ``seconds``, after 10 batches that drain what its workers prefetched while the
    others had their turn. Rows are named ``prefix + name``; each is compared with the ``baselines``
    (loader names) measured here."""
    present = [n for n in names if n in makers]
    its: dict[str, object] = {}
    try:
        cases = []
        for name in present:
            its[name] = it = makers[name]()
            cases.append(Case(prefix + name, lambda it=it: next(it), BATCH, "img",
                              tuple(prefix + b for b in baselines if b != name and b in present),
                              min_sample_s=seconds, drain=10))
        return measure(section, cases, rounds)
    finally:
        for it in its.values():
            if hasattr(it, "close"):
                it.close()


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
    p.add_argument("--seconds", type=float, default=2.0, help="wall time of one sample")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--only", help="comma-separated loader names")
    args = p.parse_args(argv)
    torch.set_num_threads(WORKERS)
    rows = []
    for r in (int(x) for x in args.resolutions.split(",")):
        makers = loaders(r)
        names = [n for n in makers if not args.only or n in args.only.split(",")]
        rows += measure_loaders("loaders", makers, [n for n in names if n != "dali-cpu-jpeg"],
                                ("naive-raw", "naive-png"), args.seconds, args.rounds, prefix=f"R={r} ")
        if "dali-cpu-jpeg" in names:  # alone, after the PNG readers (the module docstring says why)
            rows += measure_loaders("loaders", makers, ["dali-cpu-jpeg"], (), args.seconds, args.rounds,
                                    prefix=f"R={r} ")
    print(table(rows, {}, f"# bench_loaders: batch {BATCH}, {WORKERS} workers/threads; medians of interleaved "
                          f"rounds of {args.seconds:g} s windows; × baseline = its median / this one's (>1 faster)"))
    if 128 in (int(x) for x in args.resolutions.split(",")):
        w = stage1_data_wait(128)
        print(f"\nstage-1 training at R=128, batch {BATCH}, loader auto (torch): data_wait = {100 * w['data_wait']:.2f}% "
              f"of step time ({w['img_per_s']:.1f} img/s, {w['intervals']} log intervals)")


if __name__ == "__main__":
    main()
