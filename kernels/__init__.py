"""Triton kernels for aegan_fast's fused ops, installed as ``aegan_fast.kernels``.

One module per op (Liger-Kernel style): kernels and host functions,

    bn_act.forward / backward / backward_apply   (bn_act and bn_add_act: the ops contract of
                                                  aegan_fast/ops/library.py, passed on by ops/_triton.py)
    conv3x3.conv3x3_reflect_bnact / _dgrad / _dgrad_bn_reduce / _wgrad   (the ResBlock's reflect-pad 3x3 conv)
    convt4x4.conv_transpose4x4s2_bnact / _dgrad / _wgrad   (the up block's ConvTranspose2d 4x4 s2)

all through one host layer (host.py: argument checks, dtypes, int64 offsets, layout, launch sizing)
and the device helpers of _common.py. Nothing here imports aegan_fast.ops: ops depends on the
kernels, never the reverse. They run on CPU tensors too under ``TRITON_INTERPRET=1``. Importing
this package needs triton, never a GPU.
"""
from . import bn_act, conv3x3, convt4x4, host

__all__ = ["bn_act", "conv3x3", "convt4x4", "host"]
