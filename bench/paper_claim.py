"""The paper's claim, tested fairly: does the autoencoder bridge beat a GAN on pixels? (issues 6, 13)

Four variants, each a config of the one trainer (its ``stages``; ``direct`` is the stage record
stages.DIRECT), so all share its seeding, EMA, loader and checkpoint format:

    aegan        the three stages: ae -> embed -> finetune
    direct       the same generator (G_E -> F -> phi, same widths, same parameter count) trained from
                 scratch against D_R, noise straight to pixels: no autoencoder, no D_E, no L1 ties
    no_denoiser  AEGAN with phi an identity: samples are F(G_E(z)); stages ae -> embed -> finetune
    no_finetune  AEGAN stopped after stage 2

The protocol (bench/RESULTS.md has it in words):
- one learning-rate policy per net role: generator nets (G_E, phi, and F wherever it is a generator
  layer, i.e. in ``direct``) and discriminators at the GAN rate; the autoencoder rate only for H and F
  trained as an autoencoder (stages.Stage.lr_role); every variant uses the demo preset's rates;
- one wall-clock budget per run, enforced and measured by the trainer itself (``--minutes`` per
  stage: a variant splits the budget over its stages by fixed shares, SHARES); each run's actual
  minutes per stage come from its own metrics.jsonl and are reported;
- at least 3 seeds, run interleaved (variant order rotates with the seed, so a slow spell of a
  shared machine does not land on one variant); mean and a 95% Student-t confidence interval;
- scoring on real images held out from training (the split made when the data set was prepared:
  aegan_fast.data), 1,000 samples of the EMA chain from a fixed seed, SWD / fid_efflite / MS-SSIM;
- R=64 and R=128 (``--resolution``), the same protocol.

    .venv/bin/python -m bench.paper_claim --resolution 64 --budget-min 3 --out runs/claim64
    .venv/bin/python -m bench.paper_claim --resolution 128 --budget-min 4 --n 500 --out runs/claim128
    .venv/bin/python -m bench.paper_claim --resolution 64 --budget-min 0.1 --seeds 0 --n 64 --out /tmp/pc  # smoke

Writes OUT/<variant>-s<seed>/ (run directory + result.json), OUT/results.json, OUT/table.md (the
tables and the claims that hold) and OUT/grids.png (held-out real images and every variant on the
same z, a row per seed). A finished run is not trained again, so an interrupted experiment continues.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from aegan_fast.training.run_state import load_sampling_nets
from aegan_fast.config import TrainConfig, preset
from aegan_fast.data import load_dataset
from aegan_fast.evaluation import evaluate_run
from aegan_fast.metrics import evaluate
from aegan_fast.models import SAMPLING_CHAIN, SamplingChain, build_nets
from aegan_fast.training import train
from aegan_fast.viz import make_grid

VARIANTS = ("aegan", "direct", "no_denoiser", "no_finetune")
# Each variant's stages and their share of the budget: AEGAN's are the demo preset's proportions;
# no_finetune hands stage 3's share to stages 1 and 2 in the same ratio.
SHARES = {
    "aegan": {"ae": 0.3, "embed": 0.5, "finetune": 0.2},
    "direct": {"direct": 1.0},
    "no_denoiser": {"ae": 0.3, "embed": 0.5, "finetune": 0.2},
    "no_finetune": {"ae": 0.375, "embed": 0.625},
}
METRICS = ("swd", "fid_efflite", "msssim")
LOWER_IS_BETTER = {"swd": True, "fid_efflite": True}  # msssim: closer to the real set's is better
EVAL_SEED = 12345  # z and metric randomness of the evaluation: the same for every run
KIMG_CAP = 100_000.0  # stages end on their minutes; kimg only as a backstop


def variant_config(variant: str, seed: int, resolution: int, budget_min: float) -> TrainConfig:
    cfg = preset("demo")  # its nets, batch, rates and EMA; the paper's design for the rest:
    cfg.model.upsample = "transposed"
    cfg.ae_lr_final = 1.0
    cfg.seed = seed
    cfg.model.resolution = resolution
    cfg.stages = tuple(SHARES[variant])
    cfg.model.denoiser = variant != "no_denoiser"
    cfg.kimg = {stage: KIMG_CAP for stage in cfg.stages}
    cfg.minutes = {stage: share * budget_min for stage, share in SHARES[variant].items()}
    cfg.loader = "torch"
    # No mid-run grids, periodic checkpoints or stage-end metrics: the budget is training time.
    cfg.sample_every_kimg = cfg.ckpt_every_kimg = 0.0
    cfg.eval_metrics = ()
    return cfg


def generator_parameters(cfg: TrainConfig) -> int:
    nets = build_nets(cfg.model)
    return sum(p.numel() for name in SAMPLING_CHAIN for p in nets[name].parameters())


# --------------------------------------------------------------------------- training

def stage_minutes(run_dir: Path) -> dict:
    """{stage: {"kimg", "minutes"}} as the trainer recorded them at each stage's end."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["stage"]: r["stage_end"] for r in rows if "stage_end" in r}


