"""Pieces shared by the BatchNorm Triton ops: layout, block sizes, activations, and the statistics pass.

Every 4-D tensor is addressed as ``x[o, c, i] = base + o*sO + c*sC + i*sI``:

    NCHW contiguous:   o = n (sO = C*HW), sC = HW, i = h*W + w (NI = HW,   sI = 1)
    channels_last:     o = 0 (NO = 1),    sC = 1,  i = n*HW + h*W + w (NI = N*HW, sI = C)

so one set of kernels covers both memory formats, and the unit-stride axis (i for NCHW, c for
channels_last) is visible to Triton's contiguity analysis (Triton specialises integer arguments
equal to 1). A tile is ``[BLOCK_C, BLOCK_I]``; tiles are numbered ``t = o * n_tiles_i + i_block``.

Statistics are computed in one pass with a chunked Welford / Chan combine: each tile gives an
exact (count, mean, M2) for its channels, which is merged into the program's running
(count, mean, M2); the per-program partials are merged again, in a fixed order, by the finalize
kernel. This avoids the catastrophic cancellation of E[x^2] - E[x]^2 when |mean| >> std.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from aegan_fast.ops import activations

TILE_OVERRIDE: int | None = None  # tests only: elements per tile (a power of two)


def act_code(activation: str) -> int:
    """The constexpr ACT of the kernels: the code of aegan_fast.ops.activations (= aegan_fast::Act)."""
    return activations.code(activation)


# ----------------------------------------------------------------------------------------------
# launching: wrap_triton when tracing through torch.library.triton_op needs it
# ----------------------------------------------------------------------------------------------

def launch(kernel):
    """``kernel`` as torch.library.wrap_triton sees it (so triton_op / torch.compile can trace it),
    or the plain kernel where wrap_triton does not exist or cannot take it (the interpreter's
    InterpretedFunction under TRITON_INTERPRET=1)."""
    try:
        from torch.library import wrap_triton
        from triton.runtime.jit import JITFunction
    except ImportError:
        return kernel
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


# ----------------------------------------------------------------------------------------------
# layout and block sizes (host side)
# ----------------------------------------------------------------------------------------------

class Layout:
    """How a (N, C, *spatial) tensor is walked: see the module docstring."""

    def __init__(self, x: torch.Tensor):
        if x.dim() < 2:
            raise ValueError(f"expected a (N, C, ...) tensor, got shape {tuple(x.shape)}")
        N, C = x.shape[0], x.shape[1]
        HW = math.prod(x.shape[2:])
        self.C, self.count = C, N * HW
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            self.memory_format = torch.channels_last
            self.NO, self.sO, self.sC, self.NI, self.sI = 1, 0, 1, N * HW, C
        else:
            self.memory_format = torch.contiguous_format
            self.NO, self.sO, self.sC, self.NI, self.sI = N, C * HW, HW, HW, 1
        self.int64 = x.numel() >= 2 ** 31 - 1
        # Tiles of ~tile elements; the unit-stride axis gets the wide side of the tile. Large tiles
        # under the interpreter (it runs one program at a time); TILE_OVERRIDE lets the tests force
        # small tiles so the multi-tile loops and cross-program merges run on small tensors.
        tile = TILE_OVERRIDE or (4096 if interpreting() else 2048)
        max_block_i = 1024 if tile == 2048 else tile  # on a GPU: at most 1024 contiguous values a row
        if self.sC == 1:  # channels_last: rows of channels
            self.BLOCK_C = min(triton.next_power_of_2(C), 256)
            self.BLOCK_I = max(1, min(tile // self.BLOCK_C, triton.next_power_of_2(self.NI)))
        else:
            self.BLOCK_I = min(triton.next_power_of_2(self.NI), max_block_i)
            self.BLOCK_C = max(1, min(tile // self.BLOCK_I, triton.next_power_of_2(C)))
        self.n_tiles_i = triton.cdiv(self.NI, self.BLOCK_I)
        self.n_tiles = self.NO * self.n_tiles_i
        self.n_cblocks = triton.cdiv(C, self.BLOCK_C)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in this layout (a no-op when it already is)."""
        return t.contiguous(memory_format=self.memory_format)

    def strides(self):
        return (self.C, self.NI, self.sO, self.sC, self.sI, self.n_tiles_i)

    def splits(self, device: torch.device) -> int:
        """How many programs share one channel block in a reduction: enough to fill the device,
        never more than there are tiles."""
        target = 4 * _num_sms(device)
        return max(1, min(self.n_tiles, triton.cdiv(target, self.n_cblocks)))


def contiguous_input(x: torch.Tensor) -> torch.Tensor:
    """x in NCHW or channels_last, whichever it is closest to."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
    return x.contiguous()


@functools.cache
def interpreting() -> bool:
    """Whether triton runs its interpreter (TRITON_INTERPRET=1): kernels then run on CPU tensors."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # triton before the knobs module read the variable directly
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1  # CPU tensors only run under the interpreter: few programs keep it fast


