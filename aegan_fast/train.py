"""Train AEGAN: ``python -m aegan_fast.train`` (or ``aegan-train``).

Three stages run in order, each for its length in kimg (thousands of real images):
    ae        autoencoder H/F                  (reconstruction L1)
    embed     G_E vs D_E on embeddings, φ vs D_R on images (H/F frozen)
    finetune  the whole sampling chain end to end (see stages.py)

Everything lands in one run directory: config.json, checkpoints/ (atomic, with a `latest` pointer),
samples/ (grids from a fixed z), metrics.jsonl, losses.png, and TensorBoard events when tensorboard
is installed. ``--resume RUN_DIR`` continues from the latest checkpoint, in the middle of a stage too;
Ctrl-C saves a checkpoint first.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import ops
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LOSSES, STAGES, TrainConfig, preset
from .data import LOADERS, ImageSet, load_dataset, make_loader
from .device import pick_device
from .errors import UserError, cli
from .evaluation import evaluate_run
from .models import SamplingChain, build_nets, check_resolution, sample_z
from .stages import EMA, STEPS, Batch, RealEmbeddings, prepare_stage, start_stage
from .viz import plot_metrics, save_grid

log = logging.getLogger("aegan_fast.train")


# --------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aegan-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="demo", choices=["demo", "paper"],
                   help="demo: R=64, ~10 min on 2 CPU cores; paper: the paper's settings at R=512")
    p.add_argument("--data", help="prepared data set, or folder/zip/tar of images (prepared on the fly into "
                   "the cache); default: the built-in emoji set")
    p.add_argument("--loader", choices=LOADERS, help="batch loader (default auto: torch unless DALI is faster)")
    p.add_argument("--data-cache-mb", type=float, help="read the set into RAM up to this size, else memory-map it")
    p.add_argument("--resolution", type=int, help="output resolution R, a power of two ≥ 64")
    p.add_argument("--batch", type=int)
    for stage in STAGES:
        p.add_argument(f"--kimg-{stage}", type=float, help=f"length of stage '{stage}' in thousands of images")
    p.add_argument("--lr-ae", type=float, help="learning rate of H and F")
    p.add_argument("--lr-gan", type=float, help="learning rate of G_E, D_E, φ and D_R")
    p.add_argument("--loss", choices=LOSSES, help="adversarial loss")
    p.add_argument("--ema-kimg", type=float, help="half-life of the sampling chain's EMA in kimg (0: off)")
    p.add_argument("--denoiser-skips", action="store_true", default=None, help="U-Net skips in the denoiser")
    p.add_argument("--no-denoiser", action="store_true", help="ablation: no φ, the sampling chain ends at F")
    p.add_argument("--seed", type=int)
    p.add_argument("--ops", choices=("auto",) + ops.BACKENDS, help="fused-op backend (default: auto)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--outdir", default="runs", help="parent folder of new run directories")
    p.add_argument("--run-dir", help="exact run directory for a new run (must not hold a run yet)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    cfg = preset(args.preset)
    if args.resolution is not None:
        try:
            check_resolution(args.resolution)
        except ValueError as e:
            raise UserError(str(e)) from None
        cfg.model.resolution = args.resolution
    for stage in STAGES:
        value = getattr(args, f"kimg_{stage}")
        if value is not None:
            if value < 0:
                raise UserError(f"--kimg-{stage} must be ≥ 0")
            cfg.kimg[stage] = value
    if args.batch is not None:
        if args.batch < 2:
            raise UserError("--batch must be ≥ 2 (BatchNorm needs more than one image per batch)")
        cfg.batch = args.batch
    if args.lr_ae is not None:
        cfg.lr.update(H=args.lr_ae, F=args.lr_ae)
    if args.lr_gan is not None:
        cfg.lr.update({k: args.lr_gan for k in ("G_E", "D_E", "phi", "D_R")})
    for name in ("loss", "ema_kimg", "seed", "ops", "device", "data", "loader", "data_cache_mb"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.denoiser_skips:
        cfg.model.denoiser_skips = True
    if args.no_denoiser:
        cfg.model.denoiser = False
    return cfg


def new_run_dir(cfg: TrainConfig, outdir: str, run_dir: str | None) -> Path:
    if run_dir:
        path = Path(run_dir)
        if latest_checkpoint(path) is not None or (path / "config.json").exists():
            raise UserError(f"{path} already holds a run; continue it with --resume {path}")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(outdir) / f"{stamp}-{cfg.preset}-r{cfg.model.resolution}"
        k = 1
        while path.exists():
            path = Path(outdir) / f"{stamp}-{cfg.preset}-r{cfg.model.resolution}-{k}"
            k += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- bookkeeping

class MetricsLog:
    """Averages the step losses between log lines, writes JSONL (and TensorBoard when installed)."""

    def __init__(self, path: Path):
        self.path = path
        self.sums: dict = defaultdict(float)
        self.count = 0
        self.data_s = self.step_s = 0.0
        self.images = 0
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def add(self, losses: dict, batch: int, data_s: float, step_s: float) -> None:
        for k, v in losses.items():
            self.sums[k] += float(v)
        self.count += 1
        self.images += batch
        self.data_s += data_s
        self.step_s += step_s

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def flush(self, stage: str, counters: dict) -> dict | None:
        if not self.count:
            return None
        row = {"stage": stage, "kimg": round(counters["total_img"] / 1000, 3),
               "stage_kimg": round(counters["stage_img"] / 1000, 3), "step": counters["step"],
               "losses": {k: v / self.count for k, v in self.sums.items()},
               "img_per_s": self.images / max(self.step_s, 1e-9),
               "data_wait": self.data_s / max(self.step_s, 1e-9), "time": time.time()}
        self.write(row)
        if self.tb is not None:
            for k, v in row["losses"].items():
                self.tb.add_scalar(f"{stage}/{k}", v, counters["total_img"])
            self.tb.add_scalar("perf/img_per_s", row["img_per_s"], counters["total_img"])
            self.tb.add_scalar("perf/data_wait", row["data_wait"], counters["total_img"])
        self.sums.clear()
        self.count = self.images = 0
        self.data_s = self.step_s = 0.0
        return row


def rng_state(data_gen: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's state as plain tensors and numbers, so checkpoints load with weights_only=True
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def eval_mode(nets):
    """Nets in eval mode for a look (grids, evaluation), each restored to its own mode afterwards."""
    was_training = {k: n.training for k, n in nets.items()}
    nets.eval()
    try:
        yield
    finally:
        for k, n in nets.items():
            n.train(was_training[k])


@torch.no_grad()
def save_samples(stage: str, nets, ema: EMA | None, fixed_z, fixed_real, path: Path) -> None:
    """Stage ae: real images and their reconstructions in alternate rows. Later stages: the sampling
    chain on the fixed z (EMA weights when on)."""
    with eval_mode(nets):
        if stage == "ae":
            real = fixed_real[:32]
            rec = nets["F"](nets["H"](real))
            rows = torch.stack([real.view(4, 8, *real.shape[1:]), rec.view(4, 8, *rec.shape[1:])], 1)
            save_grid(rows.reshape(-1, *real.shape[1:]), path, nrow=8)
        else:
            save_grid(SamplingChain.of(ema.nets if ema is not None else nets)(fixed_z), path)


def stage_end_evaluation(stage: str, nets, ema: EMA | None, data: ImageSet, cfg: TrainConfig, device) -> dict:
    """Cheap metrics at the end of each stage: the autoencoder's reconstruction after ``ae``, the
    sampling chain's (``cfg.eval_metrics`` on ``cfg.eval_n`` images) after the others."""
    with eval_mode(nets):
        if stage == "ae":
            return evaluate_run(nets, data, ("l1", "psnr"), cfg.eval_n, cfg.seed, device)
        if not cfg.eval_metrics:
            return {}
        chain = dict(nets.items()) | (dict(ema.nets.items()) if ema is not None else {})
        return evaluate_run(chain, data, cfg.eval_metrics, cfg.eval_n, cfg.seed, device)


