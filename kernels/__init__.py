"""Triton kernels for aegan_fast's fused ops, installed as ``aegan_fast.kernels``.

One module per op (Liger-Kernel style): kernels, host functions, and an autograd Function.

    bn_act.bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation, slope, memory_efficient)
    bn_add_act.bn_add_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps, activation, slope)

These are the direct entry points (they run on CPU tensors too under ``TRITON_INTERPRET=1``);
``aegan_fast.ops._triton`` registers the same host functions with ``torch.library`` for the
dispatcher. Importing this package needs triton, never a GPU.
"""
from . import bn_act, bn_add_act
from ._common import update_running_stats

__all__ = ["bn_act", "bn_add_act", "update_running_stats"]
