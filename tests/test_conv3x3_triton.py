"""conv3x3 reflect-pad Triton kernels (forward with BN+act prologue and statistics epilogue, dgrad,
dgrad with the previous BatchNorm's backward sums, wgrad) against plain PyTorch under TRITON_INTERPRET=1.

The cases (odd shapes, Ci != Co, C=64, H or W of 2 and 3, NCHW / channels_last / neither, every
prologue, statistics on and off and with |mean| >> std, multi-block loops, fp32 to 1e-5 of scale,
bf16 against fp32 truth, bad inputs) live in conv3x3_interp_worker.py and run in one child process
with the interpreter on, so it never leaks into this process (other tests use torch.compile).
Every kernel's sm_80/sm_90 AOT build is in test_kernels_aot.py (aot.kernels() lists them).
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
WORKER = HERE / "conv3x3_interp_worker.py"


def _load_worker_cases():
    spec = importlib.util.spec_from_file_location("conv3x3_interp_worker", WORKER)
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
def test_conv3x3_interpreter_parity(interp_results, case):
    result = interp_results.get(case, "missing from the worker's output")
    assert result == "ok", result


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
def test_dot_precision_in_ptx():
    """fp32 operands stay IEEE fp32 (no TF32 tensor-core ops: parity with F.conv2d to 1e-5); bf16
    operands use the tensor cores. Checked on the wgrad kernel (it shares _dot with the others and
    compiles in about a second)."""
    from aegan_fast.kernels import aot
    fn, consts = aot.kernels()["conv3x3_wgrad"]
    fp32 = aot.compile_kernel(fn, 80, "fp32", "nchw", constexprs=consts).asm["ptx"]
    assert "tf32" not in fp32 and "mma" not in fp32
    bf16 = aot.compile_kernel(fn, 90, "bf16", "channels_last", constexprs=consts).asm["ptx"]
    assert "mma" in bf16 and ".bf16" in bf16
