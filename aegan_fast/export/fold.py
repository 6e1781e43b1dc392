"""The inference graph: a SamplingChain (z → G_E → F → φ) over copies of the nets with every
BatchNorm folded away.

In eval mode a BatchNorm is an affine map per channel, so it folds into the convolution in front of
it (``torch.nn.utils.fusion.fuse_conv_bn_eval``, through each fused module's own ``fold(conv)``).
Each module says how it folds: a conv → ``BatchNormAct2d`` pair becomes ``bn.fold(conv)`` +
``bn.plain_activation()``, a ``ResBlock`` folds itself (``ResBlock.fold``), dropout goes, and a
container is rebuilt around its folded children. The result holds only stock torch modules (Conv2d,
ConvTranspose2d, ReLU, LeakyReLU, Tanh): no ``aegan_fast.ops`` custom op, whichever backend trained
the nets, so ``torch.onnx``/``torch.export`` and torch.compile see a plain graph. The nets passed in
are never modified (the graph holds copies); the fold is computed in float64.

Nothing random runs in the graph: z is its input (``aegan_fast.models.seeded_z`` draws it outside).
"""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..models import ResBlock, SamplingChain
from ..ops import BatchNormAct2d, BatchNormAddAct2d

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)
_FUSED = (BatchNormAct2d, BatchNormAddAct2d)


def fold_conv_bn(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Sequential:
    """conv → bn (a BatchNormAct2d or a stock BatchNorm2d) in eval semantics as stock modules: a copy
    of the conv with the BatchNorm in its weight and bias, then the plain activation (none for a
    stock BatchNorm2d). Neither argument is modified."""
    if not isinstance(conv, _CONVS):
        raise TypeError(f"can only fold a BatchNorm into Conv2d/ConvTranspose2d, not {type(conv).__name__}")
    transpose = isinstance(conv, nn.ConvTranspose2d)
    if transpose and conv.groups != 1:
        # fuse_conv_bn_eval scales the weight's dim 1, which holds out/groups channels when grouped.
        raise ValueError(f"cannot fold a BatchNorm into a grouped ConvTranspose2d (groups={conv.groups})")
    if isinstance(bn, BatchNormAct2d):
        return nn.Sequential(bn.fold(copy.deepcopy(conv)), bn.plain_activation())
    if type(bn) is nn.BatchNorm2d:
        return nn.Sequential(fuse_conv_bn_eval(copy.deepcopy(conv).eval(), copy.deepcopy(bn).eval(), transpose))
    raise TypeError(f"cannot fold {type(bn).__name__} into a convolution")


def _fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    out: list[nn.Module] = []
    mods = list(seq)
    i = 0
    while i < len(mods):
        m, nxt = mods[i], mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, _CONVS) and (isinstance(nxt, BatchNormAct2d) or type(nxt) is nn.BatchNorm2d):
            out += list(fold_conv_bn(m, nxt))
            i += 2
            continue
        out.append(_fold(m))
        i += 1
    return nn.Sequential(*[m for m in out if not isinstance(m, nn.Identity)])


def _fold(module: nn.Module) -> nn.Module:
    """A folded copy of module (recursing into children)."""
    if isinstance(module, ResBlock):
        return module.fold()
    if isinstance(module, nn.Sequential):
        return _fold_sequential(module)
    if isinstance(module, nn.ModuleList):
        return nn.ModuleList(_fold(m) for m in module)
    if isinstance(module, nn.Dropout):
        return nn.Identity()
    if isinstance(module, nn.BatchNorm2d):
        raise ValueError(f"a BatchNorm that follows no convolution in a Sequential cannot be folded: {module}")
    children = list(module.named_children())
    # A net with its own forward (G_E, F, φ): a copy of it with each child replaced by its folded copy.
    new = copy.deepcopy(module)
    for name, child in children:
        setattr(new, name, _fold(child))
    return new


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of module in eval mode with every conv→BatchNorm pair folded and dropout removed. The
    fold is computed in float64 and cast back to the module's dtype, so it adds no rounding of its own
    beyond that one cast."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    folded = _fold(copy.deepcopy(module).double() if dtype is not None else module)
    folded = (folded.to(dtype) if dtype is not None else folded).eval()
    leftovers = [name for name, m in folded.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout))]
    if leftovers:
        raise ValueError(f"folding left BatchNorm/Dropout modules behind: {leftovers}")
    return folded.requires_grad_(False)


def fold_chain(chain: SamplingChain) -> SamplingChain:
    """The inference graph of ``chain``: a SamplingChain over folded copies of its nets, in eval mode
    and without gradients. Deterministic and free of custom ops: what ONNX export, TensorRT and
    torch.compile consume."""
    phi = fold_batchnorm(chain.phi) if chain.phi is not None else None
    return SamplingChain(fold_batchnorm(chain.G_E), fold_batchnorm(chain.F), phi, chain.z_dim).eval()


def uses_custom_ops(module: nn.Module) -> list[str]:
    """Names of submodules that would call aegan_fast.ops (empty for a folded graph)."""
    return [name for name, m in module.named_modules() if isinstance(m, _FUSED)]
