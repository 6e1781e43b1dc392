"""Train AEGAN: ``python -m aegan_fast.train`` (or ``aegan-train``).

The config's stages run in order, each for its length in kimg (thousands of real images); AEGAN's:
    ae        autoencoder H/F                  (reconstruction L1)
    embed     G_E vs D_E on embeddings, φ vs D_R on images (H/F frozen)
    finetune  the whole sampling chain end to end (see training/stages.py)
(``--stages direct`` trains the baseline GAN on pixels instead, in the same loop.)

Everything lands in one run directory: config.json, checkpoints/ (atomic, with a `latest` pointer,
and a `sampling` one naming the stage-end checkpoint with the best SWD: a stage that made samples
worse is warned about and not sampled from), samples/ (grids from a fixed z), metrics.jsonl,
losses.png, and TensorBoard events when tensorboard is installed. ``--resume RUN_DIR`` continues
from the latest checkpoint, in the middle of a stage too, with the checkpoint's config (only where
and how the run executes may change: config.RESUMABLE); Ctrl-C saves a checkpoint first.
``--dry-run`` prints the resolved config and exits.

Fine-tuning: ``--init-from RUN_OR_CKPT --data NEW_FOLDER`` starts a new run from another run's nets
(the model config is the checkpoint's; the training settings are --preset's and the flags'), at the
stage ``--init-from-stage`` names, with ``--freeze-d N`` of each discriminator's first blocks kept.

This module is the command line only: it parses, validates, chooses the run directory and calls
``aegan_fast.training.train``, the library's loop.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from . import distributed
from .checkpoint import LATEST, latest_checkpoint
from .config import (PRESETS, RESUMABLE, STAGES, TrainConfig, add_config_arguments, apply_overrides, config_overrides,
                     dict_fields, preset)
from .device import pick_device
from .distributed import World
from .errors import UserError, cli
from .training import STAGES as STAGE_RECORDS
from .training import check_world, train, validate
from .training.loop import load_run_data
from .training.run_log import sampling_summary
from .models import ModelConfig
from .training.run_state import InitSource, read_init_source, saved_config

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
    run.add_argument("--preset", default="demo", choices=PRESETS,
                     help="the defaults every other flag overrides: demo (R=64, ~11 min on 2 CPU cores), "
                          "demo128 (the same at R=128, ~19 min) or paper (the paper's settings at R=512); "
                          "default demo")
    run.add_argument("--outdir", default="runs", help="parent folder of new run directories (default runs)")
    run.add_argument("--run-dir", help="exact run directory for a new run (must not hold a run yet)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config (JSON) and exit")
    run.add_argument("--init-from-stage", choices=list(STAGE_RECORDS), metavar="|".join(STAGES),
                     help="with --init-from: the stage the new run starts at, the stages before it left out of "
                          "--stages. Default embed: the autoencoder is reused as loaded, because retraining it "
                          "moves the embedding space G_E and D_E learned and one trained on a set of images "
                          "encodes others of its kind; ae retrains it first (for a folder unlike the source's; "
                          "keep it short with --kimg ae=K or --minutes ae=M); finetune goes straight to stage 3")
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


def build_config(args: argparse.Namespace, source: InitSource | None = None) -> TrainConfig:
    """The preset with the flags on top; with ``source`` (--init-from) the model is the source's."""
    overrides = requested_overrides(args)
    cfg = apply_overrides(preset(args.preset), overrides)
    if source is not None:
        cfg.model = source_model(source, overrides)
        cfg.stages = starting_stages(cfg.stages, args.init_from_stage)
        cfg.init_from, cfg.init_from_sha256 = str(source.path), source.sha256
    elif args.init_from_stage:
        raise UserError("--init-from-stage chooses where a run started from a checkpoint begins: it needs --init-from")
    validate(cfg)
    return cfg


def source_model(source: InitSource, overrides: dict) -> ModelConfig:
    """The source checkpoint's model config; an architecture flag that says otherwise is an error."""
    model = source.config.model
    for name, value in overrides.items():
        if name.startswith("model.") and getattr(model, name.removeprefix("model.")) != value:
            raise UserError(f"--{name.replace('_', '-')} {value} contradicts the --init-from checkpoint, whose "
                            f"{name} is {getattr(model, name.removeprefix('model.'))} ({source.path}): a run "
                            f"started from it keeps its architecture")
    return model


def starting_stages(stages: tuple[str, ...], first: str | None) -> tuple[str, ...]:
    """The run's stages from ``first`` on (default: from embed, when the run has it)."""
    if first is None:
        first = "embed" if "embed" in stages else stages[0]
    if first not in stages:
        raise UserError(f"--init-from-stage {first} is not one of this run's stages ({' '.join(stages)})")
    return stages[stages.index(first):]


def resumed_config(args: argparse.Namespace, run_dir: Path) -> TrainConfig:
    """The checkpoint's config, with only the RESUMABLE fields taken from the command line."""
    if args.init_from_stage:
        raise UserError("--init-from-stage chooses where a new run from --init-from begins; --resume continues a run "
                        "where it stopped")
    overrides = requested_overrides(args)
    fixed = sorted(set(overrides) - set(RESUMABLE))
    if fixed:
        raise UserError(f"--resume continues the run's own config; only {', '.join(RESUMABLE)} may change "
                        f"(given: {', '.join(fixed)})")
    cfg = apply_overrides(saved_config(run_dir), overrides)
    validate(cfg)
    return cfg


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
            # absolute: every rank, whatever its working directory, opens the folder rank 0 made
            choice = (str(new_run_dir(cfg, args.outdir, named).absolute()), None)
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
    source = None
    if resume:
        run_dir = Path(args.resume)
        cfg = resumed_config(args, run_dir)
    else:
        if getattr(args, "init_from", None):
            source = read_init_source(args.init_from, getattr(args, "init_from_sha256", None))
        cfg = build_config(args, source)
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
        elif world.main:  # rank 0 alone writes in the run directory
            check_writable(run_dir / "checkpoints")
        started = time.time()
        if world.main:
            print(f"run directory: {run_dir}", flush=True)
        train(cfg, run_dir, resume=resume, progress=not args.no_progress, data=data, init=source)
    except RuntimeError as e:  # before training: another process gone while ranks agree on data and folder
        lost = distributed.lost_contact(e, "the job's start") if world.distributed else None
        if lost is None:
            raise
        raise lost from None
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
