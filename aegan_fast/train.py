"""Train AEGAN: ``python -m aegan_fast.train`` (or ``aegan-train``).

The config's stages run in order, each for its length in kimg (thousands of real images); AEGAN's:
    ae        autoencoder H/F                  (reconstruction L1)
    embed     G_E vs D_E on embeddings, φ vs D_R on images (H/F frozen)
    finetune  the whole sampling chain end to end (see stages.py)
(``--stages direct`` trains the baseline GAN on pixels instead, in the same loop.)

Everything lands in one run directory: config.json, checkpoints/ (atomic, with a `latest` pointer,
and a `sampling` one naming the stage-end checkpoint with the best SWD: a stage that made samples
worse is warned about and not sampled from), samples/ (grids from a fixed z), metrics.jsonl,
losses.png, and TensorBoard events when tensorboard is installed. ``--resume RUN_DIR`` continues
from the latest checkpoint, in the middle of a stage too, with the checkpoint's config (only
``--ops``, ``--device``, ``--loader``, ``--loader-workers`` and ``--data-cache-mb`` may change);
Ctrl-C saves a checkpoint first. ``--dry-run`` prints the resolved config and exits.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import compiling, ops
from . import precision as precisions
from . import distributed
from .checkpoint import (LATEST, SAMPLING, NonFiniteCheckpoint, config_mismatch, latest_checkpoint, load_for_resume,
                         load_state_strict, resolve_checkpoint, save_checkpoint, write_sampling_pointer)
from .config import (LOSSES, RESUMABLE, STAGES, TrainConfig, add_config_arguments, apply_overrides,
                     config_overrides, dict_fields, preset)
from .data import LOADERS, ImageSet, load_dataset, make_loader
from .device import pick_device
from .distributed import SINGLE, World
from .errors import Interrupted, UserError, cli
from .evaluation import evaluate_run
from .guard import UpdateGuard
from .models import SamplingChain, build_nets, check_resolution, check_upsample, sample_z
from .stages import STAGES as STAGE_RECORDS
from .stages import EMA, Stage, TrainState, make_optimizers, run_stage
from .viz import plot_metrics, save_grid

log = logging.getLogger("aegan_fast.train")

# --------------------------------------------------------------------------- command line

# The flags README documents, kept as aliases of the generated ones: (flag, dotted field, how the
# value lands there, argparse keywords).
ALIASES = [
    ("--resolution", "model.resolution", None, dict(type=int, help="alias of --model.resolution")),
    *[(f"--kimg-{s}", "kimg", lambda v, s=s: [(s, v)], dict(type=float, help=f"alias of --kimg {s}=KIMG"))
      for s in STAGES],
    ("--lr-ae", "lr", lambda v: [("H", v), ("F", v)], dict(type=float, help="--lr H=LR F=LR")),
    ("--lr-gan", "lr", lambda v: [(k, v) for k in ("G_E", "D_E", "phi", "D_R")],
     dict(type=float, help="--lr G_E=LR D_E=LR phi=LR D_R=LR")),
    ("--no-denoiser", "model.denoiser", None, dict(action="store_const", const=False,
                                                  help="alias of --no-model.denoiser")),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aegan-train", description=__doc__.split("\n\n")[0])
    run = p.add_argument_group("run")
    run.add_argument("--preset", default="demo", choices=["demo", "paper"],
                     help="the defaults every other flag overrides: demo (R=64, ~10 min on 2 CPU cores) "
                          "or paper (the paper's settings at R=512); default demo")
    run.add_argument("--outdir", default="runs", help="parent folder of new run directories (default runs)")
    run.add_argument("--run-dir", help="exact run directory for a new run (must not hold a run yet)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config (JSON) and exit")
    add_config_arguments(p)
    aliases = p.add_argument_group("aliases")
    for flag, _, _, kw in ALIASES:
        if kw.get("type") is not None:
            kw = dict(kw, metavar=flag.removeprefix("--").split("-")[0].upper())
        aliases.add_argument(flag, dest="alias" + flag, default=argparse.SUPPRESS, **kw)
    return p.parse_args(argv)


def requested_overrides(args: argparse.Namespace) -> dict:
    """{dotted field: value} from the config flags and their aliases, aliases first so that an
    explicit field flag wins; dict fields accumulate."""
    given = vars(args)
    out: dict = {}
    for flag, name, to_value, _ in ALIASES:
        if "alias" + flag in given:
            value = given["alias" + flag]
            if to_value is not None:
                out[name] = list(out.get(name, [])) + to_value(value)
            else:
                out[name] = value
    for name, value in config_overrides(args).items():
        out[name] = list(out.get(name, [])) + list(value) if name in dict_fields() else value
    return out


def validate(cfg: TrainConfig) -> None:
    """Bad values as one-line UserErrors before anything is made."""
    try:
        check_resolution(cfg.model.resolution)
        check_upsample(cfg.model.upsample)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.batch < 2:
        raise UserError("--batch must be ≥ 2 (BatchNorm needs more than one image per batch)")
    if not cfg.stages:
        raise UserError("--stages: at least one stage")
    if len(set(cfg.stages)) != len(cfg.stages):
        raise UserError(f"--stages: each stage once, got {' '.join(cfg.stages)}")
    positive = {"--embed-steps": cfg.embed_steps, "--log-every-steps": cfg.log_every_steps, "--grid-size": cfg.grid_size,
                "--eval-n": cfg.eval_n, "--ckpt-keep": cfg.ckpt_keep, "--max-bad-steps": cfg.max_bad_steps,
                "--collective-timeout-s": cfg.collective_timeout_s}
    at_least_zero = {"--sample-every-kimg": cfg.sample_every_kimg, "--ckpt-every-kimg": cfg.ckpt_every_kimg,
                     "--ema-kimg": cfg.ema_kimg, "--loader-workers": cfg.loader_workers,
                     "--max-rollbacks": cfg.max_rollbacks, "--embed-cache-mb": cfg.embed_cache_mb,
                     "--data-cache-mb": cfg.data_cache_mb}
    for flag, value in positive.items():
        if not value > 0:
            raise UserError(f"{flag} must be > 0, got {value}")
    for flag, value in at_least_zero.items():
        if not value >= 0:
            raise UserError(f"{flag} must be ≥ 0, got {value}")
    if not 0 < cfg.rollback_lr_scale <= 1:
        raise UserError(f"--rollback-lr-scale must be in (0, 1], got {cfg.rollback_lr_scale}")
    for key, value in cfg.lr.items():
        if not value > 0:
            raise UserError(f"--lr {key} must be > 0, got {value}")
    for name in cfg.stages:
        if name not in STAGE_RECORDS:
            raise UserError(f"--stages: unknown stage {name!r}; choose from {', '.join(STAGE_RECORDS)}")
        if name not in cfg.kimg:
            raise UserError(f"--kimg: no length for stage {name!r} (--kimg {name}=KIMG)")
        if not cfg.kimg[name] >= 0:
            raise UserError(f"--kimg {name} must be ≥ 0 (0 skips the stage), got {cfg.kimg[name]}")
    if not any(cfg.kimg[name] > 0 for name in cfg.stages):
        raise UserError("--kimg: every stage has length 0; nothing to train")
    for name, minutes in cfg.minutes.items():
        if name not in cfg.stages:
            raise UserError(f"--minutes: {name!r} is not a stage of this run ({', '.join(cfg.stages)})")
        if not minutes > 0:
            raise UserError(f"--minutes {name} must be > 0 (leave the stage out for no time limit), got {minutes}")
    if not 0 < cfg.ae_lr_final <= 1:
        raise UserError(f"--ae-lr-final must be in (0, 1] (1: constant rates), got {cfg.ae_lr_final}")
    for key in cfg.lr:
        if key not in ("H", "F", "G_E", "D_E", "phi", "D_R"):
            raise UserError(f"--lr: unknown net {key!r}; choose from H, F, G_E, D_E, phi, D_R")
    for key, gamma in cfg.r1_gamma.items():
        if key not in ("D_E", "D_R"):
            raise UserError(f"--r1-gamma: {key!r} is not a discriminator; choose D_E or D_R (e.g. --r1-gamma D_E=1)")
        if not gamma >= 0:
            raise UserError(f"--r1-gamma {key} must be ≥ 0 (0: off), got {gamma}")
    if cfg.sync_bn and any(g > 0 for g in cfg.r1_gamma.values()):
        raise UserError("--r1-gamma with --sync-bn: the synchronised BatchNorm has no double backward, which R1 needs; "
                        "drop one of them")
    for flag, value, choices in (("--loss", cfg.loss, LOSSES), ("--ops", cfg.ops, ("auto",) + ops.BACKENDS),
                                 ("--loader", cfg.loader, LOADERS), ("--precision", cfg.precision, precisions.PRECISIONS),
                                 ("--compile", cfg.compile, compiling.CHOICES)):
        if value not in choices:
            raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def build_config(args: argparse.Namespace) -> TrainConfig:
    cfg = apply_overrides(preset(args.preset), requested_overrides(args))
    validate(cfg)
    return cfg


def resumed_config(args: argparse.Namespace, run_dir: Path) -> TrainConfig:
    """The checkpoint's config, with only the RESUMABLE fields taken from the command line."""
    overrides = requested_overrides(args)
    fixed = sorted(set(overrides) - set(RESUMABLE))
    if fixed:
        raise UserError(f"--resume continues the run's own config; only {', '.join(RESUMABLE)} may change "
                        f"(given: {', '.join(fixed)})")
    cfg = apply_overrides(TrainConfig.from_dict(load_for_resume(run_dir)[0]["config"]), overrides)
    validate(cfg)
    return cfg


