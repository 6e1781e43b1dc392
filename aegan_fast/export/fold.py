"""The inference graph: the sampling chain z → G_E → F → φ with every BatchNorm folded away.

In eval mode a BatchNorm is an affine map per channel, y = s·x + t with s = γ/√(σ²+ε) and
t = β − μ·s, so it folds into the convolution in front of it:

- Conv2d, weight (out, in/groups, kh, kw): w' = w · s[out], b' = s·b + t;
- ConvTranspose2d, weight (in, out/groups, kh, kw): the output channel is dim 1, so w' = w · s[None, out].

``BatchNormAct2d`` becomes conv(bias) + a plain activation, the residual block's closing
``BatchNormAddAct2d`` becomes conv(bias) + add (+ activation), dropout becomes identity. The result
holds only stock torch modules (Conv2d, ConvTranspose2d, ReLU, LeakyReLU, Tanh): no
``aegan_fast.ops`` custom op, whichever backend trained the nets, so ``torch.onnx``/``torch.export``
and torch.compile see a plain graph. The fold is computed in float64 and cast back, and the nets
passed in are never modified (the graph holds copies).

Nothing random runs in the graph: z is its input (``aegan_fast.models.sample_z`` draws it outside).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..models import ResBlock, SAMPLING_CHAIN
from ..ops.modules import _FusedBatchNorm

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def activation_module(bn: nn.BatchNorm2d) -> nn.Module:
    """The activation a (fused) BatchNorm module applies after normalising, as a stock module."""
    act = getattr(bn, "activation", "identity")
    if act == "identity":
        return nn.Identity()
    if act == "relu":
        return nn.ReLU()
    if act == "leaky_relu":
        return nn.LeakyReLU(bn.negative_slope)
    raise ValueError(f"cannot fold a BatchNorm with activation {act!r}")


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 such that eval-mode bn(x) == scale·x + shift per channel."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} keeps no running statistics: it normalises with batch statistics even in "
                         "eval mode and cannot be folded")
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """A copy of conv (Conv2d or ConvTranspose2d) computing bn(conv(x)) in eval mode, with a bias."""
    if not isinstance(conv, _CONVS):
        raise TypeError(f"can only fold a BatchNorm into Conv2d/ConvTranspose2d, not {type(conv).__name__}")
    scale, shift = bn_affine(bn)
    w = conv.weight.double()
    if isinstance(conv, nn.ConvTranspose2d):
        # (in, out/groups, kh, kw): output channel o of group g is g·(out/groups) + dim-1 index.
        groups, per_group = conv.groups, w.shape[1]
        s = scale.view(groups, 1, per_group, 1, 1)
        w = (w.view(groups, w.shape[0] // groups, per_group, *w.shape[2:]) * s).view_as(conv.weight)
    else:
        w = w * scale.view(-1, 1, 1, 1)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
    folded.bias = nn.Parameter((b * scale + shift).to(conv.weight.dtype), requires_grad=False)
    return folded


class FoldedResBlock(nn.Module):
    """ResBlock with both BatchNorms folded: act2(conv2(act1(conv1(x))) + x)."""

    def __init__(self, block: ResBlock):
        super().__init__()
        self.conv1 = fold_conv_bn(block.conv1, block.bn1)
        self.act1 = activation_module(block.bn1)
        self.conv2 = fold_conv_bn(block.conv2, block.bn2)
        self.act2 = activation_module(block.bn2)

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))) + x)


def _fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    out: list[nn.Module] = []
    mods = list(seq)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, _CONVS) and isinstance(nxt, nn.BatchNorm2d):
            out += [fold_conv_bn(m, nxt), activation_module(nxt)]
            i += 2
            continue
        out.append(_fold(m))
        i += 1
    return nn.Sequential(*[m for m in out if not isinstance(m, nn.Identity)])


def _fold(module: nn.Module) -> nn.Module:
    """A folded copy of module (recursing into children)."""
    if isinstance(module, ResBlock):
        return FoldedResBlock(module)
    if isinstance(module, nn.Sequential):
        return _fold_sequential(module)
    if isinstance(module, nn.Dropout):
        return nn.Identity()
    if isinstance(module, nn.BatchNorm2d):
        raise ValueError(f"a BatchNorm that follows no convolution cannot be folded: {module}")
    if not list(module.children()):
        return copy.deepcopy(module)
    # A container with its own forward (G_E, F, φ, ModuleList): a shallow copy with folded children.
    new = copy.copy(module)
    new._modules = {name: _fold(child) if child is not None else None for name, child in module._modules.items()}
    new._parameters = {k: copy.deepcopy(v) for k, v in module._parameters.items()}
    new._buffers = {k: copy.deepcopy(v) for k, v in module._buffers.items()}
    return new


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of module with every conv→BatchNorm pair folded (eval semantics), dropout removed."""
    folded = _fold(module).eval()
    leftovers = [name for name, m in folded.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout))]
    if leftovers:
        raise ValueError(f"folding left BatchNorm/Dropout modules behind: {leftovers}")
    return folded.requires_grad_(False)


class SamplingGraph(nn.Module):
    """z (N × z_dim, uniform in [-1, 1]) → images (N × 3 × R × R in [-1, 1]): G_E → F → φ, folded.

    Deterministic and free of custom ops: what ONNX export, TensorRT and torch.compile consume."""

    def __init__(self, G_E: nn.Module, F: nn.Module, phi: nn.Module | None, z_dim: int, resolution: int):
        super().__init__()
        self.G_E, self.F, self.phi = G_E, F, phi
        self.z_dim, self.resolution = z_dim, resolution

    @property
    def denoise(self) -> bool:
        return self.phi is not None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.F(self.G_E(z))
        return self.phi(x) if self.phi is not None else x


def build_inference_graph(nets, z_dim: int, resolution: int, denoise: bool = True, fold: bool = True) -> SamplingGraph:
    """The sampling chain of ``nets`` (a ModuleDict from ``build_nets``/``load_sampling_nets``) as a
    SamplingGraph; ``fold=False`` keeps the original (eval-mode, un-folded) modules, for comparison."""
    parts = {}
    for name in SAMPLING_CHAIN:
        if name == "phi" and not denoise:
            parts[name] = None
            continue
        net = nets[name]
        parts[name] = fold_batchnorm(net) if fold else copy.deepcopy(net).eval().requires_grad_(False)
    return SamplingGraph(parts["G_E"], parts["F"], parts["phi"], z_dim, resolution).eval()


def uses_custom_ops(module: nn.Module) -> list[str]:
    """Names of submodules that would call aegan_fast.ops (empty for a folded graph)."""
    return [name for name, m in module.named_modules() if isinstance(m, _FusedBatchNorm)]


def lively_weights(nets: nn.Module, seed: int = 0) -> nn.Module:
    """For parity tests and benchmarks, not training. Re-draw weights so images fill [-1, 1] without saturating (convs N(0, 1/fan_in), non-trivial
    BatchNorm statistics and affines): at the DCGAN init N(0, 0.02) the chain's output is ~0.005 and
    any error bound would be vacuous."""
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
    return nets
