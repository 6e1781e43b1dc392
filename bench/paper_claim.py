"""The paper's claim at small scale: does the autoencoder bridge beat a GAN on pixels? (issue 6)

Four variants at R=64 on the built-in emoji set, the demo preset's nets and learning rates, each
trained for the same wall-clock budget, with two seeds each:

    aegan        the three stages: ae -> embed -> finetune
    direct       the same generator (G_E -> F -> phi, same widths, same parameter count) trained from
                 scratch against D_R, noise straight to pixels: no autoencoder, no D_E, no L1 ties
    no_denoiser  AEGAN with phi an identity: samples are F(G_E(z)); stages ae -> embed -> finetune
    no_finetune  AEGAN stopped after stage 2
    aegan_unet   (extra, not in the default set) AEGAN with U-Net skips in phi (--denoiser-skips)

Every variant is a config of the one trainer (its ``stages`` and ``kimg``; ``direct`` is the stage
record stages.DIRECT), so all of them share its seeding, EMA and checkpoint format. Equal budget: each
variant splits the budget over its stages by fixed time shares (SHARES). Before the runs, a
calibration times a few steps of every stage in this process (stages.run_stage, as the trainer runs
it) and turns the shares into kimg, so each run is a deterministic kimg-based training run whose
measured wall time is reported beside the budget. Every run is then scored on the same footing: its EMA sampling chain, n images
(fixed evaluation seed) against n real images spread through the set, by SWD, fid_efflite and
MS-SSIM diversity.

    .venv/bin/python bench/paper_claim.py                      # 8 min x 4 variants x 2 seeds
    .venv/bin/python bench/paper_claim.py --budget-min 0.2 --seeds 0 --out /tmp/pc   # a smoke run

Writes OUT/<variant>-s<seed>/ (run directory + result.json), OUT/results.json, OUT/table.md and
OUT/grids.png (real images and every variant on the same z, side by side, a row per seed). A
finished run is not trained again, so an interrupted experiment continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from aegan_fast.checkpoint import load_sampling_nets
from aegan_fast.config import TrainConfig, preset
from aegan_fast.data import load_dataset, make_loader
from aegan_fast.evaluation import evaluate_run
from aegan_fast.metrics import evaluate
from aegan_fast.models import SAMPLING_CHAIN, SamplingChain, build_nets
from aegan_fast.stages import STAGES, TrainState, make_optimizers, run_stage
from aegan_fast.train import train
from aegan_fast.viz import make_grid

VARIANTS = ("aegan", "direct", "no_denoiser", "no_finetune")
EXTRA_VARIANTS = ("aegan_unet",)
# The stages each variant trains and their share of the budget. AEGAN's shares are the demo preset's (about 10 / 8 / 2 kimg in
# 8 minutes); no_finetune hands stage 3's share to stages 1 and 2 in the same ratio.
SHARES = {
    "aegan": {"ae": 0.3, "embed": 0.5, "finetune": 0.2},
    "direct": {"direct": 1.0},
    "no_denoiser": {"ae": 0.3, "embed": 0.5, "finetune": 0.2},
    "no_finetune": {"ae": 0.375, "embed": 0.625},
    "aegan_unet": {"ae": 0.3, "embed": 0.5, "finetune": 0.2},
}
METRICS = ("swd", "fid_efflite", "msssim")
EVAL_SEED = 12345  # z and metric randomness of the evaluation: the same for every run


def variant_config(variant: str, seed: int) -> TrainConfig:
    cfg = preset("demo")
    cfg.seed = seed
    cfg.stages = tuple(SHARES[variant])
    cfg.model.denoiser = variant != "no_denoiser"
    cfg.model.denoiser_skips = variant == "aegan_unet"
    cfg.loader = "torch"
    # No mid-run grids, periodic checkpoints or stage-end metrics: the budget is training time.
    cfg.sample_every_kimg = cfg.ckpt_every_kimg = 0.0
    cfg.eval_metrics = ()
    return cfg


def generator_parameters(cfg: TrainConfig) -> int:
    nets = build_nets(cfg.model)
    return sum(p.numel() for name in SAMPLING_CHAIN for p in nets[name].parameters())


# --------------------------------------------------------------------------- calibration

def seconds_per_image(cfg: TrainConfig, stage: str, data, device, warmup: int = 2, steps: int = 6) -> float:
    """Median seconds per real image of one stage's training step (with the EMA update the run does),
    from fresh nets: step time does not depend on what the weights are."""
    torch.manual_seed(0)
    device = torch.device(device)
    nets = build_nets(cfg.model).to(device)
    st = TrainState(cfg, nets, make_optimizers(nets, cfg), data, torch.Generator().manual_seed(0), device)
    loader = make_loader("torch", data, cfg.batch, 0, device, workers=cfg.loader_workers)
    marks = [time.perf_counter()]

    def after_step(losses, before, data_s) -> bool:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        return len(marks) > warmup + steps

    try:
        run_stage(STAGES[stage], st, loader, until_img=2 ** 62, after_step=after_step)
    finally:
        loader.close()
    times = [b - a for a, b in zip(marks, marks[1:])]
    return statistics.median(times[warmup:]) / cfg.batch


def plan_kimg(variants, budget_s: float, data, device) -> dict:
    """{variant: {stage: kimg}} filling each variant's budget by its shares."""
    per_image: dict = {}
    plan = {}
    for variant in variants:
        cfg = variant_config(variant, 0)
        plan[variant] = {}
        for stage, share in SHARES[variant].items():
            key = (stage, cfg.model.denoiser, cfg.model.denoiser_skips)  # what changes a step's cost
            if key not in per_image:
                per_image[key] = seconds_per_image(cfg, stage, data, device)
                print(f"calibration: {stage:<8} denoiser={cfg.model.denoiser!s:<5} skips={cfg.model.denoiser_skips!s:<5} "
                      f"{1 / per_image[key]:6.1f} img/s", flush=True)
            plan[variant][stage] = round(share * budget_s / per_image[key] / 1000, 2)
    return plan