def check_same_run(saved: dict, cfg: TrainConfig) -> None:
    """A resumed run trains what its checkpoint says: a field outside RESUMABLE that differs is an error."""
    differ = config_mismatch(TrainConfig.from_dict(saved).to_dict(), cfg.to_dict(), ignore=RESUMABLE)
    if differ:
        raise UserError(f"this config differs from the run's checkpoint ({'; '.join(differ)}); a resumed run "
                        f"keeps its config (only {', '.join(RESUMABLE)} may change)")


def new_run_dir(cfg: TrainConfig, outdir: str, run_dir: str | None) -> Path:
    if run_dir:
        path = Path(run_dir)
        if (path / "checkpoints" / LATEST).exists() or (path / "config.json").exists():
            raise UserError(f"{path} already holds a run; continue it with --resume {path}")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(outdir) / f"{stamp}-{cfg.preset}-r{cfg.model.resolution}"
        k = 1
        while path.exists():
            path = Path(outdir) / f"{stamp}-{cfg.preset}-r{cfg.model.resolution}-{k}"
            k += 1
    check_writable(path)
    return path


def check_writable(folder: Path) -> None:
    """Create folder and prove a file can be written there, before any training time is spent."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write in {folder}: {e.strerror or e} (choose another --outdir / --run-dir)") from None


# --------------------------------------------------------------------------- bookkeeping

class MetricsLog:
    """Averages the step losses between log lines, writes JSONL (and TensorBoard when installed).

    Losses are summed as tensors on their device; the only host sync is ``flush``, which turns the
    sums into numbers and times the whole interval (so img/s is honest on CUDA without a
    synchronize per step)."""

    def __init__(self, path: Path, device, enabled: bool = True):
        self.path, self.device, self.enabled = path, torch.device(device), enabled  # enabled: rank 0
        self.sums: dict = {}
        self.count = self.images = self.skipped = 0
        self.data_s = 0.0
        self.started = time.perf_counter()
        self.paused_s = 0.0  # time inside the interval that was not training (grids, checkpoints)
        self.tb = None
        try:
            if not enabled:
                raise ImportError
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def add(self, losses: dict, batch: int, data_s: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach()
        self.count += 1
        self.images += batch
        self.data_s += data_s

    def restart_clock(self) -> None:
        self.started = time.perf_counter()
        self.paused_s = 0.0

    @contextmanager
    def paused(self):
        """Grids and checkpoints between steps are not training time: the interval's img/s leaves
        them out (the interval's images stay counted)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def discard(self) -> None:
        """Forget the interval (after a rollback its steps are trained again)."""
        self.sums.clear()
        self.count = self.images = self.skipped = 0
        self.data_s = 0.0
        self.restart_clock()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def flush(self, stage: str, counters: dict) -> dict | None:
        if not self.count:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self.started - self.paused_s, 1e-9)
        row = {"stage": stage, "kimg": round(counters["total_img"] / 1000, 3),
               "stage_kimg": round(counters["stage_img"] / 1000, 3), "step": counters["step"],
               "losses": {k: float(v) / self.count for k, v in self.sums.items()},
               "img_per_s": self.images / elapsed, "data_wait": min(self.data_s / elapsed, 1.0),
               "skipped_updates": self.skipped, "time": time.time()}
        if self.skipped:
            log.warning("%s step %d: skipped %d updates with a non-finite loss or gradient", stage, counters["step"],
                        self.skipped)
        self.write(row)
        if self.tb is not None:
            for k, v in row["losses"].items():
                self.tb.add_scalar(f"{stage}/{k}", v, counters["total_img"])
            self.tb.add_scalar("perf/img_per_s", row["img_per_s"], counters["total_img"])
            self.tb.add_scalar("perf/data_wait", row["data_wait"], counters["total_img"])
        self.sums.clear()
        self.count = self.images = self.skipped = 0
        self.data_s = 0.0
        self.restart_clock()
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
def save_reconstructions(nets, ema, fixed_z, fixed_real, path: Path) -> None:
    """Real images and their reconstructions F(H(x)) in alternate rows."""
    real = fixed_real[:32]
    rec = nets["F"](nets["H"](real))
    rows = torch.stack([real.view(4, 8, *real.shape[1:]), rec.view(4, 8, *rec.shape[1:])], 1)
    save_grid(rows.reshape(-1, *real.shape[1:]), path, nrow=8)


