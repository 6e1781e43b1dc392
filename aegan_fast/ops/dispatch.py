"""The one place that knows which kernel runs a fused op.

The choice is scoped, never a process global: ``with ops.use_backend("cpp"):`` sets a context
variable for the enclosed code (threads and asyncio tasks started elsewhere keep theirs);
``AEGAN_OPS`` gives the default. ``auto`` picks the fastest kernel that can run on the tensor's
device, takes the reference below the size where a kernel's per-call cost outweighs its gain,
and falls back to ``reference`` with a one-time warning naming the reason when no kernel loads;
an explicitly requested backend that cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from . import library, reference, sync_bn, upsample
from .library import BackendUnavailable

log = logging.getLogger("aegan_fast.ops")

BACKENDS = ("reference", *library.KERNELS)
# Preference order for `auto`, per device type. The cuda-vs-triton order on CUDA tensors is NOT
# measured yet: set it from bench/bench_ops_gpu.py on a GPU and record the figures in bench/RESULTS.md.
AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
# `auto` takes the reference below this many values per channel (N*H*W), where the kernel's fixed
# cost per call outweighs its gain: the smallest size at which cpp won every measured shape, per
# device and, on the CPU, per activation dtype and layout (key "cpu/bf16/channels_last": the
# trainer's bf16 path). Per channel rather than per call because the cost grows with C at a fixed
# map. Figures: bench/RESULTS.md, "`auto` never slower than reference" (fp32) and "Fused BN ops on
# bf16 channels_last" (bf16). CUDA is not measured yet, so it has no threshold.
AUTO_MIN_PER_CHANNEL = {"cpu": 4096, "cpu/bf16/channels_last": 16384}

_requested: ContextVar[str] = ContextVar("aegan_fast_ops_backend", default=os.environ.get("AEGAN_OPS", "auto"))
_warned: set[str] = set()


def _check(name: str) -> None:
    """ValueError for an unknown name, BackendUnavailable for a backend that cannot load here."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")
    if name not in ("auto", "reference"):
        a = library.load(name)
        if isinstance(a, str):
            raise BackendUnavailable(f"ops backend {name!r} is unavailable: {a}")


def availability() -> dict[str, str | None]:
    """name -> None when the backend loads, else the reason it does not (for the doctor)."""
    out: dict[str, str | None] = {"reference": None}
    for name in library.KERNELS:
        a = library.load(name)
        out[name] = a if isinstance(a, str) else None
    return out


# Dynamo cannot trace ContextVar.get: a compiled graph bakes in the backend requested when it was
# compiled (compile inside the `use_backend` block you mean it for).
@torch.compiler.assume_constant_result
def requested() -> str:
    """The backend the current context asks for: 'auto' or one of BACKENDS."""
    return _requested.get()


@contextmanager
def use_backend(name: str):
    """Run the enclosed code with ops backend ``name`` ('auto' or one of BACKENDS); raises ValueError
    for an unknown name and BackendUnavailable for one that cannot load here, on entering."""
    _check(name)
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


def size_key(device_type: str, dtype: torch.dtype | None = None, channels_last: bool = False) -> str:
    """The AUTO_MIN_PER_CHANNEL entry for tensors of this device type, dtype and layout: a measured
    per-layout entry where there is one, else the device type's (measured in fp32 NCHW)."""
    if dtype == torch.bfloat16 and channels_last:
        key = f"{device_type}/bf16/channels_last"
        if key in AUTO_MIN_PER_CHANNEL:
            return key
    return device_type


def small(device_type: str, per_channel: int, dtype: torch.dtype | None = None, channels_last: bool = False) -> bool:
    """Whether `auto` leaves a call with this many values per channel (N*H*W) to the reference."""
    return per_channel < AUTO_MIN_PER_CHANNEL.get(size_key(device_type, dtype, channels_last), 0)


def per_channel(x) -> int:
    return x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else x.numel()


def is_channels_last(x) -> bool:
    """Whether the kernels run x in channels_last (library.memory_format's choice)."""
    return library.memory_format(x) == torch.channels_last


