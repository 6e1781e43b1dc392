"""Triton kernel: parity with aegan_fast.ops.reference under TRITON_INTERPRET=1, on CPU tensors.

The cases (forward, running statistics and every gradient, through the ops' one schema with
kernel="triton"; train and eval; NCHW and channels_last; fp32 to 1e-5 of scale, bf16/fp16 against
fp32 truth; a realistic N16 C64 32x32 layer; the modules under ops.use_backend("triton")) live in
triton_interp_worker.py and run in one child process with the interpreter on: the interpreter is
fixed process-wide when the kernels are imported, so it must never leak into this process, where
other tests use torch.compile (and, on a GPU machine, real Triton).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
WORKER = HERE / "triton_interp_worker.py"


def _load_worker_cases():
    spec = importlib.util.spec_from_file_location("triton_interp_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines CASES only; imports neither torch nor triton at top level
    return mod.CASES


CASES = _load_worker_cases()
HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install -r requirements.txt)")


@pytest.fixture(scope="module")
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_interpreter_parity(interp_results, case):
    result = interp_results.get(case, "missing from the worker's output")
    assert result == "ok", result


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

