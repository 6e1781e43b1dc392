"""Train AEGAN: ``python -m aegan_fast.train`` (or ``aegan-train``).

The config's stages run in order, each for its length in kimg (thousands of real images); AEGAN's:
    ae        autoencoder H/F                  (reconstruction L1)
    embed     G_E vs D_E on embeddings, φ vs D_R on images (H/F frozen)
    finetune  the whole sampling chain end to end (see stages.py)
(``--stages direct`` trains the baseline GAN on pixels instead, in the same loop.)

Everything lands in one run directory: config.json, checkpoints/ (atomic, with a `latest` pointer),
samples/ (grids from a fixed z), metrics.jsonl, losses.png, and TensorBoard events when tensorboard
is installed. ``--resume RUN_DIR`` continues from the latest checkpoint, in the middle of a stage too,
with the checkpoint's config (only ``--ops``, ``--device``, ``--loader``, ``--loader-workers`` and
``--data-cache-mb`` may change); Ctrl-C saves a checkpoint first. ``--dry-run`` prints the resolved
config and exits.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import compiling, ops
from . import precision as precisions
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import (LOSSES, RESUMABLE, STAGES, TrainConfig, add_config_arguments, apply_overrides,
                     config_overrides, dict_fields, preset)
from .data import LOADERS, ImageSet, load_dataset, make_loader
from .device import pick_device
from .errors import UserError, cli
from .evaluation import evaluate_run
from .models import SamplingChain, build_nets, check_resolution, sample_z
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
    ("--denoiser-skips", "model.denoiser_skips", None, dict(action="store_const", const=True,
                                                         help="alias of --model.denoiser-skips")),
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
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.batch < 2:
        raise UserError("--batch must be ≥ 2 (BatchNorm needs more than one image per batch)")
    if not cfg.stages:
        raise UserError("--stages: at least one stage")
    for name in cfg.stages:
        if name not in STAGE_RECORDS:
            raise UserError(f"--stages: unknown stage {name!r}; choose from {', '.join(STAGE_RECORDS)}")
        if name not in cfg.kimg:
            raise UserError(f"--kimg: no length for stage {name!r} (--kimg {name}=KIMG)")
        if cfg.kimg[name] < 0:
            raise UserError(f"--kimg {name} must be ≥ 0")
    for key in cfg.lr:
        if key not in ("H", "F", "G_E", "D_E", "phi", "D_R"):
            raise UserError(f"--lr: unknown net {key!r}; choose from H, F, G_E, D_E, phi, D_R")
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
    if latest_checkpoint(run_dir) is None:
        raise UserError(f"--resume {run_dir}: no checkpoint there to continue from")
    overrides = requested_overrides(args)
    fixed = sorted(set(overrides) - set(RESUMABLE))
    if fixed:
        raise UserError(f"--resume continues the run's own config; only {', '.join(RESUMABLE)} may change "
                        f"(given: {', '.join(fixed)})")
    cfg = apply_overrides(TrainConfig.from_dict(load_checkpoint(run_dir)["config"]), overrides)
    validate(cfg)
    return cfg


def check_same_run(saved: dict, cfg: TrainConfig) -> None:
    """A resumed run trains what its checkpoint says: a field outside RESUMABLE that differs is an error."""
    now = cfg.to_dict()
    saved = TrainConfig.from_dict(saved).to_dict()
    differ = [k for k in now if k not in RESUMABLE and now[k] != saved.get(k)]
    if differ:
        raise UserError(f"this config differs from the run's checkpoint in {', '.join(differ)}; "
                        f"a resumed run keeps its config (only {', '.join(RESUMABLE)} may change)")


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
    """Averages the step losses between log lines, writes JSONL (and TensorBoard when installed).

    Losses are summed as tensors on their device; the only host sync is ``flush``, which turns the
    sums into numbers and times the whole interval (so img/s is honest on CUDA without a
    synchronize per step)."""

    def __init__(self, path: Path, device):
        self.path, self.device = path, torch.device(device)
        self.sums: dict = {}
        self.count = self.images = 0
        self.data_s = 0.0
        self.started = time.perf_counter()
        self.paused_s = 0.0  # time inside the interval that was not training (grids, checkpoints)
        self.tb = None
        try:
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

    def write(self, row: dict) -> None:
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
               "time": time.time()}
        self.write(row)
        if self.tb is not None:
            for k, v in row["losses"].items():
                self.tb.add_scalar(f"{stage}/{k}", v, counters["total_img"])
            self.tb.add_scalar("perf/img_per_s", row["img_per_s"], counters["total_img"])
            self.tb.add_scalar("perf/data_wait", row["data_wait"], counters["total_img"])
        self.sums.clear()
        self.count = self.images = 0
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
    chain, EMA weights when on, after the others) on ``cfg.eval_n`` images."""
    metrics = stage.metrics(st.cfg)
    if not metrics:
        return {}
    with eval_mode(st.nets):
        nets = dict(st.nets.items()) | (dict(st.ema.nets.items()) if st.ema is not None else {})
        return evaluate_run(nets, st.data, metrics, st.cfg.eval_n, st.cfg.seed, st.device)


