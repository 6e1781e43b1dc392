"""The training loop: ``train(cfg, run_dir)`` runs (or continues) a config's stages in a run directory.

Each stage is a record (stages.py) that ``run_stage`` steps through; between steps, ``StageHooks``
logs, draws previews, checkpoints and watches for signals and divergence; at a stage's end,
``finish_stage`` evaluates, picks the checkpoint to sample from and saves. A divergence rolls the
run back to its latest good checkpoint with lower learning rates; SIGTERM/SIGINT save and stop.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from .. import augment, compiling, distributed, ops
from ..checkpoint import LATEST, latest_checkpoint, load_for_resume
from ..config import TrainConfig
from ..data import ImageSet, load_dataset, make_loader
from ..device import pick_device
from ..distributed import World
from ..errors import Interrupted, UserError
from ..models import sample_z
from ..viz import plot_metrics
from .run_log import MetricsLog, record_sampling_choice, sampling_choice, save_preview, stage_end_evaluation
from .run_state import Diverged, InitSource, loader_state_of, new_state, read_init_source, restore, save_run
from .stages import STAGES as STAGE_RECORDS
from .stages import Stage, TrainState, run_stage
from .validate import check_world, validate

log = logging.getLogger("aegan_fast.training")


def crossed(every_img: int, before: int, after: int) -> bool:
    return every_img > 0 and before // every_img != after // every_img


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
            self.log_row(self.metrics.flush(self.stage.name, c, augment.log_row(st.augment, self.stage.trains)))
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
    metrics.flush(stage.name, st.counters, augment.log_row(st.augment, stage.trains))
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


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          stop_after_steps: int | None = None, data: ImageSet | None = None, init: InitSource | None = None) -> Path:
    """Run (or continue) the config's stages in run_dir. ``stop_after_steps`` ends the call after that
    many steps with a checkpoint, as an interrupted job would (the run then resumes with --resume).
    A new run with cfg.init_from starts from that checkpoint's nets (``init``: it already read). Under
    torchrun (torch.distributed initialised) every rank calls it with the same arguments."""
    validate(cfg)  # an unknown backend name included: use_backend's ValueError cannot happen here
    check_world(cfg, distributed.current())
    if resume or not cfg.init_from:
        init = None  # a fine-tuning run reads its source once, at its start; its checkpoints carry on
    else:
        init = init or read_init_source(cfg.init_from, cfg.init_from_sha256)
        # the config says which file, by its digest, the run started from
        cfg = dataclasses.replace(cfg, init_from=str(init.path), init_from_sha256=init.sha256)
    try:
        sync = ops.sync_batchnorm() if cfg.sync_bn and distributed.current().distributed else nullcontext()
        with ops.use_backend(cfg.ops), sync:
            return _train(cfg, run_dir, resume, progress, stop_after_steps, data, init)
    except ops.BackendUnavailable as e:
        raise UserError(str(e)) from None
    except RuntimeError as e:  # a process or node of the job gone: one line, not a collective's traceback
        lost = distributed.lost_contact(e, "training") if distributed.current().distributed else None
        if lost is None:
            raise
        raise distributed.PeerLost(f"{lost}; this run stopped too: continue from its latest committed checkpoint "
                                   f"({latest_checkpoint(run_dir) or 'none yet'}) with the same command plus "
                                   f"--resume {run_dir}") from None


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
        st.ema, st.counters, st.data_gen, st.augment = None, start.counters, start.data_gen, start.augment
        st.guard.reset()
    else:
        restore(st, state)
    st.rollbacks, st.lr_scale = rollbacks, lr_scale
    where = path.name if path is not None else "the start of the run"
    log.warning("diverged at step %d: %s; back to %s (step %d) with learning rates ×%g (rollback %d of at most %d)",
                at_step, why, where, st.counters["step"], lr_scale, rollbacks, cfg.max_rollbacks)
    return state


def _train(cfg, run_dir: Path, resume: bool, progress: bool, stop_after_steps, data, init) -> Path:
    world = distributed.current()
    distributed.check_shared_folder(run_dir)  # before anything is written or read there
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

    st = new_state(cfg, data, device, world, init=init)
    if init is not None:
        log.info("nets%s from %s (sha256 %s), stages %s", " and EMA" if st.ema else "", init.path, init.sha256,
                 " ".join(cfg.stages))
    log.info("precision: %s", st.precision.describe())
    state = None
    if resume:
        state, path = load_for_resume(run_dir, map_location=device)
        restore(st, state)
        log.info("resuming from %s: stage %s, %.4g kimg into it", path.name, st.counters["stage"],
                 st.counters["stage_img"] / 1000)
        saved_world = state.get("world_size") or len(state.get("ranks") or ()) or 1
        if saved_world != world.size:
            log.warning("the run trained on %d processes and continues on %d: the same global batch %d, now %d per "
                        "process (ranks other than 0 draw new noise, so the steps from here differ from those the "
                        "%d processes would have taken)", saved_world, world.size, cfg.batch, cfg.batch // world.size,
                        saved_world)
    elif world.distributed:
        distributed.broadcast_from_main(list(st.nets.parameters()) + list(st.nets.buffers()))
    if world.main:
        cfg.save(run_dir / "config.json")  # from the same dict every checkpoint of the run stores
    do_compile, why = compiling.wanted(cfg.compile, device)
    log.info("compile: %s", why)
    if do_compile:
        compiling.compile_nets(st.nets, compiling.example_inputs(cfg, device), st.precision)

    loader = run_loader(cfg, st, state)
    if init is not None:  # step 0 as a checkpoint: a rollback or resume before the first goes back here
        save_run(st, run_dir, loader)
    previews = (sample_z(cfg.grid_size, cfg.model.z_dim, torch.Generator().manual_seed(cfg.seed + 1), device),
                data.spread(32, device))
    reducer = st.guard.reducer if st.guard is not None else None
    metrics = MetricsLog(run_dir / "metrics.jsonl", device, enabled=world.main,
                         comm_clock=(lambda: reducer.comm_s) if reducer is not None else None)
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
