"""Triton kernel: parity with aegan_fast.ops.reference under TRITON_INTERPRET=1, on CPU tensors.

The cases (forward, running statistics and every gradient, through the ops' one schema with
kernel="triton"; train and eval; NCHW and channels_last; fp32 to 1e-5 of scale, bf16/fp16 against
fp32 truth; a realistic N16 C64 32x32 layer; the modules under ops.use_backend("triton")) live in
triton_interp_worker.py and run in one child process: interp_harness.py says why and how.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from interp_harness import needs_triton, parity_tests

WORKER = Path(__file__).resolve().parent / "triton_interp_worker.py"
interp_results, test_triton_interpreter_parity = parity_tests(WORKER)


@needs_triton
def test_backend_refuses_without_cuda():
    """Without a CUDA device the backend does not load, and says why (the doctor shows this)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the backend loads (covered by test_ops_gpu.py)")
    from aegan_fast import ops
    assert "no CUDA device" in ops.availability()["triton"]
    with pytest.raises(ops.BackendUnavailable, match="no CUDA device"):
        with ops.use_backend("triton"):
            pass



@needs_triton
def test_kernel_activation_codes_are_the_ops_codes():
    """The kernels take the activation as the ops contract passes it, its code: host.ACTIVATIONS
    (what _common.activate interprets) must name the codes of aegan_fast.ops.activations."""
    from aegan_fast.kernels import host
    from aegan_fast.ops import activations
    assert {name: code for code, name in host.ACTIVATIONS.items()} == activations.CODES


def test_kernels_import_nothing_from_ops():
    """One-way flow: aegan_fast.ops uses the kernels, the kernels never import aegan_fast.ops."""
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    found = []
    for path in sorted(kernels.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith("aegan_fast.ops") or n == "aegan_fast"]
    assert len(list(kernels.glob("*.py"))) >= 5 and not found, found