# --------------------------------------------------------------------------- training

def run_one(variant: str, seed: int, kimg: dict, out: Path, data, device, n_eval: int) -> dict:
    run_dir = out / f"{variant}-s{seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        print(f"{run_dir.name}: done before, kept", flush=True)
        return json.loads(result_path.read_text())
    if run_dir.exists():  # an interrupted run: start it again from nothing, the budget is per run
        for p in sorted(run_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = variant_config(variant, seed)
    print(f"\n=== {run_dir.name}: {kimg} kimg", flush=True)
    started = time.perf_counter()
    cfg.kimg = dict(kimg)
    train(cfg, run_dir, progress=False, data=data)
    train_s = time.perf_counter() - started

    _, nets = load_sampling_nets(run_dir, device)  # EMA weights, eval mode
    started = time.perf_counter()
    metrics = evaluate_run(nets, data, METRICS, n_eval, EVAL_SEED, device)
    result = {"variant": variant, "seed": seed, "kimg": kimg, "train_min": round(train_s / 60, 2),
              "eval_s": round(time.perf_counter() - started, 1), "n_eval": min(n_eval, len(data)),
              "metrics": metrics}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{run_dir.name}: trained {train_s / 60:.1f} min; " +
          ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in METRICS), flush=True)
    return result


def score_before_denoiser(run_dir: Path, data, device, n_eval: int) -> None:
    """For a run with a denoiser: the same evaluation of F(G_E(z)), phi skipped, kept in result.json
    as ``metrics_before_phi``; it tells whether phi itself helps the samples it was trained on."""
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text())
    if "metrics_before_phi" in result:
        return
    cfg, nets = load_sampling_nets(run_dir, device)
    chain = dict(nets.items()) | {"phi": torch.nn.Identity()}
    result["metrics_before_phi"] = evaluate_run(chain, data, METRICS, n_eval, EVAL_SEED, device)
    result_path.write_text(json.dumps(result, indent=2) + "\n")


# --------------------------------------------------------------------------- report

