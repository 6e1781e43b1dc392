"""One optimisation step of each training stage, and what each stage trains.

Stage 1, ``ae``: H and F learn to reconstruct real images (L1).
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

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .config import TrainConfig
from .data import ImageSet
from .models import SAMPLING_CHAIN, SamplingChain, sample_z

TRAINED = {"ae": ("H", "F"), "embed": ("G_E", "D_E", "phi", "D_R"),
           "finetune": ("G_E", "F", "phi", "D_E", "D_R")}
FROZEN = {"ae": (), "embed": ("H", "F"), "finetune": ("H",)}
# Nets whose Adam moments are cleared when a stage starts. F last stepped in stage 1, on
# reconstruction alone; its second moments are tiny next to stage 3's adversarial gradients, so the
# first stage-3 updates were many times the learning rate and wrecked the decoder (bench/RESULTS.md).
FRESH_OPTIMIZER = {"ae": (), "embed": (), "finetune": ("F",)}


def requires_grad(net: nn.Module, flag: bool) -> None:
    for p in net.parameters():
        p.requires_grad_(flag)


def prepare_stage(stage: str, nets: nn.ModuleDict, opts: dict, cfg: TrainConfig) -> None:
    """Modes, frozen nets and learning rates for a stage (also on resume in the middle of one)."""
    for name, net in nets.items():
        trained = name in TRAINED[stage]
        net.train(trained)  # frozen nets run in eval mode: BN uses running stats, no updates
        requires_grad(net, trained)
    scale = cfg.finetune_lr_scale if stage == "finetune" else 1.0
    for name, opt in opts.items():
        for group in opt.param_groups:
            group["lr"] = cfg.lr[name] * scale


def start_stage(stage: str, opts: dict) -> None:
    """What happens once when a stage begins (not when a run resumes in the middle of one)."""
    for name in FRESH_OPTIMIZER[stage]:
        if name in opts:
            opts[name].state.clear()


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    _step_together(loss, [opt])


def _step_together(loss: torch.Tensor, optimizers) -> None:
    """One backward of loss, then a step of every optimizer (the nets it trains jointly)."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()


def _d_step(D: nn.Module, opt, kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    requires_grad(D, True)
    loss = losses.d_loss(kind, D(real), D(fake.detach()))
    _step(opt, loss)
    requires_grad(D, False)  # the generator's backward then skips D's weight gradients
    return loss.detach()


@dataclass
class Batch:
    x: torch.Tensor          # real images in [-1, 1]
    idx: torch.Tensor        # their indices in the data set
    mirror: torch.Tensor     # which of them are flipped


class RealEmbeddings:
    """H(x) for stages 2 and 3, where H is frozen. When the embeddings of every image and its mirror
    fit in ``max_bytes`` they are computed once (H in eval mode is a pure function) and looked up:
    no H forward per step, and extra G_E/D_E steps cost almost nothing. Otherwise H runs per batch."""

    def __init__(self, H: nn.Module, data: ImageSet, generator: torch.Generator, device, embed_numel: int,
                 max_bytes: float):
        self.H, self.data, self.generator, self.device = H, data, generator, device
        fits = 2 * len(data) * embed_numel * 4 <= max_bytes
        self.table = self._encode_all() if fits else None

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
        return self.of(Batch(x, idx, mirror))


def ae_step(nets, opts, batch: Batch, emb: RealEmbeddings | None, cfg: TrainConfig) -> dict:
    rec = nets["F"](nets["H"](batch.x))
    loss = F.l1_loss(rec, batch.x)
    _step_together(loss, [opts["H"], opts["F"]])
    return {"ae_l1": loss.detach()}


def embed_step(nets, opts, batch: Batch, emb: RealEmbeddings, cfg: TrainConfig) -> dict:
    n, device = batch.x.shape[0], batch.x.device
    # G_E/D_E may take several steps per φ step: they are cheap next to φ and D_R at image size.
    for k in range(cfg.embed_steps):
        e_real = emb.of(batch) if k == 0 else emb.random(n)
        e_fake = nets["G_E"](sample_z(n, cfg.model.z_dim, device=device))
        d_e = _d_step(nets["D_E"], opts["D_E"], cfg.loss, e_real, e_fake)
        g_e = losses.g_loss(cfg.loss, nets["D_E"](e_fake))
        _step(opts["G_E"], g_e)
    if not cfg.model.denoiser:
        return {"D_E": d_e, "G_E": g_e.detach()}

    with torch.no_grad():  # x̂ is detached: φ's loss must not reach G_E in this stage
        x_hat = nets["F"](e_fake)
    x_den = nets["phi"](x_hat)
    d_r = _d_step(nets["D_R"], opts["D_R"], cfg.loss, batch.x, x_den)
    g_r = losses.g_loss(cfg.loss, nets["D_R"](x_den))
    l1 = F.l1_loss(x_den, x_hat)
    _step(opts["phi"], g_r + cfg.denoiser_l1 * l1)
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

    d_e = _d_step(nets["D_E"], opts["D_E"], cfg.loss, e_real, e_fake)
    d_r = _d_step(nets["D_R"], opts["D_R"], cfg.loss, x, x_gen)

    adv = losses.g_loss(cfg.loss, nets["D_R"](x_gen))
    adv_e = losses.g_loss(cfg.loss, nets["D_E"](e_fake))
    rec = F.l1_loss(x_rec, x)
    fid = F.l1_loss(x_gen, x_hat.detach())
    loss = adv + cfg.finetune_embed_adv * adv_e + cfg.finetune_rec * rec
    if cfg.model.denoiser:
        loss = loss + cfg.denoiser_l1 * fid
    _step_together(loss, [opts[k] for k in SAMPLING_CHAIN if k in opts])  # no φ optimizer without a denoiser
    return {"D_E": d_e, "D_R": d_r, "chain_adv": adv.detach(), "G_E": adv_e.detach(),
            "F_rec": rec.detach(), "phi_l1": fid.detach()}


STEPS = {"ae": ae_step, "embed": embed_step, "finetune": finetune_step}


def direct_gan_step(nets, opts, batch: Batch, emb: RealEmbeddings | None, cfg: TrainConfig) -> dict:
    """Not an AEGAN stage: the baseline of bench/paper_claim.py. The same sampling chain G_E → F → φ
    trained from scratch as one generator, noise straight to pixels against D_R (no autoencoder, no
    embedding discriminator, no L1 ties): what the autoencoder bridge is measured against."""
    x = batch.x
    x_gen = SamplingChain.of(nets)(sample_z(x.shape[0], cfg.model.z_dim, device=x.device))
    d_r = _d_step(nets["D_R"], opts["D_R"], cfg.loss, x, x_gen)
    adv = losses.g_loss(cfg.loss, nets["D_R"](x_gen))
    _step_together(adv, [opts[k] for k in SAMPLING_CHAIN if k in opts])
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