# --------------------------------------------------------------------------- the run

def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def step_precision(cfg: TrainConfig, device) -> precisions.Precision:
    try:
        return precisions.resolve(cfg.precision, cfg.channels_last, device)
    except ValueError as e:
        raise UserError(str(e)) from None


def new_state(cfg: TrainConfig, data: ImageSet, device) -> TrainState:
    """Fresh nets and optimizers, everything seeded from cfg.seed."""
    data_gen = seed_everything(cfg.seed)
    precision = step_precision(cfg, device)
    nets = precision.prepare(build_nets(cfg.model).to(device))
    st = TrainState(cfg, nets, make_optimizers(nets, cfg), data, data_gen, device, precision,
                    precision.grad_scaler())
    st.counters["stage"] = cfg.stages[0]
    return st


def restore(st: TrainState, state: dict) -> None:
    """Nets, optimizers, EMA, counters and every RNG from a checkpoint."""
    check_same_run(state["config"], st.cfg)
    st.nets.load_state_dict(state["nets"])
    for name, opt in st.opts.items():
        opt.load_state_dict(state["opts"][name])
    if state.get("ema"):
        st.ema = EMA(st.nets, st.cfg.ema_kimg)
        st.ema.load_state_dict(state["ema"])
    st.counters = dict(state["counters"])
    set_rng_state(state["rng"], st.data_gen)


def save_run(st: TrainState, run_dir: Path, loader, name: str | None = None) -> Path:
    """A checkpoint of everything the run needs to continue; its config is the run's one source."""
    name = name or f"ckpt-{st.counters['total_img']:09d}.pt"
    return save_checkpoint(run_dir, name, {
        "config": st.cfg.to_dict(), "nets": st.nets.state_dict(),
        "opts": {k: o.state_dict() for k, o in st.opts.items()},
        "ema": st.ema.state_dict() if st.ema is not None else None,
        "counters": dict(st.counters), "rng": rng_state(st.data_gen), "loader": loader.state_dict()})


def crossed(every_img: int, before: int, after: int) -> bool:
    return every_img > 0 and before // every_img != after // every_img


class StageHooks:
    """What the trainer does between steps of a stage: metrics, the progress bar, grids, periodic
    checkpoints, and stopping after ``stop_after_steps`` steps of this call."""

    def __init__(self, stage: Stage, st: TrainState, run_dir: Path, loader, metrics: MetricsLog,
                 previews: tuple, progress: bool, stop_after_steps: int | None, steps_done: int):
        self.stage, self.st, self.run_dir, self.loader, self.metrics = stage, st, run_dir, loader, metrics
        self.previews, self.progress = previews, progress
        self.stop_after_steps, self.steps_done = stop_after_steps, steps_done
        cfg = st.cfg
        self.length = int(cfg.kimg[stage.name] * 1000)
        self.sample_every, self.ckpt_every = int(cfg.sample_every_kimg * 1000), int(cfg.ckpt_every_kimg * 1000)
        index = cfg.stages.index(stage.name)
        self.bar = tqdm(total=self.length, initial=min(st.counters["stage_img"], self.length), unit="img",
                        unit_scale=True, desc=f"stage {index + 1}/{len(cfg.stages)} {stage.name}",
                        disable=not progress, dynamic_ncols=True, mininterval=1.0)

    def __call__(self, losses: dict, before: int, data_s: float) -> bool:
        st, c = self.st, self.st.counters
        self.steps_done += 1
        self.metrics.add(losses, c["stage_img"] - before, data_s)
        self.bar.update(min(c["stage_img"], self.length) - min(before, self.length))
        if c["step"] % st.cfg.log_every_steps == 0:
            self.log_row(self.metrics.flush(self.stage.name, c))
        within = c["stage_img"] < self.length  # the stage's end saves its own grid and checkpoint
        if within and crossed(self.sample_every, before, c["stage_img"]):
            with self.metrics.paused():
                save_preview(self.stage, st, *self.previews,
                             self.run_dir / "samples" / f"{self.stage.name}-{c['stage_img'] // 1000:05d}kimg.png")
        if within and crossed(self.ckpt_every, before, c["stage_img"]):
            with self.metrics.paused():
                save_run(st, self.run_dir, self.loader)
        return self.stop_after_steps is not None and self.steps_done >= self.stop_after_steps

    def log_row(self, row: dict) -> None:
        self.bar.set_postfix_str(f"{row['img_per_s']:.0f} img/s " +
                                 " ".join(f"{k}={v:.3f}" for k, v in row["losses"].items()))
        if not self.progress:
            print(json.dumps(row), flush=True)


