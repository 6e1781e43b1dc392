"""conv3x3 reflect-pad Triton kernels (forward with BN+act prologue and statistics epilogue, dgrad,
dgrad with the previous BatchNorm's backward sums, wgrad) against plain PyTorch under TRITON_INTERPRET=1.

The cases (odd shapes, Ci != Co, C=64, H or W of 2 and 3, NCHW / channels_last / neither, every
prologue, statistics on and off and with |mean| >> std, multi-block loops, fp32 to 1e-5 of scale,
bf16 against fp32 truth, bad inputs) live in conv3x3_interp_worker.py and run in one child process
(interp_harness.py says why and how).
Every kernel's sm_80/sm_90 AOT build is in test_kernels_aot.py (aot.kernels() lists them).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from interp_harness import needs_triton, parity_tests

WORKER = Path(__file__).resolve().parent / "conv3x3_interp_worker.py"
interp_results, test_conv3x3_interpreter_parity = parity_tests(WORKER)


@pytest.mark.build
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
