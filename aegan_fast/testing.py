"""Helpers for the tests and the benchmarks of the sampling chain: weights that make its images vary,
and a reference forward that shares no code with aegan_fast.ops or the fold. In the package so that
tests/ and bench/ both import it without either importing the other; nothing in the library uses it."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from aegan_fast.models import SamplingChain
from aegan_fast.ops import BatchNormAct2d, BatchNormAddAct2d


def lively_weights(nets: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw weights in place so images fill [-1, 1] without saturating (convs N(0, 1/fan_in),
    non-trivial BatchNorm statistics and affines): at the DCGAN init N(0, 0.02) the chain's output is
    ~0.005 and any error bound would be vacuous. For ``build_nets``' nets the running statistics are
    then measured on a batch (and jittered), so each layer sees about unit variance in eval mode and
    the images depend on z: with drawn statistics φ's 1×1 bottleneck went dead and every z gave the
    same image (to 1e-4). For parity tests and benchmarks, not training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in nets.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                w = m.weight
                fan_in = w[0].numel() if isinstance(m, nn.Conv2d) else w.shape[0] * w[0, 0].numel() / 4
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    if isinstance(nets, nn.ModuleDict) and {"G_E", "F", "phi", "H", "D_E", "D_R"} <= set(nets.keys()):
        _measure_statistics(nets, g)
    return nets


@torch.no_grad()
def _measure_statistics(nets: nn.ModuleDict, g: torch.Generator, n: int = 16) -> None:
    bns = [m for m in nets.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta, was_training = [m.momentum for m in bns], nets.training
    nets.train()
    for m in nets.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # statistics as the eval-mode chain will see them
    for m in bns:
        m.momentum = 1.0  # one batch sets the running statistics
    z = torch.rand(n, nets["G_E"].z_dim, generator=g) * 2 - 1
    fake = nets["F"](nets["G_E"](z))
    nets["phi"](fake)
    real = torch.rand(fake.shape, generator=g) * 2 - 1
    nets["D_E"](nets["H"](real))
    nets["D_R"](real)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        c = m.num_features
        m.running_mean.add_(torch.randn(c, generator=g) * 0.1 * m.running_var.sqrt())
        m.running_var.mul_(torch.rand(c, generator=g) * 0.45 + 0.8)
    nets.train(was_training)


class _PlainBatchNormAct(nn.Module):
    """Eval-mode act(F.batch_norm(x) [+ residual]) from a fused module's state dict and its public
    ``activation``/``negative_slope``: stock torch functions only."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        state = {k: v.detach().clone() for k, v in bn.state_dict().items()}
        for k in ("running_mean", "running_var", "weight", "bias"):
            self.register_buffer(k, state[k])
        self.eps, self.activation, self.negative_slope = bn.eps, bn.activation, bn.negative_slope

    def forward(self, x, residual=None):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps)
        if residual is not None:
            y = y + residual
        if self.activation == "relu":
            return F.relu(y)
        if self.activation == "leaky_relu":
            return F.leaky_relu(y, self.negative_slope)
        assert self.activation == "identity", self.activation
        return y


def plain_twin(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` in which every fused BatchNorm module is replaced by stock
    F.batch_norm + activation: the reference for the Sampler and the folded chain, independent of the
    op backends and of the fold."""
    twin = copy.deepcopy(module).eval()
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (BatchNormAct2d, BatchNormAddAct2d)):
                setattr(parent, name, _PlainBatchNormAct(child))
    return twin.requires_grad_(False)


class _Float64Chain(SamplingChain):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z.double()).float()


def reference_chain(nets, denoise: bool = True) -> SamplingChain:
    """The sampling chain of ``nets`` as the truth fp32 paths are judged against: the stock-torch twin
    (``plain_twin``) computed in float64, taking and returning float32 (``.sample`` works as usual)."""
    twin = plain_twin(nets).double()
    return _Float64Chain(twin["G_E"], twin["F"], twin["phi"] if denoise else None, twin["G_E"].z_dim)


# Max |fp32 chain − float64 truth| allowed on images in [-1, 1]: the fp32 chain's own rounding on
# lively nets is ≤ 1.9e-5 (unfolded through either op backend, or folded; R=64 tiny nets, measured).
FP32_CHAIN = 3e-5
