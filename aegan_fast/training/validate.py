"""What a training config must satisfy before anything is made: each rule one clear UserError.

The trainer checks again what the command line checked, so a config built in Python (an experiment,
a test) meets the same rules."""
from __future__ import annotations

from .. import augment, compiling, ops
from .. import precision as precisions
from ..config import LOSSES, TrainConfig
from ..data import LOADERS
from ..distributed import World
from ..errors import UserError
from ..models import check_resolution, check_upsample
from .stages import STAGES as STAGE_RECORDS
from .stages import d_block_counts


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
                     "--ema-kimg": cfg.ema_kimg, "--loader-workers": cfg.loader_workers or 0,
                     "--max-rollbacks": cfg.max_rollbacks, "--embed-cache-mb": cfg.embed_cache_mb,
                     "--data-cache-mb": cfg.data_cache_mb, "--grad-bucket-mb": cfg.grad_bucket_mb}
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
        if key not in ("H", "F", "G_E", "D_E", "phi", "D_R", "D_AE"):
            raise UserError(f"--lr: unknown net {key!r}; choose from H, F, G_E, D_E, phi, D_R, D_AE")
    check_ae_adversarial(cfg)
    for key, gamma in cfg.r1_gamma.items():
        if key not in ("D_E", "D_R"):
            raise UserError(f"--r1-gamma: {key!r} is not a discriminator; choose D_E or D_R (e.g. --r1-gamma D_E=1)")
        if not gamma >= 0:
            raise UserError(f"--r1-gamma {key} must be ≥ 0 (0: off), got {gamma}")
    if isinstance(cfg.r1_every, bool) or not isinstance(cfg.r1_every, int) or cfg.r1_every < 1:
        raise UserError(f"--r1-every must be a whole number ≥ 1 (1: R1 on every step), got {cfg.r1_every!r}")
    if cfg.sync_bn and any(g > 0 for g in cfg.r1_gamma.values()):
        raise UserError("--r1-gamma with --sync-bn: the synchronised BatchNorm has no double backward, which R1 needs; "
                        "drop one of them")
    if cfg.freeze_d:
        check_freeze_d(cfg)
    check_augment(cfg)
    for flag, value, choices in (("--loss", cfg.loss, LOSSES), ("--ops", cfg.ops, ("auto",) + ops.BACKENDS),
                                 ("--loader", cfg.loader, LOADERS), ("--precision", cfg.precision, precisions.PRECISIONS),
                                 ("--compile", cfg.compile, compiling.CHOICES)):
        if value not in choices:
            raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def check_augment(cfg: TrainConfig) -> None:
    for key, policy in cfg.augment.items():
        if key not in augment.NETS:
            raise UserError(f"--augment: {key!r} is not a discriminator; choose D_E or D_R (e.g. --augment D_R=diffaugment)")
        try:
            augment.parse_policy(policy)
        except ValueError as e:
            raise UserError(f"--augment {key}: {e}") from None
    try:
        augment.parse_p(cfg.augment_p)
    except ValueError as e:
        raise UserError(f"--augment-p {e}") from None
    if not 0 < cfg.augment_target < 1:
        raise UserError(f"--augment-target must be in (0, 1) (ADA: 0.6), got {cfg.augment_target}")
    if not 0 < cfg.augment_cap <= 1:
        raise UserError(f"--augment-cap must be in (0, 1], got {cfg.augment_cap}")
    for flag, value in (("--augment-interval", cfg.augment_interval), ("--augment-speed-kimg", cfg.augment_speed_kimg)):
        if not value > 0:
            raise UserError(f"{flag} must be > 0, got {value}")


def check_ae_adversarial(cfg: TrainConfig) -> None:
    if not 0 <= cfg.ae_adv_weight < float("inf"):
        raise UserError(f"--ae-adv-weight must be a finite number ≥ 0 (0: off), got {cfg.ae_adv_weight}")
    if not cfg.ae_adv_start_kimg >= 0:
        raise UserError(f"--ae-adv-start-kimg must be ≥ 0, got {cfg.ae_adv_start_kimg}")
    if cfg.ae_adv_weight == 0:
        return
    if "ae" not in cfg.stages:
        raise UserError(f"--ae-adv-weight trains D_AE in stage ae, which this run does not have "
                        f"(--stages {' '.join(cfg.stages)}); drop it or add the stage")
    if cfg.ae_adv_start_kimg >= cfg.kimg["ae"]:
        raise UserError(f"--ae-adv-start-kimg {cfg.ae_adv_start_kimg} is not before stage ae's end "
                        f"(--kimg ae={cfg.kimg['ae']}): the adversarial term would never start")


def check_freeze_d(cfg: TrainConfig) -> None:
    if cfg.freeze_d < 0:
        raise UserError(f"--freeze-d must be ≥ 0 (0: nothing frozen), got {cfg.freeze_d}")
    if not cfg.init_from:
        raise UserError("--freeze-d keeps discriminator blocks as a checkpoint trained them: it needs --init-from "
                        "(frozen blocks of a new discriminator would stay random)")
    counts = d_block_counts(cfg.model)
    fewest = min(counts, key=counts.get)
    if cfg.freeze_d > counts[fewest]:
        raise UserError(f"--freeze-d {cfg.freeze_d}: {fewest} has only {counts[fewest]} blocks at R="
                        f"{cfg.model.resolution} ({', '.join(f'{k} {v}' for k, v in counts.items())}); the logit "
                        f"conv is never frozen")


def check_world(cfg: TrainConfig, world: World) -> None:
    if cfg.batch % world.size:
        raise UserError(f"--batch {cfg.batch} is the global batch and must divide by the {world.size} processes "
                        f"(e.g. --batch {max(2, cfg.batch // world.size) * world.size})")
    if cfg.batch // world.size < 2:
        raise UserError(f"--batch {cfg.batch} over {world.size} processes leaves {cfg.batch // world.size} image per "
                        f"process; BatchNorm needs ≥ 2 (--batch {2 * world.size} or more)")