def run_one(variant: str, seed: int, args, out: Path, data, device) -> dict:
    run_dir = out / f"{variant}-s{seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        print(f"{run_dir.name}: done before, kept", flush=True)
        return json.loads(result_path.read_text())
    if run_dir.exists():  # an interrupted run: start it again from nothing, the budget is per run
        for p in sorted(run_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = variant_config(variant, seed, args.resolution, args.budget_min)
    print(f"\n=== {run_dir.name}: {args.budget_min:g} min, {cfg.minutes}", flush=True)
    started = time.perf_counter()
    train(cfg, run_dir, progress=False, data=data)
    wall_s = time.perf_counter() - started
    stages = stage_minutes(run_dir)
    _, nets = load_sampling_nets(run_dir, device)  # EMA weights, eval mode; the last stage's chain
    started = time.perf_counter()
    metrics = evaluate_run(nets, data.reference(), METRICS, args.n, EVAL_SEED, device)
    result = {"variant": variant, "seed": seed, "resolution": args.resolution, "budget_min": args.budget_min,
              "stages": stages, "train_min": round(sum(s["minutes"] for s in stages.values()), 3),
              "wall_min": round(wall_s / 60, 2), "eval_s": round(time.perf_counter() - started, 1),
              "n_eval": min(args.n, len(data.reference())), "metrics": metrics}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{run_dir.name}: trained {result['train_min']:.2f} min of steps ({wall_s / 60:.1f} min wall); " +
          ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in METRICS), flush=True)
    return result


# --------------------------------------------------------------------------- report

# Two-sided 95% Student-t quantiles by degrees of freedom (no scipy needed for a table of ten).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval); half-width nan with one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    t = T975.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:.3g}" if math.isnan(half) else f"{mean:.3g} ± {half:.2g}"


def score(metric: str, value: float, msssim_real: float) -> float:
    """Lower is better: SWD and fid as they are, MS-SSIM as its distance from the real set's."""
    return abs(value - msssim_real) if metric == "msssim" else value


# The comparisons the text may claim: (variant, against, the question it answers). The last asks the
# bridge question again without φ, since at demo scale φ decides more than the bridge does.
COMPARISONS = (("aegan", "direct", "the autoencoder bridge vs a GAN on pixels"),
               ("aegan", "no_denoiser", "the denoiser φ"),
               ("aegan", "no_finetune", "stage 3 (fine-tuning)"),
               ("no_denoiser", "direct", "the bridge without φ vs a GAN on pixels"))


def claims(results: list[dict], msssim_real: float) -> list[str]:
    """Each comparison, per metric: a claim only where the two 95% intervals separate."""
    lines = []
    by = {v: [r for r in results if r["variant"] == v] for v in VARIANTS}
    for first, other, question in COMPARISONS:
        if not by[first] or not by[other]:
            continue
        parts = []
        for m in METRICS:
            a_mean, a_half = interval([score(m, r["metrics"][m], msssim_real) for r in by[first]])
            o_mean, o_half = interval([score(m, r["metrics"][m], msssim_real) for r in by[other]])
            name = "MS-SSIM distance to real" if m == "msssim" else m
            if math.isnan(a_half) or math.isnan(o_half):
                parts.append(f"{name}: one seed, no interval")
            elif a_mean + a_half < o_mean - o_half:
                parts.append(f"{name}: **{first} better** ({a_mean:.3g} vs {o_mean:.3g})")
            elif o_mean + o_half < a_mean - a_half:
                parts.append(f"{name}: **{other} better** ({o_mean:.3g} vs {a_mean:.3g})")
            else:
                parts.append(f"{name}: no difference measured")
        lines.append(f"- {first} vs {other} ({question}): " + "; ".join(parts))
    return lines


