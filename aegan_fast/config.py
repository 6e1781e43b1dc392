"""Training configuration: one dataclass, three presets, command-line overrides on top.

The checkpoint's copy of the config is the run's one source: ``RUN_DIR/config.json`` is written from
the same dict for people to read, and a resumed run takes the checkpoint's config (only the fields in
RESUMABLE, where and how a run executes, may change then).

Every field is a command-line flag, derived from the dataclasses by ``add_config_arguments`` (one
loop over ``dataclasses.fields``): ``--batch 8``, ``--model.resolution 128``, ``--kimg ae=5 embed=2``,
``--betas 0.5 0.99``, ``--ema-kimg 0``, ``--model.denoiser/--no-model.denoiser``. A field's help is
the comment beside (or above) it in this file or models.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import typing
from dataclasses import dataclass, field

from .models import ModelConfig

STAGES = ("ae", "embed", "finetune")  # the AEGAN stages, in order (training/stages.py has "direct" too)
LOSSES = ("bce", "hinge", "lsgan")
# Where and how a run executes, not what it trains: these may differ when a run is resumed.
RESUMABLE = ("ops", "device", "loader", "loader_workers", "data_cache_mb", "precision", "channels_last", "compile",
             "sync_bn", "grad_bucket_mb", "collective_timeout_s", "ckpt_keep", "max_bad_steps", "rollback_lr_scale",
             "max_rollbacks", "ckpt_every_kimg", "sample_every_kimg", "log_every_steps")


@dataclass
class TrainConfig:
    preset: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: int = 16                 # images per step over all processes (per process ≥ 2: BatchNorm)
    # Stages run in order: ae, embed, finetune (AEGAN) or direct (the baseline GAN on pixels).
    stages: tuple[str, ...] = STAGES
    # Length of each stage in thousands of real images shown.
    kimg: dict[str, float] = field(default_factory=lambda: {"ae": 10.0, "embed": 10.0, "finetune": 2.0})
    # A stage also ends after this many minutes of its training steps (grids, checkpoints and
    # evaluations not counted), whichever comes first; a stage not named has no time limit.
    minutes: dict[str, float] = field(default_factory=dict)
    # Adam learning rates per net; betas shared (paper: 0.5, 0.999).
    lr: dict[str, float] = field(default_factory=lambda: {"H": 1e-5, "F": 1e-5, "G_E": 2e-4, "D_E": 2e-4,
                                                          "phi": 2e-4, "D_R": 2e-4})
    betas: tuple[float, float] = (0.5, 0.999)
    loss: str = "bce"               # adversarial loss: bce | hinge | lsgan
    # R1 penalty weight γ per discriminator, e.g. D_E=1 D_R=10: D's loss + γ/2 · E‖∇D(real)‖²
    # (beyond the paper; absent or 0: off). A double backward through D: about 1.3× a step's time.
    r1_gamma: dict[str, float] = field(default_factory=dict)
    # R1 on one training step in this many, weighted by this many (StyleGAN2's lazy regularisation:
    # the same average penalty at a sixteenth of its cost); 1: every step.
    r1_every: int = 16
    # Differentiable augmentation of a discriminator's inputs, real and fake alike (beyond the paper;
    # absent: off), e.g. D_R=diffaugment D_E=translation_reflect,cutout: comma-separated ops (brightness,
    # saturation, contrast, translation, translation_reflect, cutout, xflip, rot90, scale, rotation) or
    # policies (diffaugment, color, geometric); see aegan_fast/augment.py.
    augment: dict[str, str] = field(default_factory=dict)
    # Probability each augmentation op is applied to a sample: a fixed number in [0, 1], or adaptive
    # (ADA: from 0, raised while E[sign(D(real))] is above --augment-target, lowered while below).
    augment_p: str = "adaptive"
    augment_target: float = 0.6     # adaptive p: the E[sign(D(real))] it steers to (ADA's 0.6)
    augment_interval: int = 4       # adaptive p: a discriminator's steps between adjustments of its p
    # Adaptive p: thousands of real images over which p can go from 0 to 1 (ADA's 500 scaled to runs
    # of tens of kimg: the demo's stage 3 can take D_R's p to its cap).
    augment_speed_kimg: float = 10.0
    augment_cap: float = 0.8        # adaptive p never goes above this (ADA: ops start to leak near 0.8)
    denoiser_l1: float = 100.0      # φ loss = adversarial + denoiser_l1 × L1(φ(x̂), x̂)
    embed_steps: int = 1            # G_E/D_E steps per φ/D_R step in stage 2 (the paper alternates 1:1)
    # Stage 1's rates fall along a cosine to this fraction of their value at the stage's end
    # (1: constant, as in the paper; beyond the paper below 1).
    ae_lr_final: float = 1.0
    # Stage 1's adversarial term (beyond the paper; VQGAN's autoencoders train so): once
    # ae_adv_start_kimg of the stage have passed, H and F minimise L1 + this weight × the hinge loss
    # of D_AE, a patch discriminator trained alongside on x against F(H(x)) at --lr D_AE=LR (default:
    # D_R's rate). 0: off, no D_AE (L1 alone, as in the paper); off until measured.
    ae_adv_weight: float = 0.0
    ae_adv_start_kimg: float = 20.0  # kimg of stage 1 on L1 alone before D_AE and its term start
    embed_cache_mb: float = 2048    # cache H(x) of the whole set (and mirrors) in stages 2-3 up to this size
    # Stage 3 (joint fine-tuning, our design; see README "Stage 3"):
    finetune_lr_scale: float = 0.1  # every net's lr is scaled by this in stage 3
    finetune_rec: float = 10.0      # weight of L1(F(H(x)), x), keeps F a decoder of real embeddings
    finetune_embed_adv: float = 1.0  # weight of D_E's adversarial term on G_E(z)
    ema_kimg: float = 0.0           # half-life of the sampling chain's EMA in kimg; 0 = off
    seed: int = 0                   # seeds nets, data order, z and dropout: a run is a function of its config
    sample_every_kimg: float = 2.0  # sample grids every this many kimg of a stage (0: only at its end)
    ckpt_every_kimg: float = 5.0    # periodic checkpoints every this many kimg (0: only at stage ends)
    ckpt_keep: int = 3              # periodic checkpoints kept (the newest; stage-end ones are all kept)
    # A run whose steps skip non-finite updates this many steps in a row goes back to its last good
    # checkpoint, its learning rates scaled by rollback_lr_scale, at most max_rollbacks times.
    max_bad_steps: int = 8
    rollback_lr_scale: float = 0.5
    max_rollbacks: int = 3
    log_every_steps: int = 20       # a metrics.jsonl row (and the only host sync) every this many steps
    grid_size: int = 64              # images in each sample grid (fixed z)
    eval_metrics: tuple[str, ...] = ("swd", "msssim")  # cheap metrics of the sampling chain at each stage end
    eval_n: int = 256                # images per set for those metrics
    ops: str = "auto"               # fused-op backend: auto | reference | cpp | cuda | triton
    device: str = "auto"            # cpu, cuda, cuda:1, ... (auto: cuda when available)
    # Activations' dtype in a step: auto (bf16 where the device has native bf16, else fp32) | fp32 |
    # bf16 | fp16 (GPU only). Weights, Adam state, BN statistics, losses and EMA stay fp32 (precision.py).
    precision: str = "auto"
    channels_last: bool | None = None  # activations and weights in channels_last (default: with bf16/fp16)
    compile: str = "auto"           # torch.compile each net's forward: on | off | auto (where measured faster)
    sync_bn: bool = False           # under torchrun: BatchNorm statistics over the global batch, not each rank's
    # under torchrun: each optimizer phase averages its gradients in one all-reduce after its backward (0),
    # or in buckets of this many MiB, each sent while the backward computes the rest (the same bits on 2
    # ranks). 0 by default: on CPUs gloo's copies take the very cores the backward needs, and buckets
    # were slower (bench/RESULTS.md, "Gradient buckets"); for NCCL on GPUs, where overlap usually pays, unmeasured.
    grad_bucket_mb: float = 0.0
    collective_timeout_s: float = 1800.0  # under torchrun: a rank that waits this long on the others fails
    data: str | None = None          # prepared set, or folder/zip/tar of images (default: the built-in emoji set)
    # Fine-tuning: a new run (its own counters, optimizers and held-out split) whose nets, and EMA nets
    # when the source kept them, start from this checkpoint file or run directory (the checkpoint it
    # samples from); the trainer records the file used here.
    init_from: str | None = None
    init_from_sha256: str | None = None  # the sha256 the init_from file must have (the trainer records it)
    # Keep the first N blocks of D_E and of D_R as init_from loaded them (the stylegan2-ada transfer
    # recipe): a block is one of a discriminator's convolutions before its logit conv, with the
    # BatchNorm and activation after it, counted from the input (D_R: log2(R)-1 blocks; D_E: log2(R)-4,
    # so 2 at R=64); their weights never change, their BatchNorms still normalise by batch statistics.
    freeze_d: int = 0
    loader: str = "auto"             # auto | torch | dali (aegan_fast/data/loaders.py)
    # Loader threads (torch) or DALI CPU threads; unset: none for the torch loader on a CPU device
    # (their OpenMP teams contend with the step's threads), else 2 (data/loaders.py, loader_threads).
    loader_workers: int | None = None
    data_cache_mb: float = 4096      # read a prepared set into RAM up to this size, else memory-map it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d["model"])
        d["betas"] = tuple(d["betas"])
        d["eval_metrics"] = tuple(d.get("eval_metrics", ()))
        d["stages"] = tuple(d.get("stages", STAGES))  # checkpoints from before stages were a field
        d.setdefault("r1_every", 1)  # runs from before lazy R1 took the penalty every step
        return cls(**d)

    def save(self, path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


PRESETS = ("demo", "demo128", "paper")


def preset(name: str) -> TrainConfig:
    """demo: R=64, sized to finish all three stages in about 10 minutes on 2 CPU cores.
    demo128: the demo's recipe at R=128 (an 8×8 embedding), well inside 30 minutes there.
    paper: the paper's hyperparameters at R=512 (stage lengths are ours: the paper gives none)."""
    if name == "demo128":
        cfg = preset("demo")
        cfg.preset = "demo128"
        cfg.model.resolution = 128
        # An image costs 3.8× the demo's in stage 1, 7× in stage 2 (G_E and D_E work on 8×8
        # embeddings) and 3.9× in stage 3, so the stages are shorter in kimg and the embedding stage
        # keeps a larger share of the minutes: 18.6 min on 2 cores without AMX (bench/RESULTS.md,
        # "A second resolution").
        cfg.kimg = {"ae": 20.0, "embed": 12.0, "finetune": 4.0}
        cfg.sample_every_kimg = cfg.ckpt_every_kimg = 4.0
        return cfg
    if name == "demo":
        return TrainConfig(
            preset="demo",
            # Beyond the paper, each measured in bench/RESULTS.md ("A demo that convinces", issue 13):
            # no φ (at R=64 it made samples worse in every run, fair 3-seed test included), resize+conv
            # upsampling (no stride-2 dot pattern) and stage 1 ending on a cosine rate decay.
            model=ModelConfig(resolution=64, max_channels=128, denoiser=False, upsample="resize_conv"),
            batch=32,
            # 100 kimg in all: sized for the README's time on 2 CPU cores (measured: bench/RESULTS.md,
            # "A demo that convinces").
            kimg={"ae": 60.0, "embed": 32.0, "finetune": 8.0},
            # Stage 3's reconstruction tie at 100, not the default 10: F keeps its PSNR and the samples are
            # better (bench/RESULTS.md, "A demo that convinces").
            finetune_rec=100.0,
            embed_steps=4,
            # The paper's 1e-5 for the autoencoder needs hundreds of kimg; the demo has a few dozen.
            lr={"H": 1e-3, "F": 1e-3, "G_E": 2e-4, "D_E": 2e-4, "phi": 2e-4, "D_R": 2e-4},
            ae_lr_final=0.1,
            sample_every_kimg=10.0,
            ckpt_every_kimg=10.0,
            ema_kimg=0.5,
        )
    if name == "paper":
        return TrainConfig(
            preset="paper",
            model=ModelConfig(resolution=512),
            batch=16,
            kimg={"ae": 2000.0, "embed": 4000.0, "finetune": 1000.0},
            sample_every_kimg=50.0,
            ckpt_every_kimg=100.0,
            log_every_steps=50,
        )
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