@torch.no_grad()
def save_chain_samples(nets, ema, fixed_z, fixed_real, path: Path) -> None:
    """The sampling chain on the fixed z, EMA weights when on."""
    save_grid(SamplingChain.of(ema.nets if ema is not None else nets)(fixed_z), path)


PREVIEWS = {"reconstructions": save_reconstructions, "samples": save_chain_samples}


def save_preview(stage: Stage, st: TrainState, fixed_z, fixed_real, path: Path) -> None:
    with eval_mode(st.nets):
        PREVIEWS[stage.preview](st.nets, st.ema, fixed_z, fixed_real, path)


def stage_end_evaluation(stage: Stage, st: TrainState) -> dict:
    """The stage's cheap metrics (reconstruction after ``ae``; ``cfg.eval_metrics`` of the sampling
    chain, EMA weights when on, after the others) on ``cfg.eval_n`` held-out images."""
    metrics = stage.metrics(st.cfg)
    if not metrics:
        return {}
    with eval_mode(st.nets):
        nets = dict(st.nets.items()) | (dict(st.ema.nets.items()) if st.ema is not None else {})
        return evaluate_run(nets, st.data.reference(), metrics, st.cfg.eval_n, st.cfg.seed, st.device)


def metrics_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a kill mid-append is left out."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def sampling_choice(stage: Stage, st: TrainState, run_dir: Path, report: dict, metrics: MetricsLog) -> dict | None:
    """After a chain stage other than the run's first, which stage-end checkpoint the run samples from:
    the best SWD of its chain stages so far (ties to the later stage; without SWD figures the latest),
    warning when this stage made SWD worse than the previous chain stage. The metrics.jsonl row that
    records it ({"stage", "kept", "checkpoint", "why", "swd"}), None with one chain stage so far.
    The earlier figures come from metrics.jsonl's eval rows, so a resumed run compares with stages it
    ran before the resume. Training goes on with the latest nets either way: this only picks what is sampled."""
    names = st.cfg.stages[:st.cfg.stages.index(stage.name) + 1]
    chain = [n for n in names if STAGE_RECORDS[n].preview == "samples"]
    if len(chain) < 2:
        return None  # nothing to compare: sampling keeps following latest
    evals = {r["stage"]: r["eval"] for r in metrics_rows(metrics.path) if isinstance(r.get("eval"), dict)}
    evals[stage.name] = report  # this stage's own figures, not those of an attempt before a rollback
    swd = {n: evals.get(n, {}).get("swd") for n in chain}
    prev, now = chain[-2], chain[-1]
    if "swd" not in st.cfg.eval_metrics:
        kept, why = now, "SWD is not among --eval-metrics, so the latest chain is kept"
    elif swd[now] is None or swd[prev] is None:
        kept, why = now, f"stage {prev if swd[now] is not None else now} has no SWD figure, so the latest chain is kept"
    else:
        def badness(n):  # a diverged chain's NaN is the worst figure, not an incomparable one
            v = swd[n]
            return v if v is not None and math.isfinite(v) else math.inf
        kept = min(reversed(chain), key=badness)
        if kept != now and not (run_dir / "checkpoints" / f"stage-{kept}.pt").is_file():
            kept = now
        if badness(now) > badness(prev):
            why = (f"stage {now} made SWD worse: {swd[now]:.4g} after it against {swd[prev]:.4g} after {prev}; "
                   + (f"sampling keeps the {kept} chain (SWD {swd[kept]:.4g})" if kept != now else
                      "the better stage's checkpoint is gone, so sampling uses this one"))
            log.warning("WARNING: %s", why)
        else:
            why = f"SWD {swd[now]:.4g} after {now}, {swd[prev]:.4g} after {prev}: the {kept} chain is kept"
    return {"stage": now, "kept": kept, "checkpoint": f"stage-{kept}.pt", "why": why,
            "swd": {n: swd[n] for n in chain if swd[n] is not None}}