def write_table(results: list[dict], msssim_real: float, out: Path) -> str:
    budget = results[0]["budget_min"] if results else 0
    lines = [f"| variant | generator params | seeds | train min of steps (budget {budget:g}) | "
             f"SWD ×1e3 ↓ | fid_efflite ↓ | MS-SSIM (held-out real {msssim_real:.3f}) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for variant in VARIANTS:
        rows = [r for r in results if r["variant"] == variant]
        if not rows:
            continue
        cfg = variant_config(variant, 0, rows[0]["resolution"], budget)
        lines.append(f"| {variant} | {generator_parameters(cfg) / 1e6:.2f} M | {' '.join(str(r['seed']) for r in rows)} | "
                     f"{fmt([r['train_min'] for r in rows])} | " +
                     " | ".join(fmt([r["metrics"][m] for r in rows]) for m in METRICS) + " |")
    lines += ["", "Per run (minutes of training steps per stage · kimg per stage · SWD · fid_efflite · MS-SSIM):", "",
              "| run | stages: min (kimg) | SWD | fid_efflite | MS-SSIM |", "|---|---|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (VARIANTS.index(r["variant"]), r["seed"])):
        st = " / ".join(f"{k} {v['minutes']:.2f} ({v['kimg']:.1f})" for k, v in r["stages"].items())
        lines.append(f"| {r['variant']}-s{r['seed']} | {st} | " +
                     " | ".join(f"{r['metrics'][m]:.4g}" for m in METRICS) + " |")
    lines += ["", "Claims (95% intervals must separate; MS-SSIM judged by its distance to the real set's):", ""]
    lines += claims(results, msssim_real)
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def write_grids(out: Path, data, device, seeds, n: int = 36) -> Path:
    """One PNG: held-out real images, then each variant's EMA chain on the same n latent vectors,
    side by side; one row per seed (the seeds disagree enough that one row would mislead)."""
    def tile(images):
        return Image.fromarray(make_grid(images).permute(1, 2, 0).numpy())

    columns = ["held-out real"] + [v for v in VARIANTS if (out / f"{v}-s{seeds[0]}" / "result.json").exists()]
    real = tile(data.reference().spread(n, "cpu"))
    w, h = real.size
    font = ImageFont.load_default(size=22)
    gap, label_h = 16, 36
    sheet = Image.new("RGB", (len(columns) * (w + gap) + gap + 40, len(seeds) * (h + gap) + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    for col, name in enumerate(columns):
        left = 40 + gap + col * (w + gap)
        draw.text((left, 6), name, fill="black", font=font)
        for row, seed in enumerate(seeds):
            top = label_h + row * (h + gap)
            if col == 0:
                draw.text((6, top + h // 2), f"s{seed}", fill="black", font=font)
                sheet.paste(real, (left, top))
                continue
            run_dir = out / f"{name}-s{seed}"
            if (run_dir / "result.json").exists():
                cfg, nets = load_sampling_nets(run_dir, device)
                sheet.paste(tile(SamplingChain.of(nets).sample(n, EVAL_SEED)), (left, top))
    path = out / "grids.png"
    sheet.save(path, optimize=True)
    return path


def real_diversity(data, n: int) -> float:
    """MS-SSIM diversity of the held-out real images the runs are compared with: the fakes' target."""
    real = data.reference()
    real = real.spread(min(n, len(real)), "cpu")
    return evaluate(real, real, ["msssim_real"], seed=EVAL_SEED)["msssim_real"]


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=64, choices=(64, 128))
    p.add_argument("--budget-min", type=float, default=3.0,
                   help="minutes of training steps per run, as the trainer counts them (--minutes per stage)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--n", type=int, default=1000, help="samples and held-out real images for the metrics")
    p.add_argument("--out", default=None, help="default runs/paper_claim_r<resolution>")
    args = p.parse_args(argv)
    out = Path(args.out or f"runs/paper_claim_r{args.resolution}")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    data = load_dataset(None, args.resolution)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"data: {data.describe()}; device {device}; torch {torch.__version__}; {torch.get_num_threads()} "
          f"threads on {cpus} CPUs; {platform.processor() or platform.machine()}", flush=True)

    # A continued experiment keeps its budget, so its runs stay comparable.
    plan_path = out / "plan.json"
    plan = {"budget_min": args.budget_min, "resolution": args.resolution}
    if plan_path.exists():
        saved = json.loads(plan_path.read_text())
        if saved != plan:
            raise SystemExit(f"{out} holds an experiment with {saved}; continue it with the same --budget-min and "
                             f"--resolution, or pass another --out")
    plan_path.write_text(json.dumps(plan, indent=2) + "\n")

    for seed in args.seeds:  # the variant order rotates with the seed: drift of a shared machine spreads out
        k = seed % len(args.variants)
        for variant in args.variants[k:] + args.variants[:k]:
            run_one(variant, seed, args, out, data, device)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]  # this call's and earlier ones
    real = real_diversity(data, args.n)
    (out / "results.json").write_text(json.dumps({"plan": plan, "msssim_real": real, "runs": results}, indent=2) + "\n")
    print("\n" + write_table(results, real, out))
    print(f"grids: {write_grids(out, data, device, args.seeds)}")


if __name__ == "__main__":
    main()
