"""kernels/convt4x4.py (the up block's 4x4 stride-2 ConvTranspose2d with a BatchNorm+activation prologue and a
statistics epilogue, its data and weight gradients) against plain PyTorch, under TRITON_INTERPRET=1 on CPU tensors.

The cases live in convt4x4_interp_worker.py (see it for what each case checks) and run in one child process:
interp_harness.py says why and how.
"""
from __future__ import annotations

from pathlib import Path

from interp_harness import parity_tests

WORKER = Path(__file__).resolve().parent / "convt4x4_interp_worker.py"
interp_results, test_convt4x4_interpreter_parity = parity_tests(WORKER)