def finish_stage(stage: Stage, st: TrainState, run_dir: Path, loader, metrics: MetricsLog, previews) -> None:
    """Last log row, the stage's evaluation and grid, then the next stage's checkpoint."""
    metrics.flush(stage.name, st.counters)
    report = stage_end_evaluation(stage, st)
    if report:
        metrics.write({"stage": stage.name, "kimg": st.counters["total_img"] / 1000, "eval": report})
        log.info("end of stage %s: %s", stage.name, ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
    save_preview(stage, st, *previews, run_dir / "samples" / f"{stage.name}-final.png")
    names = st.cfg.stages
    following = names[names.index(stage.name) + 1:]
    st.counters.update(stage=following[0] if following else "done", stage_img=0)
    save_run(st, run_dir, loader, f"stage-{stage.name}.pt")
    metrics.restart_clock()


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          stop_after_steps: int | None = None, data: ImageSet | None = None) -> Path:
    """Run (or continue) the config's stages in run_dir. ``stop_after_steps`` ends the call after that
    many steps with a checkpoint, as an interrupted job would (the run then resumes with --resume)."""
    validate(cfg)  # an unknown backend name included: use_backend's ValueError cannot happen here
    try:
        with ops.use_backend(cfg.ops):
            return _train(cfg, run_dir, resume, progress, stop_after_steps, data)
    except ops.BackendUnavailable as e:
        raise UserError(str(e)) from None


def _train(cfg, run_dir: Path, resume: bool, progress: bool, stop_after_steps, data) -> Path:
    device = pick_device(cfg.device)
    if data is None:
        data = load_dataset(cfg.data, cfg.model.resolution, cache_mb=cfg.data_cache_mb)
    if data.resolution != cfg.model.resolution:
        raise UserError(f"data is {data.resolution}² but the model is {cfg.model.resolution}²")
    log.info("data: %d images from %s (%d unreadable skipped)", len(data), data.source, data.skipped)

    st = new_state(cfg, data, device)
    log.info("precision: %s", st.precision.describe())
    state = load_checkpoint(run_dir, map_location=device) if resume else None
    if state is not None:
        restore(st, state)
        log.info("resuming at stage %s, %.1f kimg into it", st.counters["stage"], st.counters["stage_img"] / 1000)
    cfg.save(run_dir / "config.json")  # from the same dict every checkpoint of the run stores
    do_compile, why = compiling.wanted(cfg.compile, device)
    log.info("compile: %s", why)
    if do_compile:
        compiling.compile_nets(st.nets, compiling.example_inputs(cfg, device), st.precision)

    # A resumed run gets the same batches: the torch loader's order is a function of (seed, images
    # consumed), DALI's restores from the checkpoint it saved.
    loader = make_loader(cfg.loader, data, cfg.batch, cfg.seed, device, start=st.counters["total_img"],
                         workers=cfg.loader_workers, state=state.get("loader") if state else None)
    previews = (sample_z(cfg.grid_size, cfg.model.z_dim, torch.Generator().manual_seed(cfg.seed + 1), device),
                data.spread(32, device))
    metrics = MetricsLog(run_dir / "metrics.jsonl", device)
    (run_dir / "samples").mkdir(exist_ok=True)
    steps_done = 0
    try:
        while st.counters["stage"] in cfg.stages:
            stage = STAGE_RECORDS[st.counters["stage"]]
            hooks = StageHooks(stage, st, run_dir, loader, metrics, previews, progress, stop_after_steps, steps_done)
            try:
                stopped = run_stage(stage, st, loader, hooks.length, hooks)
            except KeyboardInterrupt:
                hooks.bar.close()
                path = save_run(st, run_dir, loader)
                print(f"\ninterrupted: saved {path}\ncontinue with: python -m aegan_fast.train --resume {run_dir}",
                      file=sys.stderr)
                raise
            hooks.bar.close()
            steps_done = hooks.steps_done
            if stopped:
                save_run(st, run_dir, loader)
                return run_dir
            finish_stage(stage, st, run_dir, loader, metrics, previews)
    finally:
        loader.close()
    plot_metrics(run_dir / "metrics.jsonl", run_dir / "losses.png")
    return run_dir


@cli
def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.resume:
        run_dir = Path(args.resume)
        cfg = resumed_config(args, run_dir)
    else:
        cfg = build_config(args)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    data = None
    if not args.resume:
        data = load_dataset(cfg.data, cfg.model.resolution, cache_mb=cfg.data_cache_mb)  # fails before a run dir exists
        run_dir = new_run_dir(cfg, args.outdir, args.run_dir)
    started = time.time()
    print(f"run directory: {run_dir}", flush=True)
    train(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress, data=data)
    minutes = (time.time() - started) / 60
    print(f"\ndone in {minutes:.1f} min\n"
          f"  samples     {run_dir / 'samples' / (cfg.stages[-1] + '-final.png')}\n"
          f"  loss plot   {run_dir / 'losses.png'}\n"
          f"  checkpoint  {latest_checkpoint(run_dir)}\n"
          f"  sample more python -m aegan_fast.sample --ckpt {run_dir} --n 64 --out grid.png")


if __name__ == "__main__":
    main()