def record_sampling_choice(run_dir: Path, choice: dict, metrics: MetricsLog) -> None:
    write_sampling_pointer(run_dir, choice["checkpoint"])
    metrics.write(choice)
    log.info("sampling default: checkpoints/%s (%s)", choice["checkpoint"], choice["why"])


def sampling_summary(run_dir: Path) -> str:
    """The checkpoint a run samples from, and why (main's closing lines)."""
    try:
        ckpt = resolve_checkpoint(run_dir)
    except UserError as e:
        return str(e)
    kept = [r for r in metrics_rows(run_dir / "metrics.jsonl") if "kept" in r]
    why = kept[-1]["why"] if kept and (run_dir / "checkpoints" / SAMPLING).is_file() else "the latest checkpoint"
    return f"{ckpt} ({why})"


# --------------------------------------------------------------------------- the run

def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (one process trains exactly as it always did); the others draw
    their own z, dropout and embeddings from a seed of (seed, rank)."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def step_precision(cfg: TrainConfig, device) -> precisions.Precision:
    try:
        return precisions.resolve(cfg.precision, cfg.channels_last, device)
    except ValueError as e:
        raise UserError(str(e)) from None


def new_state(cfg: TrainConfig, data: ImageSet, device, world: World = SINGLE) -> TrainState:
    """Fresh nets and optimizers, the nets seeded from cfg.seed (the same on every rank)."""
    data_gen = seed_everything(cfg.seed)
    precision = step_precision(cfg, device)
    nets = precision.prepare(build_nets(cfg.model).to(device))
    if world.rank:
        data_gen = seed_everything(rank_seed(cfg.seed, world.rank))
    st = TrainState(cfg, nets, make_optimizers(nets, cfg), data, data_gen, device, precision,
                    precision.grad_scaler(), world=world, guard=UpdateGuard(device))
    st.counters["stage"] = cfg.stages[0]
    return st


def restore(st: TrainState, state: dict) -> None:
    """Nets, optimizers, EMA, counters and every RNG from a checkpoint (this rank's RNGs when the
    checkpoint holds one per rank of the same world size)."""
    check_same_run(state["config"], st.cfg)
    load_state_strict(st.nets, state["nets"], "nets")
    for name, opt in st.opts.items():
        opt.load_state_dict(state["opts"][name])
    st.ema = None
    if state.get("ema"):
        st.ema = EMA(st.nets, st.cfg.ema_kimg)
        st.ema.load_state_dict(state["ema"])
    check_same_split(state.get("data"), st.data)
    st.counters = dict(state["counters"])
    health = state.get("health") or {}
    st.lr_scale, st.rollbacks = health.get("lr_scale", 1.0), health.get("rollbacks", 0)
    ranks = state.get("ranks")
    if st.world.distributed and ranks is not None and len(ranks) == st.world.size:
        set_rng_state(ranks[st.world.rank]["rng"], st.data_gen)
    elif st.world.rank:
        # another world size: this rank's draws restart from a seed of (seed, rank, step)
        st.data_gen = seed_everything(rank_seed(st.cfg.seed + st.counters["step"], st.world.rank))
    else:
        set_rng_state(state["rng"], st.data_gen)
    if st.guard is not None:
        st.guard.reset()


