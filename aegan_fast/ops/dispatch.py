"""The one place that knows which backend runs a fused op.

Backends register here by name. ``auto`` picks the fastest backend that can run on the tensor's
device and falls back to ``reference`` with a one-time warning naming the reason; an explicitly
requested backend (``AEGAN_OPS=...``, ``--ops``) that cannot run is an error, never a silent
fallback.
"""
from __future__ import annotations

import importlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from . import reference

log = logging.getLogger("aegan_fast.ops")

BACKENDS = ("reference", "cpp", "cuda", "triton")
# Preference order for `auto`, per device type. Measured order on GPU is recorded in bench/RESULTS.md.
# The cuda-vs-triton order on CUDA tensors is NOT measured yet (no GPU so far): set it from
# bench/bench_ops_gpu.py on a GPU and record the figures in bench/RESULTS.md.
AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


@dataclass
class Backend:
    name: str
    devices: tuple[str, ...]
    bn_act: Callable
    bn_add_act: Callable


class BackendUnavailable(RuntimeError):
    pass


_loaded: dict[str, Backend | str] = {}  # name -> Backend, or the reason it cannot load
_requested = os.environ.get("AEGAN_OPS", "auto")
_warned: set[str] = set()


def _load(name: str) -> Backend | str:
    """Import a backend module lazily; returns the Backend or a one-line reason it is unavailable."""
    if name not in _loaded:
        if name == "reference":
            _loaded[name] = Backend("reference", ("cpu", "cuda", "mps", "xpu"),
                                    reference.bn_act, reference.bn_add_act)
        else:
            try:
                module = importlib.import_module(f"aegan_fast.ops._{name}")
                _loaded[name] = module.backend()
            except ModuleNotFoundError as e:
                _loaded[name] = f"not built ({e})"
            except BackendUnavailable as e:
                _loaded[name] = str(e)
            except Exception as e:  # a broken backend must not take the package down; say why
                _loaded[name] = f"failed to load: {type(e).__name__}: {e}"
    return _loaded[name]


def availability() -> dict[str, str | None]:
    """name -> None when the backend loads, else the reason it does not (for the doctor)."""
    return {n: (None if isinstance(b, Backend) else b) for n in BACKENDS for b in [_load(n)]}


def set_backend(name: str) -> None:
    """Choose the backend for every op: 'auto' or one of BACKENDS. Raises ValueError for an unknown
    name and BackendUnavailable for a backend that cannot load here."""
    global _requested
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")
    if name != "auto":
        b = _load(name)
        if not isinstance(b, Backend):
            raise BackendUnavailable(f"ops backend {name!r} is unavailable: {b}")
    _requested = name


@contextmanager
def use_backend(name: str):
    """Run the enclosed code with ops backend ``name`` ('auto' or one of BACKENDS); raises ValueError
    for an unknown name and BackendUnavailable for one that cannot load here."""
    before = _requested
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def get_backend() -> str:
    return _requested


def resolve(device_type: str) -> Backend:
    """The backend that will run ops on tensors of this device type."""
    if _requested != "auto":
        b = _load(_requested)
        if not isinstance(b, Backend):
            raise BackendUnavailable(f"ops backend {_requested!r} is unavailable: {b}")
        if device_type not in b.devices:
            raise BackendUnavailable(
                f"ops backend {_requested!r} cannot run on {device_type} tensors (it runs on {', '.join(b.devices)})")
        return b
    reasons = []
    for name in AUTO_ORDER.get(device_type, ()):
        b = _load(name)
        if isinstance(b, Backend) and device_type in b.devices:
            return b
        reasons.append(f"{name}: {b if isinstance(b, str) else 'not for this device'}")
    key = device_type
    if key not in _warned and reasons:
        _warned.add(key)
        log.warning("aegan_fast.ops: no fast backend for %s tensors, using reference (%s)",
                    device_type, "; ".join(reasons))
    return _load("reference")  # type: ignore[return-value]


def bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps,
           activation="relu", negative_slope=0.01, memory_efficient=False):
    return resolve(x.device.type).bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                         activation, negative_slope, memory_efficient)


def bn_add_act(x, residual, running_mean, running_var, weight, bias, training, momentum, eps,
               activation="identity", negative_slope=0.01):
    return resolve(x.device.type).bn_add_act(x, residual, running_mean, running_var, weight, bias, training,
                                             momentum, eps, activation, negative_slope)
