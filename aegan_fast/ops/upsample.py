"""Nearest-neighbour ×2 followed by a reflect-padded 3×3 conv (models.ResizeConv2d), computed as four
2×2 convolutions on the input, one per output phase: the same function with 16 instead of 36
multiply-adds per input pixel and output channel, and no 4×-sized upsampled copy in memory.

Why it is exact: after nearest ×2 an output pixel's three rows of taps read at most two distinct
input rows. Output row 2i (phase 0) reads input rows i (tap 0) and i+1 (taps 1 and 2) of the input
padded by one; row 2i+1 (phase 1) reads rows i+1 (taps 0 and 1) and i+2 (tap 2). Columns alike. And
reflect-padding the upsampled image equals replicate-padding the input before upsampling (the row
reflected in, U[1], is a copy of U[0] = x[0]). So phase (a, b) is a 2×2 conv of the replicate-padded
input with the taps summed as above (``phase_weights``), read from window offset (a, b). All four
phases run as one conv with 4×C_out outputs over the (H+1)×(W+1) windows; ``_Interleave`` writes
them into the 2H×2W output in one pass each way. In fp32 it differs from the reference
(``reference.resize_conv3x3``) only in the order of the summed taps (1e-6); in bf16 the summed taps
are rounded once, so its error against fp32 truth is 1.2× the plain form's in the output and 1.4× in
the weight gradient (bench/RESULTS.md, "Quality after the speed work").

Measured (bench/RESULTS.md, "Where the demo's minutes go"): the up layers of the demo's decoder F at
1.5× (bf16) to 2.5× (fp32) their speed, the last 64→3 one 4–13×.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .library import memory_format

# PHASE_TAPS[a, t, k]: how much 3×3 tap row k contributes to 2×2 tap row t of output phase a.
PHASE_TAPS = torch.tensor([[[1., 0., 0.], [0., 1., 1.]],
                           [[1., 1., 0.], [0., 0., 1.]]])
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) phase of each block of C_out conv outputs


def phase_weights(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) → (4·C_out, C_in, 2, 2): the four phases' 2×2 kernels, in PHASES order."""
    p = PHASE_TAPS.to(weight)
    k = torch.einsum("amy,bnx,oiyx->aboimn", p, p, weight)
    return k.reshape(4 * weight.shape[0], weight.shape[1], 2, 2)


class _Interleave(torch.autograd.Function):
    """(N, 4·C, H+1, W+1) phase outputs → (N, C, 2H, 2W), phase (a, b) from window offset (a, b).
    One copy per phase each way, in the input's layout. A custom Function because autograd's
    four slice backwards would each fill a zero tensor the size of the whole input."""

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        n, c4, h1, w1 = y.shape
        c, h, w = c4 // 4, h1 - 1, w1 - 1
        ctx.layout = memory_format(y)
        out = torch.empty((n, c, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=ctx.layout)
        grid = out.view(n, c, h, 2, w, 2)
        for p, (a, b) in enumerate(PHASES):
            grid[:, :, :, a, :, b].copy_(y[:, p * c:(p + 1) * c, a:a + h, b:b + w])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        n, c, h2, w2 = grad.shape
        h, w = h2 // 2, w2 // 2
        out = torch.empty((n, 4 * c, h + 1, w + 1), dtype=grad.dtype, device=grad.device, memory_format=ctx.layout)
        grid = grad.view(n, c, h, 2, w, 2)
        for p, (a, b) in enumerate(PHASES):
            phase = out[:, p * c:(p + 1) * c]
            phase[:, :, a:a + h, b:b + w].copy_(grid[:, :, :, a, :, b])
            phase[:, :, h if a == 0 else 0, :].zero_()  # the window row and column this phase never reads
            phase[:, :, :, w if b == 0 else 0].zero_()
        return out


def interleave(y: Tensor) -> Tensor:
    """``_Interleave`` as stock ops (a stack and a reshape: two copies where it makes one), for
    graphs without gradients that exporters and compilers read (ONNX, torch.export)."""
    n, c4, h1, w1 = y.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    phases = torch.stack([y[:, p * c:(p + 1) * c, a:a + h, b:b + w] for p, (a, b) in enumerate(PHASES)], 2)
    grid = phases.view(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)  # n, c, h, a, w, b
    return grid.reshape(n, c, 2 * h, 2 * w).contiguous(memory_format=memory_format(y))


def resize_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """conv3×3(reflect_pad(nearest×2(x))) with ``weight`` (C_out, C_in, 3, 3): see the module docstring."""
    # The pad keeps x's dtype: CPU autocast would run it in fp32 (two casts), as ReflectConv2d notes.
    with torch.autocast(x.device.type, enabled=False):
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    y = F.conv2d(padded, phase_weights(weight), None if bias is None else bias.repeat(4))
    exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if torch.is_grad_enabled() and y.requires_grad and not exporting:
        return _Interleave.apply(y)
    return interleave(y)
