"""kernels/convt4x4.py (the up block's 4x4 stride-2 ConvTranspose2d with a BatchNorm+activation prologue and a
statistics epilogue, its data and weight gradients) against plain PyTorch, under TRITON_INTERPRET=1 on CPU tensors.

The cases live in convt4x4_interp_worker.py and run in one child process with the interpreter on: it is fixed
process-wide when the kernels are imported, so it must never leak into this process, where other tests use
torch.compile (and, on a GPU machine, real Triton). See the worker for what each case checks.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / "convt4x4_interp_worker.py"


def _load_worker_cases():
    spec = importlib.util.spec_from_file_location("convt4x4_interp_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines CASES only; imports neither torch nor triton at top level
    return mod.CASES


CASES = _load_worker_cases()
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install -r requirements.txt)")


@pytest.fixture(scope="module")
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=HERE)
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_convt4x4_interpreter_parity(interp_results, case):
    result = interp_results.get(case, "missing from the worker's output")
    assert result == "ok", result
