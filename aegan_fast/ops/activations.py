"""The one table of the activations the fused ops apply after normalising.

Every backend reads it: the reference and the modules (the names and the reference function), the
Triton kernels (the integer codes, as constexpr ``ACT``) and, through ``aegan_fast::Act`` in
csrc/bn_params.h, the C++ and CUDA kernels: the codes here must equal that enum's
(tests/test_ops_cpp.py compares them with ``aegan_fast._C.ACTIVATION_CODES``).

No activation is inverted (the memory-saving "recover z from the output" mode is gone: the models
never used it), so invertibility is not a property here. Backward it recomputes the pre-activation z = x*scale + shift
(+ residual) from the saved input (and residual) and takes the derivative there, with PyTorch's
convention at z == 0 (the negative side). So what backward needs is the same for every activation
but the identity, whose derivative is 1 and needs no z at all (bn_add_act then saves no residual).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # aegan_fast::Act in csrc/bn_params.h; ACT in the Triton kernels
    fn: Callable[[torch.Tensor, float], torch.Tensor]  # (z, negative_slope) -> act(z): the reference
    needs_preactivation: bool  # backward recomputes z for the derivative (the residual is saved with x)


TABLE: dict[str, Activation] = {a.name: a for a in (
    Activation("identity", 0, lambda z, slope: z, needs_preactivation=False),
    Activation("relu", 1, lambda z, slope: F.relu(z), needs_preactivation=True),
    Activation("leaky_relu", 2, lambda z, slope: F.leaky_relu(z, slope), needs_preactivation=True),
)}
NAMES = tuple(TABLE)
CODES = {name: a.code for name, a in TABLE.items()}


def get(name: str) -> Activation:
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {NAMES}") from None


def code(name: str) -> int:
    return get(name).code