# --------------------------------------------------------------------------- command line

def field_help(cls) -> dict[str, str]:
    """{field: its comment}: the comment at the end of the field's line, else the comment lines just
    above it. The comments stay where a reader of the dataclass sees them, and the CLI says the same."""
    helps, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"\s+#\s?(.*)", line):
            above.append(m.group(1))
        elif m := re.match(r"\s+(\w+):[^#]*?(?:#\s*(.*))?$", line):
            text = m.group(2) or " ".join(above)
            if text:
                helps[m.group(1)] = text.replace("%", "%%")
            above = []
        else:
            above = []
    return helps


def _key_value(value_type):
    def parse(text: str):
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
        return key, value_type(value)
    return parse


def _config_fields(cls, prefix: str = ""):
    """(dotted name, field, resolved type) of every leaf field; nested dataclasses get a prefix."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _config_fields(t, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, t, cls


NOT_FLAGS = ("preset",)  # set by --preset, which chooses the defaults every other flag overrides


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig/ModelConfig field, its type from the annotation. Unset flags leave the
    preset's value (default=SUPPRESS), so the namespace holds exactly what the user gave."""
    group = parser.add_argument_group("configuration (every TrainConfig / ModelConfig field)")
    helps = {}
    for name, f, t, cls in _config_fields(TrainConfig):
        if name in NOT_FLAGS:
            continue
        helps.setdefault(cls, field_help(cls))
        flag = "--" + name.replace("_", "-")
        kw = dict(dest=name, default=argparse.SUPPRESS, help=helps[cls].get(f.name))
        origin, args = typing.get_origin(t), typing.get_args(t)
        if t is bool or set(args) == {bool, type(None)}:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif origin is dict:
            group.add_argument(flag, nargs="+", type=_key_value(args[1]), metavar="KEY=VALUE", **kw)
        elif origin is tuple:
            group.add_argument(flag, nargs="+" if ... in args else len(args), type=args[0], **kw)
        elif args and type(None) in args:  # X | None
            group.add_argument(flag, type=next(a for a in args if a is not type(None)), **kw)
        else:
            group.add_argument(flag, type=t, **kw)


def dict_fields() -> set[str]:
    """Dotted names of the dict fields, whose flags give KEY=VALUE pairs merged into the preset's."""
    return {name for name, _, t, _ in _config_fields(TrainConfig) if typing.get_origin(t) is dict}


def config_overrides(ns: argparse.Namespace) -> dict:
    """{dotted field name: value} of the config flags the user gave."""
    names = {name for name, *_ in _config_fields(TrainConfig)} - set(NOT_FLAGS)
    return {k: v for k, v in vars(ns).items() if k in names}


def apply_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """Set each dotted field; dict fields are merged key by key (``--kimg ae=5`` keeps embed's)."""
    for name, value in overrides.items():
        *path, leaf = name.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        if isinstance(getattr(target, leaf), dict):
            getattr(target, leaf).update(dict(value))
        else:
            setattr(target, leaf, tuple(value) if isinstance(value, list) else value)
    return cfg
