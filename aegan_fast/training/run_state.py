"""A run's state: how it is made, and the one place that writes and reads a checkpoint's schema.

A checkpoint is a dict (saved atomically by checkpoint.py, which knows files, not contents):

    config    TrainConfig.to_dict(): the run's one source of its config
    nets      every net's state_dict (H, F, G_E, D_E, phi, D_R, and D_AE in runs with --ae-adv-weight)
    opts      {net: Adam state_dict}
    ema       {net: state_dict} of the sampling chain's EMA, or None
    counters  {stage, stage_img, stage_s, total_img, step}
    rng       rank 0's torch, numpy, python and data-generator states (plain tensors: weights_only loads)
    loader    rank 0's loader position
    ranks     [{rng, loader}] per rank under torchrun, else None
    world_size  how many processes trained it (under torchrun: the world size; --batch is their global batch)
    health    {lr_scale, rollbacks}: the divergence guard's history
    data      {count, holdout}: the split the run trains on
    augment   {discriminator: its augmentation pipe's p and r_t statistics} (augment.py; {} when off)

``new_state`` makes a fresh state (from another run's nets when fine-tuning: ``read_init_source``),
``save_run`` writes one, ``restore`` reads one back into a state and ``load_sampling_nets`` reads the
nets a sampler needs.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import augment, distributed
from .. import precision as precisions
from ..checkpoint import (NonFiniteCheckpoint, config_mismatch, load_checkpoint, load_for_resume, load_for_sampling,
                          load_state_strict, resolve_checkpoint, save_checkpoint)
from ..config import RESUMABLE, TrainConfig
from ..data import ImageSet
from ..distributed import SINGLE, World
from ..errors import UserError
from ..files import sha256_file
from ..guard import UpdateGuard
from ..models import build_nets
from .stages import EMA, STAGES, TrainState, freeze_d, make_optimizers

log = logging.getLogger("aegan_fast.training")


class Diverged(Exception):
    """The run keeps producing non-finite values: go back to the last good checkpoint."""


# --------------------------------------------------------------------------- making a state

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


def run_nets(cfg: TrainConfig):
    """The nets a run of cfg trains and its checkpoints hold: models.build_nets, with D_AE when stage 1
    has its adversarial term."""
    return build_nets(cfg.model, ae_discriminator=cfg.ae_adv_weight > 0)


def init_tensors(nets, init: "InitSource") -> dict:
    """The source's net tensors for this run's nets. D_AE, a judge of stage 1 alone, may be in one and
    not the other: a source's D_AE this run has no use for is left out, and a D_AE the source lacks
    starts fresh (each said in a log line)."""
    tensors = dict(init.nets)
    had = [k for k in tensors if k.startswith("D_AE.")]
    if "D_AE" not in nets and had:
        log.info("--init-from %s: its D_AE is not used (this run has no --ae-adv-weight)", init.path)
        for k in had:
            del tensors[k]
    elif "D_AE" in nets and not had:
        log.info("--init-from %s has no D_AE (trained without --ae-adv-weight): D_AE starts fresh", init.path)
        tensors |= {f"D_AE.{k}": v for k, v in nets["D_AE"].state_dict().items()}
    return tensors


def new_state(cfg: TrainConfig, data: ImageSet, device, world: World = SINGLE, *, fused_adam: bool = True,
              guard: bool = True, init: "InitSource | None" = None) -> TrainState:
    """Fresh nets and optimizers, the nets seeded from cfg.seed (the same on every rank), in cfg's
    precision: the one way a run, a benchmark or a test sets up training. ``fused_adam=False`` and
    ``guard=False`` give plain torch's Adam and no non-finite guard (the benchmarks' reference).
    ``init``: the nets (and EMA) start from that checkpoint's, cfg.freeze_d of D's blocks frozen;
    counters, optimizers and RNGs are new all the same."""
    device = torch.device(device)
    data_gen = seed_everything(cfg.seed)
    precision = step_precision(cfg, device)
    nets = run_nets(cfg)
    if init is not None:
        load_state_strict(nets, init_tensors(nets, init), f"--init-from {init.path}")
    nets = precision.prepare(nets.to(device))
    freeze_d(nets, cfg.freeze_d)
    if world.rank:
        data_gen = seed_everything(rank_seed(cfg.seed, world.rank))
    st = TrainState(cfg, nets, make_optimizers(nets, cfg, fused=fused_adam), data, data_gen, device, precision,
                    precision.grad_scaler(), world=world, guard=UpdateGuard(device, cfg.grad_bucket_mb) if guard else None,
                    augment=augment.from_config(cfg, device))
    st.counters["stage"] = cfg.stages[0]
    # The source's EMA only where the run's first stage averages the chain: a run that retrains the
    # autoencoder first starts its EMA from the nets it has then, as every run does.
    if init is not None and init.ema and STAGES[cfg.stages[0]].ema and cfg.ema_kimg > 0:
        st.ema = EMA(st.nets, cfg.ema_kimg)
        for name, sd in init.ema.items():
            load_state_strict(st.ema.nets[name], sd, f"--init-from {init.path}: EMA {name}")
    return st


# --------------------------------------------------------------------------- RNG states

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


# --------------------------------------------------------------------------- writing

def split_record(data: ImageSet) -> dict:
    """What a checkpoint records of the data's split: the loader's order indexes the training rows."""
    return {"count": len(data.whole), "holdout": data.holdout}


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
        # each rank's r_t sums since the last adjustment are its own (p is the same on every rank)
        ranks = distributed.gather_objects({"rng": rng_state(st.data_gen), "loader": loader.state_dict(),
                                            "augment": augment.state_dict(st.augment)})
    failure, path, error = None, None, None
    if world.main:
        try:
            path = save_checkpoint(run_dir, name, {
                "config": st.cfg.to_dict(), "nets": st.nets.state_dict(),
                "opts": {k: o.state_dict() for k, o in st.opts.items()},
                "ema": st.ema.state_dict() if st.ema is not None else None,
                "counters": dict(st.counters), "rng": rng_state(st.data_gen), "loader": loader.state_dict(),
                "ranks": ranks, "world_size": world.size, "health": {"lr_scale": st.lr_scale, "rollbacks": st.rollbacks},
                "data": split_record(st.data), "augment": augment.state_dict(st.augment)},
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


# --------------------------------------------------------------------------- reading

def saved_config(run_dir: Path) -> TrainConfig:
    """The config of a run's latest checkpoint (what --resume continues)."""
    return TrainConfig.from_dict(load_for_resume(run_dir)[0]["config"])


