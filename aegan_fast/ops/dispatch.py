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

from . import library, reference
from .library import BackendUnavailable

log = logging.getLogger("aegan_fast.ops")

BACKENDS = ("reference", *library.KERNELS)
# Preference order for `auto`, per device type. The cuda-vs-triton order on CUDA tensors is NOT
# measured yet: set it from bench/bench_ops_gpu.py on a GPU and record the figures in bench/RESULTS.md.
AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
# `auto` takes the reference below this many elements per call (x.numel()), where the kernel's
# per-call cost beats its gain. CPU: measured with bench/bench_ops.py --sweep (BatchNormAct2d
# forward+backward, leaky_relu, fp32, 2 threads): see the sweep in bench/RESULTS.md. CUDA: not
# measured yet (no GPU so far), so no threshold.
AUTO_MIN_ELEMENTS = {"cpu": 0}

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


def small(device_type: str, numel: int) -> bool:
    """Whether `auto` leaves a call of this size to the reference."""
    return numel < AUTO_MIN_ELEMENTS.get(device_type, 0)


def resolve(device_type: str, numel: int | None = None, backend: str | None = None) -> str:
    """The kernel ('cpp' | 'cuda' | 'triton') or 'reference' that runs an op on a tensor of this
    device type and size, for ``backend`` (default: the context's request)."""
    name = requested() if backend is None else backend
    if name != "auto":
        _check(name)
        if name != "reference":
            a = library.load(name)
            if device_type not in a.devices:  # type: ignore[union-attr]
                raise BackendUnavailable(f"ops backend {name!r} cannot run on {device_type} tensors "
                                         f"(it runs on {', '.join(a.devices)})")  # type: ignore[union-attr]
        return name
    if numel is not None and small(device_type, numel):
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
    return run(resolve(x.device.type, x.numel()), x, None, running_mean, running_var, weight, bias, training,
               momentum, eps, activation, negative_slope)


def bn_add_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
               activation="identity", negative_slope=0.01):
    return run(resolve(x.device.type, x.numel()), x, residual, running_mean, running_var, weight, bias, training,
               momentum, eps, activation, negative_slope)