def split_record(data: ImageSet) -> dict:
    """What a checkpoint records of the data's split: the loader's order indexes the training rows."""
    return {"count": len(data.whole), "holdout": data.holdout}


def check_same_split(saved: dict | None, data: ImageSet) -> None:
    if saved is None:  # a checkpoint from before held-out splits: it trained on every image
        if data.holdout:
            log.warning("WARNING: this run's checkpoint predates held-out splits and trained on all images; it now "
                        "trains on %d and its scores use the %d held out, which it has seen",
                        len(data.whole) - data.holdout, data.holdout)
        return
    if saved != split_record(data):
        raise UserError(f"the data set differs from the run's: its checkpoint trained on {saved['count']} images with "
                        f"{saved['holdout']} held out, the data now has {len(data.whole)} with {data.holdout} held "
                        f"out; resume with the data the run was trained on")


def loader_state_of(state: dict | None, world: World) -> dict | None:
    if not state:
        return None
    ranks = state.get("ranks")
    if world.distributed and ranks is not None and len(ranks) == world.size:
        return ranks[world.rank]["loader"]
    return state.get("loader") if not world.distributed else None


def save_run(st: TrainState, run_dir: Path, loader, name: str | None = None) -> Path | None:
    """A checkpoint of everything the run needs to continue; its config is the run's one source.
    On several ranks every rank takes part (buffers averaged, weights checked equal, RNG and loader
    states gathered) and rank 0 writes. Raises Diverged rather than save a non-finite tensor."""
    world = st.world
    name = name or f"ckpt-{st.counters['total_img']:09d}.pt"
    ranks = None
    if world.distributed:
        modules = dict(st.nets.items()) | ({f"ema.{k}": v for k, v in st.ema.nets.items()} if st.ema else {})
        if not st.cfg.sync_bn:
            distributed.average_buffers(modules)
        distributed.check_consistency(modules)
        ranks = distributed.gather_objects({"rng": rng_state(st.data_gen), "loader": loader.state_dict()})
    failure, path, error = None, None, None
    if world.main:
        try:
            path = save_checkpoint(run_dir, name, {
                "config": st.cfg.to_dict(), "nets": st.nets.state_dict(),
                "opts": {k: o.state_dict() for k, o in st.opts.items()},
                "ema": st.ema.state_dict() if st.ema is not None else None,
                "counters": dict(st.counters), "rng": rng_state(st.data_gen), "loader": loader.state_dict(),
                "ranks": ranks, "health": {"lr_scale": st.lr_scale, "rollbacks": st.rollbacks},
                "data": split_record(st.data)},
                keep=st.cfg.ckpt_keep)
        except NonFiniteCheckpoint as e:
            failure = ("diverged", str(e))
        except UserError as e:  # a full disk, say: every rank stops with rank 0's error
            failure, error = ("error", str(e)), e
    if world.distributed:
        failure = distributed.broadcast_object(failure)
    if failure is not None:
        kind, message = failure
        if kind == "diverged":
            raise Diverged(f"not saved: {message}")
        raise error or UserError(message)
    return path


def crossed(every_img: int, before: int, after: int) -> bool:
    return every_img > 0 and before // every_img != after // every_img


class Diverged(Exception):
    """The run keeps producing non-finite values: go back to the last good checkpoint."""


