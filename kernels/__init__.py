"""Triton kernels for aegan_fast's fused ops, installed as ``aegan_fast.kernels``.

One module per op (Liger-Kernel style): kernels and host functions,

    bn_act.bn_act_forward / bn_act_backward
    bn_add_act.bn_add_act_forward / bn_add_act_backward
    conv3x3.conv3x3_reflect_bnact / _dgrad / _dgrad_bn_reduce / _wgrad   (the ResBlock's reflect-pad 3x3 conv)
    convt4x4.conv_transpose4x4s2_bnact / _dgrad / _wgrad   (the up block's ConvTranspose2d 4x4 s2)

which ``aegan_fast.ops._triton`` puts behind the ops' one contract (aegan_fast/ops/library.py).
They run on CPU tensors too under ``TRITON_INTERPRET=1``. Importing this package needs triton,
never a GPU.
"""
from . import bn_act, bn_add_act, conv3x3, convt4x4

__all__ = ["bn_act", "bn_add_act", "conv3x3", "convt4x4"]
