"""Numeric precision and memory layout of a training step: ``--precision fp32|bf16|fp16|auto`` and
``--channels-last/--no-channels-last``.

What runs in low precision and what stays fp32 (the usual mixed-precision split, as in
StyleGAN2-ADA's and timm's AMP paths):
- low precision (bf16/fp16): activations, and the inputs of convolutions and matrix products (under
  ``torch.autocast``; each fp32 weight is cast once per update and op, the activations never are:
  ``backward_and_step`` drops autocast's cast cache after each update, which autocast would not);
- fp32: the master weights and Adam's moments (the nets' parameters), BatchNorm's statistics and
  running buffers (the fused ops accumulate in fp32), every loss, the EMA of the sampling chain.

Why channels_last goes with bf16 on the CPU: oneDNN's bf16 convolutions run on channels_last
tensors; an NCHW bf16 tensor costs a layout reorder in and out of every convolution, and with the
casts, a naive ``torch.autocast`` over fp32 NCHW was measured slower than fp32 on CPUs without AMX.
Kept in bf16 channels_last through a whole step, both the stage-1 and the stage-2 step run well
ahead of fp32 (figures per CPU kind: bench/RESULTS.md, "Speed end to end").

``auto`` takes bf16 + channels_last where the device has native bf16 arithmetic, asked of torch
itself (oneDNN's bf16 support check on the CPU, ``torch.cuda.is_bf16_supported`` without emulation
on a GPU), and fp32 NCHW elsewhere. fp16 is for GPUs only, with a GradScaler: the CPU has no fp16
ConvTranspose kernel.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> str | None:
    """None when the device computes bf16 natively, else why not (torch's own checks, never a CPU
    name or a version string)."""
    if device.type == "cpu":
        if not torch.backends.mkldnn.is_available():
            return "this torch build has no oneDNN"
        checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        if checker is None:
            return "this torch cannot tell whether the CPU has bf16 instructions"
        return None if checker() else "this CPU has no native bf16 instructions (avx512_bf16 / amx_bf16)"
    if device.type == "cuda":
        try:
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the keyword
            ok = torch.cuda.is_bf16_supported()
        return None if ok else "this GPU has no native bf16 (compute capability < 8.0)"
    return f"no bf16 check for device type {device.type!r}"


@dataclass(frozen=True)
class Precision:
    """How a run's steps compute: ``dtype`` of the activations and ``channels_last`` layout, with the
    reason they were chosen (logged at the start of a run)."""
    name: str                    # fp32 | bf16 | fp16
    channels_last: bool
    device_type: str
    why: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        return f"{self.name}, {'channels_last' if self.channels_last else 'NCHW'}" + (f" ({self.why})" if self.why else "")

    def prepare(self, nets: torch.nn.Module) -> torch.nn.Module:
        """The nets' 4-D weights in the step's layout (their dtype stays fp32: master weights)."""
        return nets.to(memory_format=self.memory_format) if self.channels_last else nets

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """x in the step's compute dtype and layout (one cast per step, where the data comes in)."""
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x.to(self.dtype) if x.is_floating_point() else x

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        """A GradScaler for fp16 (its range needs one); None otherwise."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


FP32 = Precision("fp32", False, "cpu")


def resolve(precision: str, channels_last: bool | None, device: torch.device) -> Precision:
    """The Precision for ``--precision`` and ``--channels-last`` on device; ValueError for a choice
    the device cannot run. ``channels_last=None`` follows the precision (on with bf16/fp16)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    why = ""
    if precision == "auto":
        missing = native_bf16(device)
        precision = "fp32" if missing else "bf16"
        why = f"auto: {missing}" if missing else f"auto: native bf16 on {device.type}"
    elif precision == "bf16" and (missing := native_bf16(device)):
        why = f"emulated, slow: {missing}"
    elif precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 runs on CUDA only: the CPU has no fp16 ConvTranspose kernel "
                         "(use bf16 there)")
    if channels_last is None:
        channels_last = precision != "fp32"
    return Precision(precision, bool(channels_last), device.type, why)


_active: contextvars.ContextVar[Precision] = contextvars.ContextVar("aegan_fast_precision", default=FP32)
_scaler: contextvars.ContextVar = contextvars.ContextVar("aegan_fast_grad_scaler", default=None)
_guard: contextvars.ContextVar = contextvars.ContextVar("aegan_fast_update_guard", default=None)


def active() -> Precision:
    return _active.get()


@contextlib.contextmanager
def steps_in(precision: Precision, scaler=None, guard=None):
    """Training steps inside run under ``precision``: autocast on, ``backward_and_step`` scales
    fp16 losses with ``scaler`` and lets ``guard`` (guard.UpdateGuard: gradients averaged over the
    ranks, non-finite updates skipped) see every update before it is applied."""
    tokens = _active.set(precision), _scaler.set(scaler), _guard.set(guard)
    try:
        with precision.autocast():
            yield
    finally:
        for var, token in zip((_active, _scaler, _guard), tokens):
            var.reset(token)


def backward_and_step(loss: torch.Tensor, optimizers) -> None:
    """One backward of loss, then a step of every optimizer (the nets it trains jointly); through the
    active GradScaler when there is one (fp16: an overflowing step is skipped, the scale lowered)."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    scaler, guard = _scaler.get(), _guard.get()
    if guard is not None:
        guard.before_backward(optimizers)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if guard is not None:
        guard.after_backward(loss, optimizers, scaler)
    for opt in optimizers:
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
    if scaler is not None:
        scaler.update()
    # Autocast caches each weight's low-precision copy until the outermost autocast region ends, and
    # never checks whether the weight changed since: a later forward in the same step (stage 2's extra
    # G_E/D_E rounds) would run on the weights from before this update. Dropping the cache here makes
    # it see the update, as fp32 steps do. (Only weights that require a gradient are cached, which is
    # why a generator's loss through a just-updated D was right before: _d_step turns D's off.)
    torch.clear_autocast_cache()