class StopSignals:
    """SIGTERM (schedulers, torchrun) and SIGINT (Ctrl-C) ask the run to stop after the step it is
    in; the trainer then saves that step and exits 128 + the signal. A second Ctrl-C stops at once,
    without a checkpoint (the latest complete one stays); further SIGTERMs are ignored (the
    scheduler's SIGKILL follows its grace period anyway). Handlers only in the main thread."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint",
                  file=sys.stderr, flush=True)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StageHooks:
    """What the trainer does between steps of a stage: metrics, the divergence check, the progress
    bar, grids, periodic checkpoints, and stopping (a signal, or ``stop_after_steps`` steps)."""

    def __init__(self, stage: Stage, st: TrainState, run_dir: Path, loader, metrics: MetricsLog,
                 previews: tuple, progress: bool, stop_after_steps: int | None, steps_done: int,
                 signals: StopSignals | None = None):
        self.stage, self.st, self.run_dir, self.loader, self.metrics = stage, st, run_dir, loader, metrics
        self.previews, self.progress, self.signals = previews, progress, signals
        self.stop_after_steps, self.steps_done = stop_after_steps, steps_done
        self.stop_reason: str | None = None
        cfg = st.cfg
        self.length = int(cfg.kimg[stage.name] * 1000)
        self.sample_every, self.ckpt_every = int(cfg.sample_every_kimg * 1000), int(cfg.ckpt_every_kimg * 1000)
        index = cfg.stages.index(stage.name)
        self.bar = tqdm(total=self.length, initial=min(st.counters["stage_img"], self.length), unit="img",
                        unit_scale=True, desc=f"stage {index + 1}/{len(cfg.stages)} {stage.name}",
                        disable=not (progress and st.world.main), dynamic_ncols=True, mininterval=1.0)

    def check_health(self) -> int:
        """Updates skipped since the last look; Diverged after cfg.max_bad_steps bad steps in a row."""
        skipped, worst = self.st.guard.read()
        if worst >= self.st.cfg.max_bad_steps:
            raise Diverged(f"{worst} steps in a row had a non-finite loss or gradient (skipped)")
        return skipped

    def __call__(self, losses: dict, before: int, data_s: float) -> bool:
        st, c = self.st, self.st.counters
        self.steps_done += 1
        self.metrics.add(losses, c["stage_img"] - before, data_s)
        self.bar.update(min(c["stage_img"], self.length) - min(before, self.length))
        if c["step"] % st.cfg.log_every_steps == 0:
            self.metrics.skipped += self.check_health()
            self.log_row(self.metrics.flush(self.stage.name, c))
        within = c["stage_img"] < self.length  # the stage's end saves its own grid and checkpoint
        if within and crossed(self.sample_every, before, c["stage_img"]):
            path = self.run_dir / "samples" / f"{self.stage.name}-{c['stage_img'] // 1000:05d}kimg.png"
            with self.metrics.paused():
                distributed.main_only(lambda: save_preview(self.stage, st, *self.previews, path), "a preview grid",
                                      st.world)
        if within and crossed(self.ckpt_every, before, c["stage_img"]):
            self.metrics.skipped += self.check_health()  # never checkpoint in the middle of a bad run
            with self.metrics.paused():
                save_run(st, self.run_dir, self.loader)
        signalled = self.signals is not None and self.signals.received is not None
        if st.world.distributed:  # every rank stops at the same step, or the collectives would hang
            signalled = distributed.any_rank(signalled, st.device)
        if signalled:
            self.stop_reason = "signal"
        elif self.stop_after_steps is not None and self.steps_done >= self.stop_after_steps:
            self.stop_reason = "steps"
        return self.stop_reason is not None

    def log_row(self, row: dict | None) -> None:
        if row is None or not self.st.world.main:
            return
        self.bar.set_postfix_str(f"{row['img_per_s']:.0f} img/s " +
                                 " ".join(f"{k}={v:.3f}" for k, v in row["losses"].items()))
        if not self.progress:
            print(json.dumps(row), flush=True)


def finish_stage(stage: Stage, st: TrainState, run_dir: Path, loader, metrics: MetricsLog, previews) -> None:
    """Last log row, the stage's evaluation and grid (rank 0), then the next stage's checkpoint."""
    skipped, worst = st.guard.read()
    if worst >= st.cfg.max_bad_steps:
        raise Diverged(f"{worst} steps in a row had a non-finite loss or gradient (skipped)")
    metrics.skipped += skipped
    metrics.flush(stage.name, st.counters)
    # What the stage got: its images and its minutes of training steps (what a --minutes budget counts)
    metrics.write({"stage": stage.name, "stage_end": {"kimg": st.counters["stage_img"] / 1000,
                                                      "minutes": st.counters.get("stage_s", 0.0) / 60}})

    def look() -> dict | None:  # rank 0's: the evaluation, the final grid, which checkpoint to sample from
        report = stage_end_evaluation(stage, st)
        if report:
            metrics.write({"stage": stage.name, "kimg": st.counters["total_img"] / 1000, "eval": report})
            log.info("end of stage %s: %s", stage.name, ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
        save_preview(stage, st, *previews, run_dir / "samples" / f"{stage.name}-final.png")
        choice = sampling_choice(stage, st, run_dir, report, metrics) if stage.preview == "samples" else None
        # The pointer names committed files only: this stage's after its save, an earlier stage's before
        # it, so that a run killed while saving a stage that made things worse never samples from it.
        if choice is not None and choice["kept"] != stage.name:
            record_sampling_choice(run_dir, choice, metrics)
        return choice

    choice = distributed.main_only(look, f"stage {stage.name}'s evaluation and grid", st.world)
    names = st.cfg.stages
    following = names[names.index(stage.name) + 1:]
    st.counters.update(stage=following[0] if following else "done", stage_img=0, stage_s=0.0)
    save_run(st, run_dir, loader, f"stage-{stage.name}.pt")

    def point_here() -> None:
        if choice is not None and choice["kept"] == stage.name:
            record_sampling_choice(run_dir, choice, metrics)

    if stage.preview == "samples":  # known on every rank, so every rank makes the same main_only calls
        distributed.main_only(point_here, "the sampling pointer", st.world)
    metrics.restart_clock()


def check_world(cfg: TrainConfig, world: World) -> None:
    if cfg.batch % world.size:
        raise UserError(f"--batch {cfg.batch} is the global batch and must divide by the {world.size} processes "
                        f"(e.g. --batch {max(2, cfg.batch // world.size) * world.size})")
    if cfg.batch // world.size < 2:
        raise UserError(f"--batch {cfg.batch} over {world.size} processes leaves {cfg.batch // world.size} image per "
                        f"process; BatchNorm needs ≥ 2 (--batch {2 * world.size} or more)")


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          stop_after_steps: int | None = None, data: ImageSet | None = None) -> Path:
    """Run (or continue) the config's stages in run_dir. ``stop_after_steps`` ends the call after that
    many steps with a checkpoint, as an interrupted job would (the run then resumes with --resume).
    Under torchrun (torch.distributed initialised) every rank calls it with the same arguments."""
    validate(cfg)  # an unknown backend name included: use_backend's ValueError cannot happen here
    check_world(cfg, distributed.current())
    try:
        sync = ops.sync_batchnorm() if cfg.sync_bn and distributed.current().distributed else nullcontext()
        with ops.use_backend(cfg.ops), sync:
            return _train(cfg, run_dir, resume, progress, stop_after_steps, data)
    except ops.BackendUnavailable as e:
        raise UserError(str(e)) from None


def run_loader(cfg: TrainConfig, st: TrainState, state: dict | None):
    """This rank's loader, positioned where st stands. A resumed run gets the same batches: the torch
    loader's order is a function of (seed, images consumed), DALI's restores from its saved state."""
    return make_loader(cfg.loader, st.data, cfg.batch // st.world.size, cfg.seed, st.device,
                       start=st.counters["total_img"] // st.world.size, workers=cfg.loader_workers,
                       state=loader_state_of(state, st.world))


def load_run_data(cfg: TrainConfig, world: World) -> ImageSet:
    """The data set; on several ranks rank 0 first (it may prepare the cache the others then read)."""
    if world.distributed and not world.main:
        distributed.barrier()
    data = load_dataset(cfg.data, cfg.model.resolution, cache_mb=cfg.data_cache_mb)
    if world.distributed and world.main:
        distributed.barrier()
    return data


def roll_back(st: TrainState, run_dir: Path, why: str) -> dict | None:
    """After a divergence: st back to the run's latest good checkpoint (or its start when it has
    none yet) with its learning rates lowered; the checkpoint's state (None for the start)."""
    cfg = st.cfg
    if st.rollbacks >= cfg.max_rollbacks:
        latest = latest_checkpoint(run_dir)
        raise UserError(f"training diverged again ({why}) after {st.rollbacks} rollbacks with learning rates "
                        f"down to ×{st.lr_scale:g}; the last good checkpoint is {latest or 'none'}: lower --lr, "
                        f"or raise --max-rollbacks")
    rollbacks, lr_scale, at_step = st.rollbacks + 1, st.lr_scale * cfg.rollback_lr_scale, st.counters["step"]
    state, path = None, None
    if (run_dir / "checkpoints" / LATEST).exists():
        state, path = load_for_resume(run_dir, map_location=st.device)
    if state is None:
        start = new_state(cfg, st.data, st.device, st.world)
        st.nets.load_state_dict(start.nets.state_dict())
        for name, opt in st.opts.items():
            opt.load_state_dict(start.opts[name].state_dict())
        st.ema, st.counters, st.data_gen = None, start.counters, start.data_gen
        st.guard.reset()
    else:
        restore(st, state)
    st.rollbacks, st.lr_scale = rollbacks, lr_scale
    where = path.name if path is not None else "the start of the run"
    log.warning("diverged at step %d: %s; back to %s (step %d) with learning rates ×%g (rollback %d of at most %d)",
                at_step, why, where, st.counters["step"], lr_scale, rollbacks, cfg.max_rollbacks)
    return state


