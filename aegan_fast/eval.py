"""Evaluate a trained run: ``python -m aegan_fast.eval --ckpt RUN_DIR [--data DIR] [--metrics ...]``.

Generated images (the sampling chain, EMA weights when kept) are compared with real images the run
never trained on: the held-out split of its data set (``--data DIR``: that set's held-out split when
it has one, else all of it); ``psnr``/``l1`` measure the autoencoder on those real images. Writes JSON
(``--out``, default RUN_DIR/eval-<checkpoint>.json) and prints a table. PSNR of a perfect
reconstruction is infinite: JSON has no infinity, so it is written as the string "inf".
Unless ``--no-sheet``, it also writes a picture next to the JSON (default
RUN_DIR/eval-<checkpoint>-sheet.png): real images | samples | each sample's nearest image of the
training split, with the nearest distances' median against real images' own (aegan_fast/sheet.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path


from .checkpoint import resolve_checkpoint
from .training.run_state import load_sampling_nets
from .data import load_dataset
from .device import pick_device
from .errors import UserError, cli
from .evaluation import evaluate_run, scoring_reference
from .metrics import parse_metrics
from .models import check_truncation
from .sheet import write_sheet

BETTER = {"swd": "lower", "fid_efflite": "lower", "kid_efflite": "lower", "fid_inception": "lower",
          "kid_inception": "lower", "l1": "lower", "psnr": "higher", "msssim": "close to msssim_real"}


def _json_safe(value: float):
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")


def format_table(results: dict[str, float]) -> str:
    width = max(len(k) for k in results)
    lines = [f"{'metric':<{width}}  {'value':>12}  better"]
    for k, v in results.items():
        base = k.rsplit("_std", 1)[0] if k.endswith("_std") else k
        better = BETTER.get(base, BETTER.get(base.split("_")[0], ""))
        lines.append(f"{k:<{width}}  {v:>12.4f}  {better if not k.endswith('_std') else ''}")
    return "\n".join(lines)


@cli
def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="aegan-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run directory (its latest checkpoint) or a checkpoint file")
    p.add_argument("--data", help="real images to compare with (default: the run's own data set)")
    p.add_argument("--metrics", default="swd,msssim,fid_efflite,kid_efflite,psnr",
                   help="comma-separated: swd, msssim, msssim_real, fid_efflite, kid_efflite, "
                        "fid_inception, kid_inception, l1, psnr")
    p.add_argument("--n", type=int, default=1000, help="images per set (real and generated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI",
                   help="score samples drawn with z pulled toward its mean by PSI in [0, 1] (default 1: none)")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05 weights file, for fid/kid_inception")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file (default: RUN_DIR/eval-<checkpoint>.json)")
    p.add_argument("--sheet", action=argparse.BooleanOptionalAction, default=True,
                   help="write <out>-sheet.png: real | samples | nearest training image (default: on)")
    p.add_argument("--sheet-n", type=int, default=16, help="images per block of the sheet")
    args = p.parse_args(argv)
    if args.n < 2:
        raise UserError("--n must be ≥ 2")
    if args.sheet and args.sheet_n < 1:
        raise UserError(f"--sheet-n must be ≥ 1, got {args.sheet_n}")
    metrics = parse_metrics(args.metrics)
    check_truncation(args.truncation)
    ckpt = resolve_checkpoint(args.ckpt)
    device = pick_device(args.device)
    cfg, nets = load_sampling_nets(ckpt, device)
    own = not args.data or args.data == cfg.data
    # The run's data is needed for the sheet's nearest neighbours: what the run trained on, whatever --data is.
    run_data = load_dataset(cfg.data, cfg.model.resolution) if own or args.sheet else None
    data = run_data if own else load_dataset(args.data, cfg.model.resolution)
    if not own and run_data is not None and data.root is not None and run_data.root is not None:
        own = Path(data.root).resolve() == Path(run_data.root).resolve()  # the run's set, spelled another way
    reference, what = scoring_reference(data, own)
    n = min(args.n, len(reference))
    print(f"scoring against {n} {what}", flush=True)
    started = time.time()
    results = evaluate_run(nets, reference, metrics, args.n, args.seed, device, args.inception_weights,
                           truncation=args.truncation)
    seconds = round(time.time() - started, 1)
    out = Path(args.out) if args.out else ckpt.parent.parent / f"eval-{ckpt.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(ckpt), "data": data.origin, "reference": f"{n} {what}", "n": n, "seed": args.seed,
              "truncation": args.truncation,
              "seconds": seconds, "metrics": {k: _json_safe(v) for k, v in results.items()}}
    sheet = None
    if args.sheet:
        sheet = write_sheet(nets, reference, run_data.split("train"), args.sheet_n, args.seed,
                            out.with_name(f"{out.stem}-sheet.png"), device)
        record["sheet"] = sheet.as_json()
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(format_table(results))
    if sheet is not None:
        print(f"\n{sheet.summary()}\nwrote {sheet.path}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
