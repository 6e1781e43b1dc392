"""The ``cuda`` kernel adapter: the kernels of csrc/cuda/ (in aegan_fast._C when it is built with
CUDA) behind the ops' one contract (aegan_fast/ops/library.py); _C's cuda_* functions speak it.
"""
from __future__ import annotations

import torch

from .library import Adapter, BackendUnavailable


def adapter() -> Adapter:
    """The cuda Adapter, or BackendUnavailable saying what is missing."""
    try:
        from aegan_fast import _C
    except ImportError as e:
        raise BackendUnavailable(f"native extension aegan_fast._C is not importable ({e}); "
                                 "build it: `pip install -e . --no-build-isolation`") from None
    if not getattr(_C, "with_cuda", False) or not hasattr(_C, "cuda_bn_forward"):
        raise BackendUnavailable("extension built without CUDA (torch without CUDA, no nvcc/CUDA_HOME, or "
                                 "AEGAN_NO_CUDA=1 at build time)")
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device")
    return Adapter("cuda", ("cuda",), _C.cuda_bn_forward, _C.cuda_bn_backward)