def _train(cfg, run_dir: Path, resume: bool, progress: bool, stop_after_steps, data) -> Path:
    world = distributed.current()
    device = pick_device(cfg.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if data is None:
        data = load_run_data(cfg, world)
    if data.resolution != cfg.model.resolution:
        raise UserError(f"data is {data.resolution}² but the model is {cfg.model.resolution}²")
    log.info("data: %s (from %s, %d unreadable skipped)", data.describe(), data.origin, data.skipped)
    data = data.split("train")  # held-out images are for scoring only: no loader, draw or grid reads them
    if world.distributed:
        log.info("distributed: %d processes (%s), global batch %d = %d per process, sync BN %s", world.size,
                 torch.distributed.get_backend(), cfg.batch, cfg.batch // world.size, "on" if cfg.sync_bn else "off")

    st = new_state(cfg, data, device, world)
    log.info("precision: %s", st.precision.describe())
    state = None
    if resume:
        state, path = load_for_resume(run_dir, map_location=device)
        restore(st, state)
        log.info("resuming from %s: stage %s, %.4g kimg into it", path.name, st.counters["stage"],
                 st.counters["stage_img"] / 1000)
    elif world.distributed:
        distributed.broadcast_from_main(list(st.nets.parameters()) + list(st.nets.buffers()))
    if world.main:
        cfg.save(run_dir / "config.json")  # from the same dict every checkpoint of the run stores
    do_compile, why = compiling.wanted(cfg.compile, device)
    log.info("compile: %s", why)
    if do_compile:
        compiling.compile_nets(st.nets, compiling.example_inputs(cfg, device), st.precision)

    loader = run_loader(cfg, st, state)
    previews = (sample_z(cfg.grid_size, cfg.model.z_dim, torch.Generator().manual_seed(cfg.seed + 1), device),
                data.spread(32, device))
    metrics = MetricsLog(run_dir / "metrics.jsonl", device, enabled=world.main)
    if world.main:
        (run_dir / "samples").mkdir(exist_ok=True)
    steps_done = 0
    try:
        with StopSignals() as signals:
            while st.counters["stage"] in cfg.stages:
                stage = STAGE_RECORDS[st.counters["stage"]]
                hooks = StageHooks(stage, st, run_dir, loader, metrics, previews, progress, stop_after_steps,
                                   steps_done, signals)
                try:
                    stopped = run_stage(stage, st, loader, hooks.length, hooks,
                                        cfg.minutes.get(stage.name, math.inf) * 60)
                    if not stopped:
                        finish_stage(stage, st, run_dir, loader, metrics, previews)
                except Diverged as e:
                    hooks.bar.close()
                    state = roll_back(st, run_dir, str(e))
                    loader.close()
                    loader = run_loader(cfg, st, state)
                    metrics.discard()
                    steps_done = hooks.steps_done
                    continue
                except KeyboardInterrupt:  # a second Ctrl-C: the step was cut short, so no checkpoint of it
                    hooks.bar.close()
                    if world.main:
                        print(f"\nstopped at once; continue from the latest complete checkpoint "
                              f"({latest_checkpoint(run_dir) or 'none yet'}) with: "
                              f"python -m aegan_fast.train --resume {run_dir}", file=sys.stderr)
                    raise
                hooks.bar.close()
                steps_done = hooks.steps_done
                if hooks.stop_reason == "steps":
                    save_run(st, run_dir, loader)
                    return run_dir
                if hooks.stop_reason == "signal":
                    path = save_run(st, run_dir, loader)
                    signum = signals.received or signal.SIGTERM  # another rank's signal stopped this one
                    raise Interrupted(signum, f"{signal.Signals(signum).name}: saved {path or 'the checkpoint'} at step "
                                      f"{st.counters['step']} ({st.counters['total_img'] / 1000:.3f} kimg)\n"
                                      f"continue with: python -m aegan_fast.train --resume {run_dir}")
    finally:
        loader.close()
    distributed.main_only(lambda: plot_metrics(run_dir / "metrics.jsonl", run_dir / "losses.png"), "the loss plot",
                          world)
    return run_dir


def job_run_dir(cfg: TrainConfig, args: argparse.Namespace, world: World) -> tuple[Path, bool]:
    """(run directory, whether to resume it) for a run started without --resume. Under torchrun the
    directory is rank 0's choice, and when torchrun restarts failed workers (``--max-restarts``) the
    restarted ones continue the same directory from its latest checkpoint."""
    if distributed.launched_by_torchrun() and distributed.restart_count() > 0:
        path = Path(args.run_dir) if args.run_dir else Path(args.outdir) / torchrun_run_name(cfg)
        if (path / "checkpoints" / LATEST).exists():
            log.warning("elastic restart %d: continuing %s from its latest checkpoint", distributed.restart_count(), path)
            return path, True
        if world.main:
            path.mkdir(parents=True, exist_ok=True)
        return path, False
    if not world.distributed:
        return new_run_dir(cfg, args.outdir, args.run_dir), False
    choice: tuple = (None, None)
    if world.main:
        try:
            named = args.run_dir or (str(Path(args.outdir) / torchrun_run_name(cfg)))
            choice = (str(new_run_dir(cfg, args.outdir, named)), None)
        except UserError as e:
            choice = (None, str(e))
    path, error = distributed.broadcast_object(choice)
    if error:
        raise UserError(error)
    return Path(path), False


def torchrun_run_name(cfg: TrainConfig) -> str:
    """A run directory name every rank, and every elastic restart, of one torchrun job agrees on."""
    return f"{cfg.preset}-r{cfg.model.resolution}-{distributed.job_id()}"


@cli
def main(argv=None) -> None:
    args = parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s")
    resume = bool(args.resume)
    if resume:
        run_dir = Path(args.resume)
        cfg = resumed_config(args, run_dir)
    else:
        cfg = build_config(args)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    world, _ = distributed.init(pick_device(cfg.device), cfg.collective_timeout_s)
    try:
        check_world(cfg, world)
        data = None
        if not resume:
            data = load_run_data(cfg, world)  # fails before a run dir exists
            run_dir, resume = job_run_dir(cfg, args, world)
        else:
            check_writable(run_dir / "checkpoints")
        started = time.time()
        if world.main:
            print(f"run directory: {run_dir}", flush=True)
        train(cfg, run_dir, resume=resume, progress=not args.no_progress, data=data)
    finally:
        distributed.shutdown()
    if world.main:
        minutes = (time.time() - started) / 60
        print(f"\ndone in {minutes:.1f} min\n"
              f"  samples     {run_dir / 'samples' / (cfg.stages[-1] + '-final.png')}\n"
              f"  loss plot   {run_dir / 'losses.png'}\n"
              f"  checkpoint  {latest_checkpoint(run_dir)}\n"
              f"  sampling    {sampling_summary(run_dir)}\n"
              f"  sample more python -m aegan_fast.sample --ckpt {run_dir} --n 64 --out grid.png")


if __name__ == "__main__":
    main()
