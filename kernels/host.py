"""The host layer every Triton kernel goes through: argument checks, dtypes, offsets, layout, launch sizing.

One rule each, for every kernel file (bn_act, conv3x3, convt4x4, the statistics pass of _common):

- Checks: ``check_tensor`` (shape, dtype, device, contiguity of one argument), ``check_act`` (the
  activation code) and ``check_prologue`` (a conv's optional BatchNorm+activation prologue); a bad
  argument raises ``ValueError`` naming it, before any launch.
- Dtypes: activations and conv weights are one of ``DTYPES`` (fp32, bf16, fp16); per-channel
  scale/shift/statistics are fp32 (``FP32``); outputs and partials are computed in fp32.
- Offsets: int32 unless ``needs_int64`` says a tensor's largest element offset reaches 2**31 - 1;
  then the kernel's ``INT64`` constexpr computes them in int64. Never a refusal for size.
- Layout: ``memory_format`` / ``contiguous_input`` pick NCHW or channels_last per input; outputs
  take the input's format. ``Layout`` walks a (N, C, *spatial) tensor in tiles (see _common).
- Launch sizing: ``block`` (power-of-two tile sides), ``splits`` (how many programs share one
  reduction), ``launch`` (wrap_triton for tracing).

Activations are the integer codes of the ops contract (``ACTIVATIONS``: 0 identity, 1 relu,
2 leaky_relu), interpreted by ``_common.activate``; they equal aegan_fast.ops.activations' codes
(tests/test_ops_triton.py checks it), so the kernels import nothing from aegan_fast.ops.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32 = (torch.float32,)
ACTIVATIONS = {0: "identity", 1: "relu", 2: "leaky_relu"}  # the ACT constexpr of the kernels
IDENTITY = 0

TILE_OVERRIDE: int | None = None  # tests only: elements per BatchNorm tile (a power of two)
FORCE_INT64 = False  # tests only: int64 offsets on small tensors, so that code path runs


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------

def _dtype_names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_device(name: str, t: torch.Tensor) -> None:
    """CUDA tensors, or CPU tensors under the interpreter."""
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")


def check_tensor(name: str, t, *, dim: int | None = None, shape: tuple | None = None, dtypes=DTYPES,
                 like: tuple[str, torch.Tensor] | None = None, same_dtype: bool = False,
                 contiguous: bool = False, hint: str = "") -> None:
    """The one argument check: ``t`` is a non-empty tensor with ``dim`` dimensions, of ``shape``
    (None entries match any size), of one of ``dtypes`` (None: any), contiguous if asked, and on
    the device of ``like`` = (its name, tensor) (and of its dtype with ``same_dtype``) or, with no
    ``like``, on a device the kernels run on. ValueError naming the argument otherwise."""
    what = f" ({hint})" if hint else ""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor{what}, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D{what}, got shape {tuple(t.shape)}")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        want = "(" + ", ".join("_" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name} must be of shape {want}{what}, got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must be {_dtype_names(dtypes)}, got {t.dtype}")
    if like is None:
        check_device(name, t)
    else:
        other, ref = like
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {other} is on {ref.device}: they must share one device")
        if same_dtype and t.dtype != ref.dtype:
            raise ValueError(f"{name} is {t.dtype} but {other} is {ref.dtype}: they must share one dtype")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def check_dtype(name: str, dtype: torch.dtype, dtypes=DTYPES) -> None:
    """A dtype argument (an out_dtype) under the tensors' rule."""
    if dtype not in dtypes:
        raise ValueError(f"{name} must be {_dtype_names(dtypes)}, got {dtype}")


def check_act(act) -> int:
    """The activation code (the ops contract's), as the kernels' ACT constexpr."""
    if isinstance(act, bool) or not isinstance(act, int) or act not in ACTIVATIONS:
        raise ValueError(f"unknown activation code {act!r}; the kernels take one of "
                         + ", ".join(f"{c} ({n})" for c, n in ACTIVATIONS.items()))
    return act


