"""``--compile on|off|auto``: torch.compile of each net's forward for training, parity-checked.

``auto`` is off: on the CPU a compiled step was measured slower than eager once its cold compile is
counted (the step is convolutions, which inductor hands to the same oneDNN kernels; bench/RESULTS.md,
"Whole-step compile"), and on a GPU it is unmeasured, so off there too until a measurement says
otherwise.

The fused BatchNorm ops are torch.library custom ops with fakes, so dynamo traces through them
without a graph break. Compile modes (inductor with ``freezing=True``) have returned wrong outputs on
this model family: each compiled net's training-mode forward is compared with eager before the run
uses it.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import UserError
from .models import sample_z

log = logging.getLogger(__name__)

CHOICES = ("auto", "on", "off")
# Largest |compiled - eager| accepted on a net's output, per compute dtype (outputs are O(1)).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def wanted(choice: str, device: torch.device) -> tuple[bool, str]:
    """(compile?, why) for ``--compile``."""
    if choice == "on":
        return True, "--compile on"
    if choice == "off":
        return False, "--compile off"
    return False, f"auto: off on {device.type} (slower on the CPU including compile time; see aegan_fast/compiling.py)"


def example_inputs(cfg, device) -> dict[str, torch.Tensor]:
    """A batch of what each net reads, for the parity check."""
    m, n = cfg.model, cfg.batch
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.rand(n, 3, m.resolution, m.resolution, generator=g).to(device) * 2 - 1
    embeddings = torch.rand(n, m.embed_channels, m.embed_size, m.embed_size, generator=g).to(device) * 2 - 1
    z = sample_z(n, m.z_dim, g, device)
    inputs = {"H": images, "F": embeddings, "G_E": z, "D_E": embeddings, "phi": images, "D_R": images}
    if cfg.ae_adv_weight > 0:  # the run has stage 1's patch discriminator (run_state.run_nets)
        inputs["D_AE"] = images
    return inputs


@torch.no_grad()
def _train_mode_output(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """net(x) in training mode with its buffers and the RNG left as they were (BN statistics and
    dropout masks are part of what is compared, not of what the run keeps)."""
    saved = [b.clone() for b in net.buffers()]
    was_training = net.training
    net.train()
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(0)
            return net(x).float()
    finally:
        net.train(was_training)
        for b, s in zip(net.buffers(), saved):
            b.copy_(s)


def compile_nets(nets: nn.ModuleDict, inputs: dict, precision) -> None:
    """Compile every net's forward in place (state dict keys unchanged), after checking it against
    eager on ``inputs`` under the steps' precision; a net that differs is an error naming it."""
    tol = TOLERANCE[precision.dtype]
    for name, net in nets.items():
        if not any(True for _ in net.parameters()):
            continue  # φ as an identity (no denoiser): nothing to compile
        x = precision.activations(inputs[name])
        with precision.autocast():
            eager = _train_mode_output(net, x)
            net.compile(dynamic=False)
            compiled = _train_mode_output(net, x)
        err = (compiled - eager).abs().max().item()
        if not err <= tol:
            raise UserError(f"--compile: torch.compile of {name} differs from eager by {err:.3g} (> {tol}) "
                            f"under {precision.describe()}; train with --compile off")
        log.info("compiled %s (max |compiled - eager| %.2g)", name, err)
