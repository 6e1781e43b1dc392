"""Training configuration: one dataclass, two presets, command-line overrides on top.

The resolved config is written to ``RUN_DIR/config.json`` and is all a run needs to be resumed or
sampled from.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .models import ModelConfig

STAGES = ("ae", "embed", "finetune")
LOSSES = ("bce", "hinge", "lsgan")


@dataclass
class TrainConfig:
    preset: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: int = 16
    # Length of each stage in thousands of real images shown.
    kimg: dict = field(default_factory=lambda: {"ae": 10.0, "embed": 10.0, "finetune": 2.0})
    # Adam learning rates per net; betas shared (paper: 0.5, 0.999).
    lr: dict = field(default_factory=lambda: {"H": 1e-5, "F": 1e-5, "G_E": 2e-4, "D_E": 2e-4,
                                              "phi": 2e-4, "D_R": 2e-4})
    betas: tuple = (0.5, 0.999)
    loss: str = "bce"               # adversarial loss: bce | hinge | lsgan
    denoiser_l1: float = 100.0      # φ loss = adversarial + denoiser_l1 × L1(φ(x̂), x̂)
    embed_steps: int = 1            # G_E/D_E steps per φ/D_R step in stage 2 (the paper alternates 1:1)
    embed_cache_mb: float = 2048    # cache H(x) of the whole set (and mirrors) in stages 2-3 up to this size
    # Stage 3 (joint fine-tuning, our design; see README "Stage 3"):
    finetune_lr_scale: float = 0.1  # every net's lr is scaled by this in stage 3
    finetune_rec: float = 10.0      # weight of L1(F(H(x)), x), keeps F a decoder of real embeddings
    finetune_embed_adv: float = 1.0  # weight of D_E's adversarial term on G_E(z)
    ema_kimg: float = 0.0           # half-life of the sampling chain's EMA in kimg; 0 = off
    seed: int = 0
    sample_every_kimg: float = 2.0
    ckpt_every_kimg: float = 5.0
    log_every_steps: int = 20
    grid_size: int = 64              # images in each sample grid (fixed z)
    eval_metrics: tuple = ("swd", "msssim")  # cheap metrics of the sampling chain at each stage end
    eval_n: int = 256                # images per set for those metrics
    ops: str = "auto"
    device: str = "auto"
    data: str | None = None          # None: the built-in emoji set
    loader: str = "auto"             # auto | torch | dali (aegan_fast/data/loaders.py)
    loader_workers: int = 2          # loader threads (torch) or DALI CPU threads
    data_cache_mb: float = 4096      # read a prepared set into RAM up to this size, else memory-map it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig(**d["model"])
        d["betas"] = tuple(d["betas"])
        d["eval_metrics"] = tuple(d.get("eval_metrics", ()))
        return cls(**d)

    def save(self, path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def preset(name: str) -> TrainConfig:
    """demo: R=64, sized to finish all three stages in about 10 minutes on 2 CPU cores.
    paper: DESIGN §1 hyperparameters at R=512 (stage lengths are ours: the paper gives none)."""
    if name == "demo":
        return TrainConfig(
            preset="demo",
            # φ and D_R at width ≤128 cost 60% of their 512-wide FLOPs at R=64 and train as well here.
            model=ModelConfig(resolution=64, max_channels=128),
            batch=32,
            kimg={"ae": 10.0, "embed": 8.0, "finetune": 2.0},
            embed_steps=4,
            # The paper's 1e-5 for the autoencoder needs hundreds of kimg; the demo has a dozen.
            lr={"H": 1e-3, "F": 1e-3, "G_E": 2e-4, "D_E": 2e-4, "phi": 2e-4, "D_R": 2e-4},
            sample_every_kimg=2.0,
            ckpt_every_kimg=2.0,
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
    raise ValueError(f"unknown preset {name!r}; choose demo or paper")
