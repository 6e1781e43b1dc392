"""Fused BatchNorm+activation ops and the dispatcher that picks their kernel.

    from aegan_fast import ops
    y = ops.bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, "leaky_relu", 0.2)
    with ops.use_backend("cpp"):
        ...
    with ops.sync_batchnorm():  # training-mode BatchNorm modules reduce statistics across ranks (sync_bn.py)
        ...

Backends: ``reference`` (plain PyTorch, always there) and the kernels ``cpp``, ``cuda``, ``triton``
of the ops in ``library.py`` (one schema per op); ``dispatch.py`` says how one is chosen and
``python -m aegan_fast.doctor`` which load here. Whole blocks (models.ResBlock, the transposed up
block) run as one op (``blocks.py``) where ``block_kernel`` names a kernel for them; the resize-conv
up layer as four phase convolutions (``upsample.py``) on every backend but ``reference``.
"""
from .blocks import run_resblock, run_up_block
from .dispatch import (BACKENDS, BackendUnavailable, availability, block_kernel, bn_act, bn_add_act, requested,
                       resize_conv3x3, resolve, use_backend)
from .modules import BatchNormAct2d, BatchNormAddAct2d
from .sync_bn import sync_batchnorm

__all__ = ["BACKENDS", "BackendUnavailable", "availability", "block_kernel", "bn_act", "bn_add_act", "requested",
           "resize_conv3x3", "resolve", "run_resblock", "run_up_block", "use_backend", "BatchNormAct2d", "BatchNormAddAct2d",
           "sync_batchnorm"]
