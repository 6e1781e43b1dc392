"""Fused BatchNorm+activation ops and the dispatcher that picks their backend.

    from aegan_fast import ops
    y = ops.bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, "leaky_relu", 0.2)

Backends: ``reference`` (plain PyTorch, always there), ``cpp``, ``cuda``, ``triton``; see
``dispatch.py`` for how one is chosen and ``python -m aegan_fast.doctor`` for which load here.
"""
from .dispatch import (BACKENDS, BackendUnavailable, availability, bn_act, bn_add_act, get_backend, resolve,
                       set_backend, use_backend)
from .modules import BatchNormAct2d, BatchNormAddAct2d

__all__ = ["BACKENDS", "BackendUnavailable", "availability", "bn_act", "bn_add_act", "get_backend", "resolve",
           "set_backend", "use_backend", "BatchNormAct2d", "BatchNormAddAct2d"]