def mean_spread(values: list[float]) -> str:
    """mean ± half the range over the seeds (with two seeds: ± half their difference)."""
    mean = statistics.fmean(values)
    return f"{mean:.3g} ± {(max(values) - min(values)) / 2:.2g}" if len(values) > 1 else f"{mean:.3g}"


def write_table(results: list[dict], msssim_real: float, budget_min: float, out: Path) -> str:
    lines = [f"| variant | generator params | kimg per stage | train min (budget {budget_min:g}) | "
             "SWD ×1e3 ↓ | fid_efflite ↓ | MS-SSIM (real {:.3f}) |".format(msssim_real),
             "|---|---:|---|---:|---:|---:|---:|"]
    for variant in VARIANTS + EXTRA_VARIANTS:
        rows = [r for r in results if r["variant"] == variant]
        if not rows:
            continue
        params = generator_parameters(variant_config(variant, 0)) / 1e6
        kimg = " / ".join(f"{s} {k:g}" for s, k in rows[0]["kimg"].items())
        seeds = " ".join(str(r["seed"]) for r in rows)
        lines.append(f"| {variant} (seeds {seeds}) | {params:.2f} M | {kimg} | "
                     f"{mean_spread([r['train_min'] for r in rows])} | " +
                     " | ".join(mean_spread([r["metrics"][m] for r in rows]) for m in METRICS) + " |")
        before = [r for r in rows if "metrics_before_phi" in r]
        if before:
            lines.append(f"| {variant}, phi skipped: F(G_E(z)) of the same runs | | | | " +
                         " | ".join(mean_spread([r["metrics_before_phi"][m] for r in before]) for m in METRICS) + " |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def write_grids(out: Path, data, device, seeds, n: int = 36) -> Path:
    """One PNG: real images, then each variant's EMA chain on the same n latent vectors, side by
    side; one row per seed (the seeds disagree enough that one row would mislead)."""
    def tile(images):
        return Image.fromarray(make_grid(images).permute(1, 2, 0).numpy())

    columns = ["real"] + [v for v in VARIANTS + EXTRA_VARIANTS if (out / f"{v}-s{seeds[0]}" / "result.json").exists()]
    real = tile(data.spread(n, "cpu"))
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
    """MS-SSIM diversity of the real images the runs are compared with: the target for the fakes'."""
    real = data.spread(min(n, len(data)), "cpu")
    return evaluate(real, real, ["msssim_real"], seed=EVAL_SEED)["msssim_real"]


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-min", type=float, default=8.0, help="training wall-clock budget per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    p.add_argument("--n", type=int, default=1000, help="images per set for the metrics")
    p.add_argument("--out", default="runs/paper_claim")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    data = load_dataset(None, 64)
    print(f"data: {len(data)} images; device {device}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; {platform.processor() or platform.machine()}", flush=True)

    # A continued experiment keeps its budget and the kimg it planned, so its runs stay comparable;
    # a variant it has not planned yet is calibrated now.
    plan_path = out / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {"budget_min": args.budget_min, "kimg": {}}
    if plan["budget_min"] != args.budget_min:
        print(f"{plan_path} planned a {plan['budget_min']:g}-min budget: continuing with it", flush=True)
    missing = [v for v in args.variants if v not in plan["kimg"]]
    if missing:
        plan["kimg"].update(plan_kimg(missing, plan["budget_min"] * 60, data, device))
        plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    print("kimg per stage:", json.dumps(plan["kimg"]), flush=True)

    for seed in args.seeds:
        for variant in args.variants:
            run_one(variant, seed, plan["kimg"][variant], out, data, device, args.n)
    for seed in args.seeds:
        for variant in args.variants:
            if variant in ("aegan", "aegan_unet"):
                score_before_denoiser(out / f"{variant}-s{seed}", data, device, args.n)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]  # this call's and earlier ones
    real = real_diversity(data, args.n)
    (out / "results.json").write_text(json.dumps({"plan": plan, "msssim_real": real, "runs": results}, indent=2) + "\n")
    print("\n" + write_table(results, real, plan["budget_min"], out))
    print(f"grids: {write_grids(out, data, device, args.seeds)}")


if __name__ == "__main__":
    main()