def resolve(device_type: str, per_channel: int | None = None, backend: str | None = None,
            dtype: torch.dtype | None = None, channels_last: bool = False) -> str:
    """The kernel ('cpp' | 'cuda' | 'triton') or 'reference' that runs an op on a tensor of this
    device type, dtype and layout with this many values per channel, for ``backend`` (default: the
    context's request)."""
    name = requested() if backend is None else backend
    if name != "auto":
        _check(name)
        if name != "reference":
            a = library.load(name)
            if device_type not in a.devices:  # type: ignore[union-attr]
                raise BackendUnavailable(f"ops backend {name!r} cannot run on {device_type} tensors "
                                         f"(it runs on {', '.join(a.devices)})")  # type: ignore[union-attr]
        return name
    if per_channel is not None and small(device_type, per_channel, dtype, channels_last):
        return "reference"
    reasons = []
    for kernel in AUTO_ORDER.get(device_type, ()):
        a = library.load(kernel)
        if not isinstance(a, str) and device_type in a.devices:
            return kernel
        reasons.append(f"{kernel}: {a if isinstance(a, str) else 'not for this device'}")
    if device_type not in _warned and reasons:
        _warned.add(device_type)
        log.warning("aegan_fast.ops: no fast backend for %s tensors, using reference (%s)",
                    device_type, "; ".join(reasons))
    return "reference"


def run(kernel: str, x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
        activation, negative_slope):
    """One fused op with an already resolved kernel; residual None means bn_act."""
    if kernel == "reference":
        if residual is None:
            return reference.bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                    activation, negative_slope)
        return reference.bn_add_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
                                    activation, negative_slope)
    return library.run(kernel, x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
                       activation, negative_slope)


def bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, activation="relu",
           negative_slope=0.01):
    return run(resolve(x.device.type, per_channel(x), None, x.dtype, is_channels_last(x)), x, None, running_mean, running_var, weight, bias, training,
               momentum, eps, activation, negative_slope)


def bn_add_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
               activation="identity", negative_slope=0.01):
    return run(resolve(x.device.type, per_channel(x), None, x.dtype, is_channels_last(x)), x, residual, running_mean, running_var, weight, bias, training,
               momentum, eps, activation, negative_slope)


# ---- fused blocks (ops/blocks.py) -------------------------------------------------------------------

# The kernels a fused block op has ("triton" only) and the input dtypes its conv kernels take
# (kernels/conv3x3.py, convt4x4.py: fp32 and bf16).
BLOCK_KERNELS = ("triton",)
BLOCK_DTYPES = (torch.float32, torch.bfloat16)
BLOCK_ACTIVATIONS = ("identity", "relu", "leaky_relu")


def block_kernel(x, activation: str = "identity", weight=None, backend: str | None = None) -> str | None:
    """The kernel that runs a fused *block* (ops.blocks: resblock, up_block) on x, or None for the
    per-op path (convs, then the fused BatchNorm modules, each dispatched on its own).

    ``auto`` gives None on every device: no GPU measurement of the blocks yet; set it from
    bench/bench_blocks.py on a GPU and record the figures in bench/RESULTS.md. An explicit request
    for a block kernel that cannot run on x's device is an error, as for the BN ops; any other
    explicit backend (reference, cpp, cuda) has no block kernel and takes the per-op path. None,
    too, where the block op cannot stand in for the modules: inside ``ops.sync_batchnorm()`` with
    more than one rank (the block op has no cross-rank statistics), under autocast (the per-op path
    casts per layer), H or W below 2 (reflect padding needs two pixels), an activation outside
    BLOCK_ACTIVATIONS, a dtype outside BLOCK_DTYPES, or a conv weight in another dtype or on
    another device than x (the stock conv's own error then names it)."""
    name = requested() if backend is None else backend
    if name not in BLOCK_KERNELS:
        _check(name)  # an unknown name is still an error
        return None
    resolve(x.device.type, backend=name)  # BackendUnavailable when it cannot run on this device
    if sync_bn.enabled() or torch.is_autocast_enabled(x.device.type):
        return None
    if (x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2 or activation not in BLOCK_ACTIVATIONS
            or x.dtype not in BLOCK_DTYPES):
        return None
    if weight is not None and (weight.dtype != x.dtype or weight.device != x.device):
        return None
    return name


# ---- resize-conv (ops/upsample.py) ------------------------------------------------------------------

def resize_conv3x3(x, weight, bias):
    """models.ResizeConv2d's function: as four phase convolutions (upsample.py) on every backend but
    ``reference``, which keeps the plain upsample-pad-conv a port of the paper's code would run."""
    if requested() == "reference":
        return reference.resize_conv3x3(x, weight, bias)
    return upsample.resize_conv3x3(x, weight, bias)