def check_same_run(saved: dict, cfg: TrainConfig) -> None:
    """A resumed run trains what its checkpoint says: a field outside RESUMABLE that differs is an error."""
    differ = config_mismatch(TrainConfig.from_dict(saved).to_dict(), cfg.to_dict(), ignore=RESUMABLE)
    if differ:
        raise UserError(f"this config differs from the run's checkpoint ({'; '.join(differ)}); a resumed run "
                        f"keeps its config (only {', '.join(RESUMABLE)} may change)")


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
    augment.load_state_dict(st.augment, state.get("augment"))
    if st.world.distributed and ranks is not None and len(ranks) == st.world.size:
        set_rng_state(ranks[st.world.rank]["rng"], st.data_gen)
        augment.load_state_dict(st.augment, ranks[st.world.rank].get("augment"))
    elif st.world.rank:
        # another world size: this rank's draws restart from a seed of (seed, rank, step)
        st.data_gen = seed_everything(rank_seed(st.cfg.seed + st.counters["step"], st.world.rank))
    else:
        set_rng_state(state["rng"], st.data_gen)
    if st.guard is not None:
        st.guard.reset()


def loader_state_of(state: dict | None, world: World) -> dict | None:
    """This rank's loader position in a checkpoint (None: start the loader from the counters)."""
    if not state:
        return None
    ranks = state.get("ranks")
    if world.distributed and ranks is not None and len(ranks) == world.size:
        return ranks[world.rank]["loader"]
    return state.get("loader") if not world.distributed else None


def _training_config(state, path) -> TrainConfig:
    """The config of a loaded checkpoint, or a UserError when the file is not a training checkpoint."""
    if not isinstance(state, dict) or "config" not in state or "nets" not in state:
        raise UserError(f"{path} is not an aegan_fast training checkpoint (no config and nets in it)")
    return TrainConfig.from_dict(state["config"])


@dataclass
class InitSource:
    """What a fine-tuning run starts from: a checkpoint's nets, EMA nets and config, and its file."""
    path: Path
    sha256: str
    config: TrainConfig
    nets: dict
    ema: dict | None


def read_init_source(path: str | Path, sha256: str | None = None) -> InitSource:
    """The checkpoint a run directory samples from (its ``sampling`` pointer, else its latest:
    checkpoint.resolve_checkpoint), or a checkpoint file; ``sha256``, when given, must be its digest."""
    ckpt = resolve_checkpoint(path)
    digest = sha256_file(ckpt)
    if sha256 is not None and digest != sha256.lower():
        raise UserError(f"--init-from {ckpt} has sha256 {digest}, not the {sha256} this run was started from")
    state = load_checkpoint(ckpt)
    cfg = _training_config(state, ckpt)
    # nets its own config describes must take its tensors: a foreign file fails here, before any run exists
    load_state_strict(run_nets(cfg), state["nets"], f"--init-from {ckpt}")
    return InitSource(ckpt.resolve(), digest, cfg, state["nets"], state.get("ema"))


def load_sampling_nets(path: str | Path, device="cpu", use_ema: bool = True):
    """(config, nets in eval mode) from a checkpoint file, or from a run directory's sampling default
    (checkpoint.load_for_sampling says which file), EMA weights when present."""
    state, ckpt = load_for_sampling(path, map_location=device)
    cfg = _training_config(state, path)
    nets = run_nets(cfg).to(device)
    load_state_strict(nets, state["nets"], f"nets of {path}")
    if "D_AE" in nets:  # stage 1's judge: nothing samples, evaluates or exports it
        del nets["D_AE"]
    if use_ema and state.get("ema"):
        for name, sd in state["ema"].items():
            load_state_strict(nets[name], sd, f"EMA {name} of {path}")
    return cfg, nets.eval()
