"""Does the INT8 sampler keep its quality? ``python -m bench.bench_int8 --ckpt RUN [--n 1000]``.

For a trained run: the fp32 torch sampler, the OpenVINO bf16 sampler and the INT8 IR (``export
--format openvino --int8``, written beside the checkpoint's other exports) each draw the same seeded
z; each set is scored against the run's held-out images (SWD, kid_efflite), and every image of the
bf16 and INT8 sets against the fp32 one (PSNR). One table; speed is ``bench.bench_sampling``'s job.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from aegan_fast.checkpoint import resolve_checkpoint
from aegan_fast.data import load_dataset
from aegan_fast.evaluation import scoring_reference
from aegan_fast.export.openvino_export import export_openvino
from aegan_fast.metrics import evaluate, psnr
from aegan_fast.sampling import Sampler
from aegan_fast.training.run_state import load_sampling_nets


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a trained run directory or checkpoint")
    p.add_argument("--n", type=int, default=1000, help="samples per sampler (and held-out images)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ckpt = resolve_checkpoint(args.ckpt)
    cfg, _ = load_sampling_nets(ckpt)
    data = load_dataset(cfg.data, cfg.model.resolution)
    reference, what = scoring_reference(data, True)
    n = min(args.n, len(reference))
    real = reference.spread(n, "cpu")
    xml = ckpt.parent / "openvino" / "sampler-ema-int8.xml"
    t0 = time.perf_counter()
    rep = export_openvino(ckpt, xml, int8=True, min_psnr_db=0.0)
    print(f"INT8 export in {time.perf_counter() - t0:.0f} s: {rep['int8']['psnr_mean']:.1f} dB mean PSNR against "
          f"fp32 at export ({rep['int8']['n']} images)")
    samplers = {"torch fp32": Sampler.load(ckpt, backend="torch"),
                "openvino bf16": Sampler.load(ckpt, backend="openvino", precision="bf16"),
                "openvino int8": Sampler.load(xml)}
    images = {name: s.sample(n, args.seed, batch=50, progress=True) for name, s in samplers.items()}
    print(f"\n{n} samples each, scored against {n} {what}\n")
    print("| sampler | SWD | kid_efflite | PSNR vs fp32 (mean) | PSNR vs fp32 (worst 1%) |")
    print("|---|---:|---:|---:|---:|")
    for name, fake in images.items():
        scores = evaluate(real, fake, ("swd", "kid_efflite"), seed=args.seed, kid_subset_size=min(1000, n))
        db = psnr(fake, images["torch fp32"], reduction="none") if name != "torch fp32" else None
        worst = f"{db.sort().values[max(0, len(db) // 100 - 1)].item():.1f}" if db is not None else "—"
        mean = f"{db[torch.isfinite(db)].mean().item():.1f}" if db is not None else "—"
        print(f"| {name} | {scores['swd']:.2f} | {scores['kid_efflite']:.4f} | {mean} | {worst} |")
    print(f"\nINT8 IR: {Path(xml)}")


if __name__ == "__main__":
    main()