# --------------------------------------------------------------------------- the run

def make_optimizers(nets, cfg: TrainConfig) -> dict:
    """One Adam per net that has weights (φ is a weightless identity in the no-denoiser ablation)."""
    return {name: torch.optim.Adam(net.parameters(), lr=cfg.lr[name], betas=cfg.betas)
            for name, net in nets.items() if any(True for _ in net.parameters())}


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          stop_after_steps: int | None = None, data: ImageSet | None = None) -> Path:
    """Run (or continue) all stages in run_dir. ``stop_after_steps`` ends the call after that many
    steps with a checkpoint, as an interrupted job would (the run then resumes with --resume)."""
    device = pick_device(cfg.device)
    try:
        ops.set_backend(cfg.ops)
    except (ValueError, ops.BackendUnavailable) as e:
        raise UserError(str(e)) from None
    if data is None:
        data = load_dataset(cfg.data, cfg.model.resolution, cache_mb=cfg.data_cache_mb)
    if data.resolution != cfg.model.resolution:
        raise UserError(f"data is {data.resolution}² but the model is {cfg.model.resolution}²")
    log.info("data: %d images from %s (%d unreadable skipped)", len(data), data.source, data.skipped)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    nets = build_nets(cfg.model).to(device)
    opts = make_optimizers(nets, cfg)
    ema: EMA | None = None
    counters = {"stage": STAGES[0], "stage_img": 0, "total_img": 0, "step": 0}

    if resume:
        state = load_checkpoint(run_dir, map_location=device)
        nets.load_state_dict(state["nets"])
        for name, opt in opts.items():
            opt.load_state_dict(state["opts"][name])
        if state.get("ema"):
            ema = EMA(nets, cfg.ema_kimg)
            ema.load_state_dict(state["ema"])
        counters = state["counters"]
        set_rng_state(state["rng"], data_gen)
        log.info("resuming at stage %s, %.1f kimg into it", counters["stage"], counters["stage_img"] / 1000)
    else:
        cfg.save(run_dir / "config.json")

    # A resumed run gets the same batches: the torch loader's order is a function of (seed, images
    # consumed), DALI's restores from the checkpoint it saved.
    loader = make_loader(cfg.loader, data, cfg.batch, cfg.seed, device, start=counters["total_img"],
                         workers=cfg.loader_workers, state=state.get("loader") if resume else None)
    fixed_z = sample_z(cfg.grid_size, cfg.model.z_dim, torch.Generator().manual_seed(cfg.seed + 1), device)
    fixed_real = data.spread(32, device)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    (run_dir / "samples").mkdir(exist_ok=True)

    def checkpoint(name: str) -> Path:
        return save_checkpoint(run_dir, name, {
            "config": cfg.to_dict(), "nets": nets.state_dict(),
            "opts": {k: o.state_dict() for k, o in opts.items()},
            "ema": ema.state_dict() if ema is not None else None,
            "counters": dict(counters), "rng": rng_state(data_gen), "loader": loader.state_dict()})

    steps_this_call = 0
    while counters["stage"] in STAGES:
        stage = counters["stage"]
        stage_len = int(cfg.kimg[stage] * 1000)
        prepare_stage(stage, nets, opts, cfg)
        if counters["stage_img"] == 0:
            start_stage(stage, opts)
        if ema is None and cfg.ema_kimg > 0 and stage != "ae":
            ema = EMA(nets, cfg.ema_kimg)
        step_fn = STEPS[stage]
        emb = None if stage == "ae" else RealEmbeddings(
            nets["H"], data, data_gen, device, cfg.model.embed_channels * cfg.model.embed_size ** 2,
            cfg.embed_cache_mb * 2 ** 20)
        bar = tqdm(total=stage_len, initial=min(counters["stage_img"], stage_len), unit="img", unit_scale=True,
                   desc=f"stage {STAGES.index(stage) + 1}/3 {stage}", disable=not progress, dynamic_ncols=True,
                   mininterval=1.0)
        sample_every, ckpt_every = int(cfg.sample_every_kimg * 1000), int(cfg.ckpt_every_kimg * 1000)
        try:
            while counters["stage_img"] < stage_len:
                t0 = time.perf_counter()
                batch = Batch(*next(loader))
                t1 = time.perf_counter()
                losses = step_fn(nets, opts, batch, emb, cfg)
                if ema is not None and stage != "ae":
                    ema.update(nets, cfg.batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t2 = time.perf_counter()

                before = counters["stage_img"]
                counters["stage_img"] += cfg.batch
                counters["total_img"] += cfg.batch
                counters["step"] += 1
                steps_this_call += 1
                metrics.add(losses, cfg.batch, t1 - t0, t2 - t0)
                bar.update(min(cfg.batch, stage_len - before))
                if counters["step"] % cfg.log_every_steps == 0:
                    row = metrics.flush(stage, counters)
                    bar.set_postfix_str(f"{row['img_per_s']:.0f} img/s " +
                                        " ".join(f"{k}={v:.3f}" for k, v in row["losses"].items()))
                    if not progress:
                        print(json.dumps(row), flush=True)
                crossed = lambda every: every > 0 and before // every != counters["stage_img"] // every
                if crossed(sample_every) and counters["stage_img"] < stage_len:
                    save_samples(stage, nets, ema, fixed_z, fixed_real,
                                 run_dir / "samples" / f"{stage}-{counters['stage_img'] // 1000:05d}kimg.png")
                if crossed(ckpt_every) and counters["stage_img"] < stage_len:
                    checkpoint(f"ckpt-{counters['total_img']:09d}.pt")
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    bar.close()
                    checkpoint(f"ckpt-{counters['total_img']:09d}.pt")
                    loader.close()
                    return run_dir
        except KeyboardInterrupt:
            bar.close()
            path = checkpoint(f"ckpt-{counters['total_img']:09d}.pt")
            print(f"\ninterrupted: saved {path}\ncontinue with: python -m aegan_fast.train --resume {run_dir}",
                  file=sys.stderr)
            raise
        bar.close()
        metrics.flush(stage, counters)
        report = stage_end_evaluation(stage, nets, ema, data, cfg, device)
        if report:
            metrics.write({"stage": stage, "kimg": counters["total_img"] / 1000, "eval": report})
            log.info("end of stage %s: %s", stage, ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
        save_samples(stage, nets, ema, fixed_z, fixed_real, run_dir / "samples" / f"{stage}-final.png")
        counters.update(stage=STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else "done", stage_img=0)
        checkpoint(f"stage-{stage}.pt")

    loader.close()
    plot_metrics(run_dir / "metrics.jsonl", run_dir / "losses.png")
    return run_dir


@cli
def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.resume:
        run_dir = Path(args.resume)
        if latest_checkpoint(run_dir) is None:
            raise UserError(f"--resume {run_dir}: no checkpoint there to continue from")
        cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        for name in ("ops", "device", "loader"):  # where a run continues may differ; what it trains may not
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
    else:
        cfg = build_config(args)
        data = load_dataset(cfg.data, cfg.model.resolution, cache_mb=cfg.data_cache_mb)  # fails before a run dir exists
        run_dir = new_run_dir(cfg, args.outdir, args.run_dir)
    started = time.time()
    print(f"run directory: {run_dir}", flush=True)
    train(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress,
          data=None if args.resume else data)
    minutes = (time.time() - started) / 60
    print(f"\ndone in {minutes:.1f} min\n"
          f"  samples     {run_dir / 'samples' / 'finetune-final.png'}\n"
          f"  loss plot   {run_dir / 'losses.png'}\n"
          f"  checkpoint  {latest_checkpoint(run_dir)}\n"
          f"  sample more python -m aegan_fast.sample --ckpt {run_dir} --n 64 --out grid.png")


if __name__ == "__main__":
    main()
