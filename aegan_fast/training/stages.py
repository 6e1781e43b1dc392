"""One optimisation step of each training stage, and what each stage trains.

Stage 1, ``ae``: H and F learn to reconstruct real images (L1); with --ae-adv-weight, after a
  warm-up, also against D_AE, a patch discriminator judging F(H(x)) against x (VQGAN's recipe).
Stage 2, ``embed``: H and F frozen in eval mode. G_E learns to produce embeddings D_E cannot tell
  from real ones H(x); alternating with it, φ learns to turn x̂ = F(G_E(z)) (detached) into images
  D_R cannot tell from real ones, held near its input by 100 × L1(φ(x̂), x̂).
Stage 3, ``finetune`` (our design; the paper names the stage without a recipe): the sampling chain
  G_E → F → φ is trained end to end against D_R on its final output, so G_E and F learn what makes
  the *final* image realistic, not only the embedding. Three terms keep the parts coherent: D_E still
  judges G_E(z) against real embeddings (G_E stays on the embedding manifold); F keeps reconstructing
  real images from H(x) (F stays a decoder; H is frozen so that target does not drift); φ keeps its L1
  tie to x̂ (it stays a denoiser, not a second generator). All learning rates are scaled down.
Without a denoiser (``ModelConfig.denoiser=False``, an ablation) φ is an identity: stage 2 trains
  G_E/D_E only and stage 3 trains G_E → F against D_R.

Step functions return losses as detached tensors; the caller turns them into numbers only when it
logs, so a GPU step never waits on a host sync.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import augment, losses, precision
from ..distributed import SINGLE, World
from ..config import TrainConfig
from ..data import ImageSet
from ..models import SAMPLING_CHAIN, SamplingChain, build_nets, sample_z
from ..precision import FP32, Precision, backward_and_step



# Marks a parameter --freeze-d keeps as loaded: no stage turns its gradient on, no optimizer holds it.
FROZEN = "aegan_frozen"


def requires_grad(net: nn.Module, flag: bool) -> None:
    for p in net.parameters():
        p.requires_grad_(flag and not getattr(p, FROZEN, False))


FREEZABLE = ("D_E", "D_R")


def d_blocks(D: nn.Module) -> list[list[nn.Parameter]]:
    """A discriminator's blocks, from the input: each of its convolutions before the logit conv, with
    the layers after it up to the next conv (its BatchNorm and activation); --freeze-d counts these."""
    *body, _logit = D.net
    blocks: list[list[nn.Module]] = []
    for layer in body:
        first = layer[0] if isinstance(layer, nn.Sequential) else layer
        if isinstance(first, nn.Conv2d) or not blocks:
            blocks.append([])
        blocks[-1].append(layer)
    return [[p for m in block for p in m.parameters()] for block in blocks]


def d_block_counts(model) -> dict[str, int]:
    """{D_E: blocks, D_R: blocks} of nets of ``model`` (a ModelConfig), built on the meta device: no memory, no time."""
    with torch.device("meta"):
        nets = build_nets(model)
    return {name: len(d_blocks(nets[name])) for name in FREEZABLE}


def freeze_d(nets: nn.ModuleDict, n: int) -> None:
    """Mark the first n blocks of each discriminator frozen (before the optimizers are made)."""
    for name in FREEZABLE:
        for block in d_blocks(nets[name])[:n]:
            for p in block:
                setattr(p, FROZEN, True)
                p.requires_grad_(False)


# γ of each discriminator's R1 term in the step being taken (``take_step`` sets it from lazy_r1).
_r1_now: ContextVar[dict] = ContextVar("aegan_fast_r1_now", default={})


def lazy_r1(cfg: TrainConfig, step_index: int) -> dict[str, float]:
    """StyleGAN2's lazy regularisation: the R1 weight per discriminator in a stage's step
    ``step_index``: γ·r1_every on every r1_every-th step (all of that step's updates of D), none on
    the others, so the penalty's average weight is γ at 1/r1_every of its cost. A function of the
    stage's image counter, which checkpoints keep: a resumed run regularises the same steps."""
    if step_index % cfg.r1_every:
        return {}
    return {name: gamma * cfg.r1_every for name, gamma in cfg.r1_gamma.items() if gamma > 0}


def _r1(name: str) -> float:
    return _r1_now.get().get(name, 0.0)


def _d_step(D: nn.Module, opt, kind: str, real: torch.Tensor, fake: torch.Tensor, r1_gamma: float = 0.0) -> torch.Tensor:
    """One discriminator update; returns its loss (with the R1 term when r1_gamma > 0). Real and fake
    go through D's augmentation pipe alike (augment.py; the identity when off), each with its own draws."""
    requires_grad(D, True)
    aug = augment.pipe_for(D)
    real, fake = aug(real), aug(fake.detach())
    if r1_gamma > 0:
        # Fakes first: the penalty's graph keeps D's BatchNorm running statistics, which a later
        # training-mode forward would update in place before the backward.
        fake_logits = D(fake)
        # R1 at the augmented reals, the inputs D is trained on (StyleGAN2-ADA regularises augmented
        # reals too); the gradient is taken at D's input, so no double backward through the ops.
        real_logits, penalty = losses.r1_penalty(D, real)
        loss = losses.d_loss(kind, real_logits, fake_logits) + r1_gamma / 2 * penalty
    else:
        real_logits = D(real)
        loss = losses.d_loss(kind, real_logits, D(fake))
    aug.observe(real_logits.detach())  # r_t = E[sign(D(real))], what an adaptive p follows
    backward_and_step(loss, [opt])
    requires_grad(D, False)  # the generator's backward then skips D's weight gradients
    return loss.detach()


def _d_of(D: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """D's logits on a generator's output, through D's augmentation pipe (as D's own step sees fakes):
    the generator's gradient flows back through the ops."""
    return D(augment.pipe_for(D)(x))


@dataclass
class Batch:
    x: torch.Tensor          # real images in [-1, 1]
    idx: torch.Tensor        # their indices in the data set
    mirror: torch.Tensor     # which of them are flipped


def _fingerprint(net: nn.Module) -> tuple:
    """Which tensors net holds and how often each was written in place (torch's version counter:
    optimizer steps, load_state_dict's copies and BatchNorm's running statistics all count)."""
    return tuple((id(t), t._version) for t in (*net.parameters(), *net.buffers()))


class RealEmbeddings:
    """H(x) for stages 2 and 3, where H is frozen. When the embeddings of every image and its mirror
    fit in ``max_bytes`` they are computed once (H in eval mode is a pure function) and looked up:
    no H forward per step, and extra G_E/D_E steps cost almost nothing. Otherwise H runs per batch."""

    def __init__(self, H: nn.Module, data: ImageSet, generator: torch.Generator, device, embed_numel: int,
                 max_bytes: float, precision: Precision = FP32):
        self.H, self.data, self.generator, self.device = H, data, generator, device
        fits = 2 * len(data) * embed_numel * 4 <= max_bytes
        self.made_from = _fingerprint(H)
        # Encoded in fp32, kept in the steps' dtype and layout: D_E reads them with no cast per step.
        self.table = precision.activations(self._encode_all()) if fits else None

    def still_valid(self, H: nn.Module, data: ImageSet, generator: torch.Generator) -> bool:
        """Whether these are still H(x) of data: the same H, data and draws, and no weight or
        statistic of H written since (stage 3 after stage 2 reuses stage 2's, an 8-second encode
        of the demo's set in fp32; a rollback or a load writes H and so encodes afresh)."""
        return (H is self.H and data is self.data and generator is self.generator and not H.training
                and _fingerprint(H) == self.made_from)

    @torch.no_grad()
    def _encode_all(self, chunk: int = 256) -> torch.Tensor:
        parts = []
        for flipped in (False, True):
            for start in range(0, len(self.data), chunk):
                idx = torch.arange(start, min(start + chunk, len(self.data)))
                parts.append(self.H(self.data.gather(idx, torch.full_like(idx, flipped, dtype=torch.bool), self.device)))
        return torch.cat(parts)

    @torch.no_grad()
    def of(self, batch: Batch) -> torch.Tensor:
        if self.table is None:
            return self.H(batch.x)
        return self.table[(batch.mirror.long() * len(self.data) + batch.idx).to(self.table.device)]

    def random(self, n: int) -> torch.Tensor:
        idx, mirror = self.data.sample_indices(n, self.generator)
        x = self.data.gather(idx, mirror, self.device) if self.table is None else None
        if x is not None:
            x = precision.active().activations(x)
        return self.of(Batch(x, idx, mirror))


def ae_step(nets, opts, batch: Batch, emb: RealEmbeddings | None, cfg: TrainConfig) -> dict:
    rec = nets["F"](nets["H"](batch.x))
    loss = F.l1_loss(rec, batch.x)
    backward_and_step(loss, [opts["H"], opts["F"]])
    return {"ae_l1": loss.detach()}


# D_AE's loss, as VQGAN's: the hinge's generator term -D(x̂) is linear in the logits, so with D_AE
# spectrally normalised its gradient is bounded and a fixed weight (TrainConfig.ae_adv_weight) caps
# the push against L1. VQGAN's adaptive weight ‖∇L1‖/‖∇L_adv‖ at F's last layer would cost two more
# gradient passes a step and differ from rank to rank.
AE_ADV_LOSS = "hinge"


def ae_adversarial_step(nets, opts, batch: Batch, emb: RealEmbeddings | None, cfg: TrainConfig) -> dict:
    """Stage 1 after D_AE's warm-up: one update of D_AE on x against F(H(x)), then H and F on L1 plus
    ae_adv_weight × D_AE's verdict on their reconstruction."""
    rec = nets["F"](nets["H"](batch.x))
    d_ae = _d_step(nets["D_AE"], opts["D_AE"], AE_ADV_LOSS, batch.x, rec)
    l1 = F.l1_loss(rec, batch.x)
    adv = losses.g_loss(AE_ADV_LOSS, _d_of(nets["D_AE"], rec))
    backward_and_step(l1 + cfg.ae_adv_weight * adv, [opts["H"], opts["F"]])
    return {"ae_l1": l1.detach(), "D_AE": d_ae, "ae_adv": adv.detach()}


def _ae_step_now(cfg: TrainConfig, nets, stage_img: int) -> Callable:
    """Stage 1's step after stage_img images of it: L1 alone until D_AE (when the run has one) is warm."""
    if "D_AE" in nets and stage_img >= cfg.ae_adv_start_kimg * 1000:
        return ae_adversarial_step
    return ae_step


def embed_step(nets, opts, batch: Batch, emb: RealEmbeddings, cfg: TrainConfig) -> dict:
    n, device = batch.x.shape[0], batch.x.device
    # G_E/D_E may take several steps per φ step: they are cheap next to φ and D_R at image size.
    for k in range(cfg.embed_steps):
        e_real = emb.of(batch) if k == 0 else emb.random(n)
        e_fake = nets["G_E"](sample_z(n, cfg.model.z_dim, device=device))
        d_e = _d_step(nets["D_E"], opts["D_E"], cfg.loss, e_real, e_fake, _r1("D_E"))
        g_e = losses.g_loss(cfg.loss, _d_of(nets["D_E"], e_fake))
        backward_and_step(g_e, [opts["G_E"]])
    if not cfg.model.denoiser:
        return {"D_E": d_e, "G_E": g_e.detach()}

    with torch.no_grad():  # x̂ is detached: φ's loss must not reach G_E in this stage
        x_hat = nets["F"](e_fake)
    x_den = nets["phi"](x_hat)
    d_r = _d_step(nets["D_R"], opts["D_R"], cfg.loss, batch.x, x_den, _r1("D_R"))
    g_r = losses.g_loss(cfg.loss, _d_of(nets["D_R"], x_den))
    l1 = F.l1_loss(x_den, x_hat)
    backward_and_step(g_r + cfg.denoiser_l1 * l1, [opts["phi"]])
    return {"D_E": d_e, "G_E": g_e.detach(), "D_R": d_r, "phi_adv": g_r.detach(), "phi_l1": l1.detach()}


def finetune_step(nets, opts, batch: Batch, emb: RealEmbeddings, cfg: TrainConfig) -> dict:
    x = batch.x
    n = x.shape[0]
    e_real = emb.of(batch)
    e_fake = nets["G_E"](sample_z(n, cfg.model.z_dim, device=x.device))
    # One pass of F over fake and real embeddings, so its BatchNorm sees both in one batch.
    decoded = nets["F"](torch.cat([e_fake, e_real]))
    x_hat, x_rec = decoded[:n], decoded[n:]
    x_gen = nets["phi"](x_hat)
    fid = F.l1_loss(x_gen, x_hat.detach())

    d_e = _d_step(nets["D_E"], opts["D_E"], cfg.loss, e_real, e_fake, _r1("D_E"))
    d_r = _d_step(nets["D_R"], opts["D_R"], cfg.loss, x, x_gen, _r1("D_R"))

    adv = losses.g_loss(cfg.loss, _d_of(nets["D_R"], x_gen))
    adv_e = losses.g_loss(cfg.loss, _d_of(nets["D_E"], e_fake))
    rec = F.l1_loss(x_rec, x)
    loss = adv + cfg.finetune_embed_adv * adv_e + cfg.finetune_rec * rec
    logged = {"D_E": d_e, "D_R": d_r, "chain_adv": adv.detach(), "G_E": adv_e.detach(), "F_rec": rec.detach()}
    if cfg.model.denoiser:  # without one φ is the identity: no tie to log, nothing to train
        loss = loss + cfg.denoiser_l1 * fid
        logged["phi_l1"] = fid.detach()
    backward_and_step(loss, [opts[k] for k in SAMPLING_CHAIN if k in opts])
    return logged


def direct_gan_step(nets, opts, batch: Batch, emb: RealEmbeddings | None, cfg: TrainConfig) -> dict:
    """Not an AEGAN stage but trained like one: the baseline of bench/paper_claim.py. The same sampling chain G_E → F → φ
    trained from scratch as one generator, noise straight to pixels against D_R (no autoencoder, no
    embedding discriminator, no L1 ties): what the autoencoder bridge is measured against."""
    x = batch.x
    x_gen = SamplingChain.of(nets)(sample_z(x.shape[0], cfg.model.z_dim, device=x.device))
    d_r = _d_step(nets["D_R"], opts["D_R"], cfg.loss, x, x_gen, _r1("D_R"))
    adv = losses.g_loss(cfg.loss, _d_of(nets["D_R"], x_gen))
    backward_and_step(adv, [opts[k] for k in SAMPLING_CHAIN if k in opts])
    return {"D_R": d_r, "G_adv": adv.detach()}


class EMA:
    """Exponential moving average of the sampling chain (G_E, F, φ), by half-life in kimg.
    Buffers (BatchNorm running statistics) are copied, not averaged."""

    NETS = SAMPLING_CHAIN

    def __init__(self, nets: nn.ModuleDict, half_life_kimg: float):
        self.half_life_kimg = half_life_kimg
        self.nets = nn.ModuleDict({k: copy.deepcopy(nets[k]).eval() for k in self.NETS})
        requires_grad(self.nets, False)

    @torch.no_grad()
    def update(self, nets: nn.ModuleDict, batch: int) -> None:
        beta = 0.5 ** (batch / (self.half_life_kimg * 1000))
        for k in self.NETS:
            for p_ema, p in zip(self.nets[k].parameters(), nets[k].parameters()):
                p_ema.lerp_(p, 1 - beta)
            for b_ema, b in zip(self.nets[k].buffers(), nets[k].buffers()):
                b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {k: self.nets[k].state_dict() for k in self.NETS}

    def load_state_dict(self, state: dict) -> None:
        for k in self.NETS:
            self.nets[k].load_state_dict(state[k])


# --------------------------------------------------------------------------- stages as data

def _finetune_scale(cfg: TrainConfig) -> float:
    return cfg.finetune_lr_scale


def _chain_metrics(cfg: TrainConfig) -> tuple:
    return tuple(cfg.eval_metrics)


def _full_rate(cfg: TrainConfig) -> float:
    return 1.0


def _ae_final_rate(cfg: TrainConfig) -> float:
    return cfg.ae_lr_final


def _reconstruction_metrics(cfg: TrainConfig) -> tuple:
    return ("l1", "psnr")


@dataclass(frozen=True)
class Stage:
    """One training stage: everything the loop needs to know about it (stylegan2-ada's phases as a
    record). ``run_stage`` runs any of them; no code branches on a stage's name."""
    name: str
    step: Callable          # step(nets, opts, batch, emb, cfg) -> {loss name: detached tensor}
    trains: tuple           # nets in train mode with gradients
    frozen: tuple           # nets in eval mode, no gradients (the rest are idle: eval mode too)
    # Nets whose Adam moments are cleared when the stage starts (not on resume in its middle).
    fresh_optimizer: tuple = ()
    needs_embeddings: bool = True   # the step reads H(x) of real images (RealEmbeddings)
    lr_scale: Callable[[TrainConfig], float] = _full_rate
    # Nets trained here in another role than their own, and whose cfg.lr rate they take: a decoder
    # trained as part of a generator steps at the generator's rate, not the autoencoder's.
    lr_role: dict = field(default_factory=dict, hash=False)
    # The fraction of its rate each net has at the stage's end, reached along a cosine from 1 at its
    # start (progress: the larger of images and minutes done over the stage's length in each).
    final_rate: Callable[[TrainConfig], float] = _full_rate
    preview: str = "samples"        # grid kind: "reconstructions" (real | F(H(x))) or "samples" (the chain)
    metrics: Callable[[TrainConfig], tuple] = _chain_metrics   # evaluated at the stage's end
    ema: bool = True                # the sampling chain's EMA is updated after every step
    # When the step changes partway through the stage: (cfg, nets, images of the stage done) -> the
    # step to take now, in place of ``step``.
    step_now: Callable | None = None


# D_AE, in runs that have it (TrainConfig.ae_adv_weight), trains here only: later stages leave it idle.
AE = Stage("ae", ae_step, trains=("H", "F", "D_AE"), frozen=(), needs_embeddings=False, preview="reconstructions",
           metrics=_reconstruction_metrics, ema=False, final_rate=_ae_final_rate, step_now=_ae_step_now)
EMBED = Stage("embed", embed_step, trains=("G_E", "D_E", "phi", "D_R"), frozen=("H", "F"))
# F last stepped in stage 1, on reconstruction alone; its second moments are tiny next to stage 3's
# adversarial gradients, so the first stage-3 updates were many times the learning rate and wrecked
# the decoder (bench/RESULTS.md): stage 3 starts F's moments afresh.
# F keeps its own (autoencoder's) rate here: its loss is still dominated by the reconstruction tie
# (finetune_rec), and the stage scales every rate down.
FINETUNE = Stage("finetune", finetune_step, trains=("G_E", "F", "phi", "D_E", "D_R"), frozen=("H",),
                 fresh_optimizer=("F",), lr_scale=_finetune_scale)
# The baseline of bench/paper_claim.py: the chain from scratch against D_R; H and D_E sit idle. F is
# a generator layer here, so it steps at the generator's rate, as G_E and φ do.
DIRECT = Stage("direct", direct_gan_step, trains=SAMPLING_CHAIN + ("D_R",), frozen=("H", "D_E"),
               needs_embeddings=False, lr_role={"F": "G_E"})

AEGAN_STAGES = (AE, EMBED, FINETUNE)
STAGES = {s.name: s for s in AEGAN_STAGES + (DIRECT,)}


@dataclass
class TrainState:
    """What a run trains and where it stands; the trainer checkpoints all of it."""
    cfg: TrainConfig
    nets: nn.ModuleDict
    opts: dict
    data: ImageSet
    data_gen: torch.Generator       # real embeddings drawn at random (stage 2's extra G_E/D_E steps)
    device: torch.device
    precision: Precision = FP32     # the steps' dtype and layout (precision.py)
    grad_scaler: object = None      # fp16 only: torch.amp.GradScaler
    # Images are counted over all ranks: stage_img and total_img are the global batch's.
    # stage_s: seconds of training steps in the current stage (a --minutes budget ends it; resumes keep it)
    counters: dict = field(default_factory=lambda: {"stage": None, "stage_img": 0, "stage_s": 0.0, "total_img": 0,
                                                    "step": 0})
    ema: EMA | None = None
    world: World = SINGLE
    guard: object = None            # guard.UpdateGuard: skips non-finite updates (the trainer's)
    lr_scale: float = 1.0           # lowered each time the run rolls back from a divergence
    rollbacks: int = 0
    augment: dict = field(default_factory=dict)  # {discriminator: augment.Pipe}; empty: no augmentation
    embeddings: RealEmbeddings | None = None      # the last stage's H(x), reused while still valid (not saved)

    def batch(self, x: torch.Tensor, idx: torch.Tensor, mirror: torch.Tensor) -> Batch:
        """A loader's (images, indices, mirror bits) as a step's Batch, images in the steps' dtype and layout."""
        return Batch(self.precision.activations(x), idx, mirror)


def make_optimizers(nets, cfg: TrainConfig, fused: bool = True) -> dict:
    """One Adam per net that has weights (φ is a weightless identity in the no-denoiser ablation).
    ``fused``: torch's one-kernel Adam (CPU and CUDA); the per-parameter loop it replaces cost ~10%
    of a stage-2 step on the CPU. Off gives plain torch's default, the benchmarks' reference. Parameters
    --freeze-d froze are left out: nothing can step them."""
    params = {name: [p for p in net.parameters() if not getattr(p, FROZEN, False)] for name, net in nets.items()}
    return {name: torch.optim.Adam(params[name], lr=net_rate(cfg, name), betas=cfg.betas, fused=fused or None)
            for name in nets if params[name]}


def net_rate(cfg: TrainConfig, name: str) -> float:
    """A net's rate in cfg.lr. D_AE, which only runs with --ae-adv-weight, takes D_R's (both judge
    images) unless --lr D_AE= gives its own: configs without it keep the rate table they always had."""
    return cfg.lr.get(name, cfg.lr["D_R"]) if name == "D_AE" else cfg.lr[name]


def prepare_stage(stage: Stage, nets: nn.ModuleDict, opts: dict, cfg: TrainConfig, lr_scale: float = 1.0) -> None:
    """Modes, frozen nets and learning rates for a stage (also on resume in the middle of one);
    ``lr_scale``: the run's own factor (lowered after a divergence)."""
    for name, net in nets.items():
        trained = name in stage.trains
        net.train(trained)  # frozen nets run in eval mode: BN uses running stats, no updates
        requires_grad(net, trained)
    for name, opt in opts.items():
        for group in opt.param_groups:
            group["lr"] = group["stage_lr"] = net_rate(cfg, stage.lr_role.get(name, name)) * stage.lr_scale(cfg) * lr_scale


def decay_rates(opts: dict, final: float, progress: float) -> None:
    """Each optimizer's rate at ``progress`` (0..1) of a stage: its stage rate times a cosine from 1
    down to ``final``. A function of the progress alone, so a resumed run steps at the same rates."""
    factor = final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    for opt in opts.values():
        for group in opt.param_groups:
            group["lr"] = group["stage_lr"] * factor


def start_stage(stage: Stage, opts: dict) -> None:
    """What happens once when a stage begins (not when a run resumes in the middle of one)."""
    for name in stage.fresh_optimizer:
        if name in opts:
            opts[name].state.clear()


def enter_stage(stage: Stage, st: TrainState) -> RealEmbeddings | None:
    """Get st ready for steps of stage: modes, rates, fresh moments at its start, the EMA from the
    first stage that runs one, and the real embeddings it reads."""
    cfg = st.cfg
    prepare_stage(stage, st.nets, st.opts, cfg, st.lr_scale)
    if st.counters["stage_img"] == 0:
        start_stage(stage, st.opts)
    if st.ema is None and stage.ema and cfg.ema_kimg > 0:
        st.ema = EMA(st.nets, cfg.ema_kimg)
    if not stage.needs_embeddings:
        return None
    if st.embeddings is None or not st.embeddings.still_valid(st.nets["H"], st.data, st.data_gen):
        st.embeddings = RealEmbeddings(st.nets["H"], st.data, st.data_gen, st.device,
                                       cfg.model.embed_channels * cfg.model.embed_size ** 2,
                                       cfg.embed_cache_mb * 2 ** 20, st.precision)
    return st.embeddings


@contextlib.contextmanager
def _r1_applied(weights: dict[str, float]):
    token = _r1_now.set(weights)
    try:
        yield
    finally:
        _r1_now.reset(token)


def take_step(stage: Stage, st: TrainState, batch: Batch, emb: RealEmbeddings | None) -> dict:
    """One step of stage on batch, in st's precision, its non-finite updates skipped by st's guard:
    the trainer's step, and the one the benchmarks and tests time and check."""
    step = stage.step if stage.step_now is None else stage.step_now(st.cfg, st.nets, st.counters["stage_img"])
    r1 = lazy_r1(st.cfg, st.counters["stage_img"] // st.cfg.batch) if st.cfg.r1_gamma else {}
    with precision.steps_in(st.precision, st.grad_scaler, st.guard), augment.applied(st.augment, st.nets), \
            _r1_applied(r1):
        losses = step(st.nets, st.opts, batch, emb, st.cfg)
    if st.guard is not None:
        st.guard.end_step()
    return losses


def run_stage(stage: Stage, st: TrainState, batches, until_img: int, after_step=None,
              until_s: float = math.inf) -> bool:
    """Steps of stage on batches (an iterator of (x, idx, mirror)) until st.counters["stage_img"]
    reaches until_img, or the stage's training time st.counters["stage_s"] reaches until_s.
    ``after_step(losses, before_img, data_s)`` runs after each step (logging, grids, checkpoints)
    and is not training time; it returns True to stop here. Returns whether after_step stopped it.
    Losses stay tensors: nothing here waits on the device (so on CUDA a step's time is its host
    time, and a time budget is met to within the queue of launched steps)."""
    emb = enter_stage(stage, st)
    ema = st.ema if stage.ema else None
    c = st.counters
    c["stage"] = stage.name
    c.setdefault("stage_s", 0.0)  # checkpoints from before the time budget
    final = stage.final_rate(st.cfg)
    while c["stage_img"] < until_img and c["stage_s"] < until_s:
        if final != 1.0:
            decay_rates({k: st.opts[k] for k in stage.trains if k in st.opts}, final,
                        max(c["stage_img"] / until_img, c["stage_s"] / until_s))
        t0 = time.perf_counter()
        batch = st.batch(*next(batches))
        data_s = time.perf_counter() - t0
        losses = take_step(stage, st, batch, emb)
        shown = batch.x.shape[0] * st.world.size
        if ema is not None:
            ema.update(st.nets, shown)
        before = c["stage_img"]
        c["stage_img"] += shown
        c["total_img"] += shown
        c["step"] += 1
        c["stage_s"] += time.perf_counter() - t0
        if after_step is not None and after_step(losses, before, data_s):
            return True
    return False
