"""The ``cpp`` kernel adapter: the CPU kernels of csrc/ (aegan_fast._C) behind the ops' one
contract (aegan_fast/ops/library.py). _C's functions already speak it: forward -> (out, mean,
biased var), backward from x (and the residual) -> (grad_x, grad_residual, grad_weight, grad_bias).
"""
from __future__ import annotations

from .library import Adapter, BackendUnavailable


def adapter() -> Adapter:
    """The cpp Adapter, or BackendUnavailable naming what is missing and how to fix it."""
    try:
        from aegan_fast import _C
    except ImportError as e:
        msg = str(e)
        hint = ("rebuild it against this torch: `pip install -e . --no-build-isolation`"
                if "undefined symbol" in msg or "version" in msg else
                "build it: `make setup` or `pip install -e . --no-build-isolation`")
        raise BackendUnavailable(f"native extension aegan_fast._C is not importable ({msg}); {hint}") from None
    if not hasattr(_C, "bn_forward"):
        raise BackendUnavailable("aegan_fast._C was built without the CPU BatchNorm kernels (csrc/bindings.cpp); "
                                 "rebuild with `pip install -e . --no-build-isolation`")
    if not getattr(_C, "openmp", False):
        raise BackendUnavailable("aegan_fast._C was built without OpenMP, so its CPU kernels run on one core; "
                                 "rebuild with a compiler that supports -fopenmp")
    return Adapter("cpp", ("cpu",), _C.bn_forward, _C.bn_backward)