def or_dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A per-channel tensor as a kernel argument; a dummy fp32 scalar when absent (the kernel's
    HAS_* flag keeps it from being read)."""
    return t if t is not None else torch.empty(1, device=like.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# device-side helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def tile_offsets(t, c, n_tiles_i, NI, sO, sC, sI, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_I] of tile t for channels c, and the mask along i."""
    o = t // n_tiles_i
    i = (t % n_tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = i < NI
    if INT64:
        offs = o.to(tl.int64) * sO + c.to(tl.int64)[:, None] * sC + i.to(tl.int64)[None, :] * sI
    else:
        offs = o * sO + c[:, None] * sC + i[None, :] * sI
    return offs, imask


@triton.jit
def activate(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    return z


@triton.jit
def activation_grad(dy, z, ACT: tl.constexpr, slope):
    """d act(z)/dz * dy with PyTorch's convention at z == 0 (the negative side)."""
    if ACT == 1:
        dy = tl.where(z > 0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where(z > 0, dy, dy * slope)
    return dy


@triton.jit
def channel_affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel (mean, invstd, weight, bias) in fp32."""
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    else:
        w = tl.full(mean.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(mean.shape, tl.float32)
    return mean, invstd, w, b


# ----------------------------------------------------------------------------------------------
# statistics pass (training forward), shared by bn_act and bn_add_act
# ----------------------------------------------------------------------------------------------

@triton.jit
def _stats_partial_kernel(x_ptr, pcount_ptr, pmean_ptr, pm2_ptr,
                          C, NI, sO, sC, sI, n_tiles_i, n_tiles, S,
                          BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr):
    """Program (cb, s) reduces tiles s, s+S, s+2S, ... of channel block cb to (count, mean, M2)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t in range(pid_s, n_tiles, S):
        offs, imask = tile_offsets(t, c, n_tiles_i, NI, sO, sC, sI, BLOCK_I, INT64)
        mask = cmask[:, None] & imask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.sum(imask.to(tl.float32), axis=0)
        mean_b = tl.sum(x, axis=1) / n_b
        d = tl.where(mask, x - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, axis=1)
        # Chan et al.: merge (cnt, mean, m2) with the tile's (n_b, mean_b, m2_b)
        n_ab = cnt + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n_ab)
        m2 = m2 + m2_b + delta * delta * (cnt * (n_b / n_ab))
        cnt = n_ab
    out = pid_s * C + c
    tl.store(pcount_ptr + out, cnt, mask=cmask)
    tl.store(pmean_ptr + out, mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def _stats_finalize_kernel(pcount_ptr, pmean_ptr, pm2_ptr, mean_ptr, var_ptr, C, S, BLOCK_C: tl.constexpr):
    """Merge the S partials of each channel in a fixed order; write mean and biased variance."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s in range(0, S):
        n_b = tl.load(pcount_ptr + s * C + c, mask=cmask, other=1.0)
        mean_b = tl.load(pmean_ptr + s * C + c, mask=cmask, other=0.0)
        m2_b = tl.load(pm2_ptr + s * C + c, mask=cmask, other=0.0)
        n_ab = cnt + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n_ab)
        m2 = m2 + m2_b + delta * delta * (cnt * (n_b / n_ab))
        cnt = n_ab
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, m2 / cnt, mask=cmask)


@triton.jit
def _sum_partials_kernel(pa_ptr, pb_ptr, a_ptr, b_ptr, C, S, BLOCK_C: tl.constexpr):
    """a[c] = sum_s pa[s, c]; b[c] = sum_s pb[s, c] (fixed order: deterministic)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    a = tl.zeros([BLOCK_C], tl.float32)
    b = tl.zeros([BLOCK_C], tl.float32)
    for s in range(0, S):
        a += tl.load(pa_ptr + s * C + c, mask=cmask, other=0.0)
        b += tl.load(pb_ptr + s * C + c, mask=cmask, other=0.0)
    tl.store(a_ptr + c, a, mask=cmask)
    tl.store(b_ptr + c, b, mask=cmask)


FINALIZE_BLOCK = 128


def batch_stats(x: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel, fp32, in one read of x."""
    S = lay.splits(x.device)
    C = lay.C
    part = torch.empty((3, S, C), device=x.device, dtype=torch.float32)
    launch(_stats_partial_kernel)[(lay.n_cblocks, S)](
        x, part[0], part[1], part[2], *lay.strides(), lay.n_tiles, S,
        BLOCK_C=lay.BLOCK_C, BLOCK_I=lay.BLOCK_I, INT64=lay.int64)
    return finalize_stats(part, C, S)


def finalize_stats(part: torch.Tensor, C: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel from S Welford partials ``part[0..2][s, c]`` (count, mean, M2),
    merged in a fixed order: the statistics pass's, and the conv kernels' statistics epilogues'."""
    mean = torch.empty(C, device=part.device, dtype=torch.float32)
    var = torch.empty(C, device=part.device, dtype=torch.float32)
    launch(_stats_finalize_kernel)[(triton.cdiv(C, FINALIZE_BLOCK),)](
        part[0], part[1], part[2], mean, var, C, S, BLOCK_C=FINALIZE_BLOCK)
    return mean, var


def sum_partials(pa: torch.Tensor, pb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    S, C = pa.shape
    a = torch.empty(C, device=pa.device, dtype=torch.float32)
    b = torch.empty(C, device=pa.device, dtype=torch.float32)
    launch(_sum_partials_kernel)[(triton.cdiv(C, FINALIZE_BLOCK),)](pa, pb, a, b, C, S, BLOCK_C=FINALIZE_BLOCK)
    return a, b