def check_prologue(x: torch.Tensor, scale, shift, act) -> int:
    """ACT for a conv whose input is act(x*scale[c] + shift[c]): scale and shift fp32 (C,) on x's
    device, or both None (the input as is, the identity only)."""
    act = check_act(act)
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (or both None)")
    if scale is None:
        if act != IDENTITY:
            raise ValueError(f"activation {ACTIVATIONS[act]} needs scale and shift (the prologue); "
                             "without them the input is used as is")
        return act
    for name, t in (("scale", scale), ("shift", shift)):
        check_tensor(name, t, shape=(x.shape[1],), dtypes=FP32, like=("x", x), hint="one per input channel")
    return act


def needs_int64(*tensors: torch.Tensor) -> bool:
    """The one offset policy: int64 offsets when any tensor's largest element offset (the sum of
    |stride| * (size - 1)) reaches 2**31 - 1, int32 (faster) otherwise."""
    return FORCE_INT64 or any(sum(abs(s) * (d - 1) for s, d in zip(t.stride(), t.shape)) >= 2 ** 31 - 1
                              for t in tensors)


# ----------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------

def is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The format of an output computed from ``t``: t's own, NCHW unless t is channels_last."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def contiguous_input(x: torch.Tensor) -> torch.Tensor:
    """x in NCHW or channels_last, whichever it is closest to."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
    return x.contiguous()


class Layout:
    """How a (N, C, *spatial) tensor is walked in [BLOCK_C, BLOCK_I] tiles: see kernels/_common.py."""

    def __init__(self, x: torch.Tensor):
        if x.dim() < 2:
            raise ValueError(f"expected a (N, C, ...) tensor, got shape {tuple(x.shape)}")
        N, C = x.shape[0], x.shape[1]
        HW = math.prod(x.shape[2:])
        self.C, self.count = C, N * HW
        if is_channels_last(x):
            self.memory_format = torch.channels_last
            self.NO, self.sO, self.sC, self.NI, self.sI = 1, 0, 1, N * HW, C
        else:
            self.memory_format = torch.contiguous_format
            self.NO, self.sO, self.sC, self.NI, self.sI = N, C * HW, HW, HW, 1
        self.int64 = needs_int64(x)
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

    def blocks(self) -> dict:
        return dict(BLOCK_C=self.BLOCK_C, BLOCK_I=self.BLOCK_I, INT64=self.int64)

    @property
    def apply_grid(self) -> tuple[int, int]:
        """One program per tile and channel block (the apply passes)."""
        return (self.n_tiles, self.n_cblocks)

    def reduce_grid(self, device: torch.device) -> tuple[int, int]:
        """(channel blocks, splits): the reduction passes, S = splits programs per channel block."""
        return (self.n_cblocks, splits(device, self.n_tiles, self.n_cblocks))


# ----------------------------------------------------------------------------------------------
# launch sizing
# ----------------------------------------------------------------------------------------------

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


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1  # CPU tensors only run under the interpreter: few programs keep it fast


def splits(device: torch.device, n_chunks: int, n_programs: int) -> int:
    """How many programs share one reduction of ``n_chunks`` chunks when ``n_programs`` such
    reductions run side by side: enough to fill the device, never more than there are chunks."""
    return max(1, min(n_chunks, triton.cdiv(4 * num_sms(device), n_programs)))


def block(size: int, cap: int, lo: int = 16) -> int:
    """A power-of-two tile side covering ``size`` up to ``cap``, at least ``lo`` (tl.dot needs 16)."""
    return max(lo, min(cap, triton.next_power_of_2(max(size, 1))))


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


def or_dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An optional per-channel (1-D) tensor as a kernel argument, made contiguous; a dummy fp32 scalar
    when absent (the kernel's HAS_* flag keeps it from being read)."""
    return t.contiguous() if t is not None else torch.empty(1, device=like.device, dtype=torch.float32)
