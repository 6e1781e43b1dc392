"""Triton kernel: parity with aegan_fast.ops.reference under TRITON_INTERPRET=1, on CPU tensors.

The cases (forward, running statistics and every gradient, through the ops' one schema with
kernel="triton"; train and eval; NCHW and channels_last; fp32 to 1e-5 of scale, bf16/fp16 against
fp32 truth; a realistic N16 C64 32x32 layer; the modules under ops.use_backend("triton")) live in
triton_interp_worker.py and run in one child process: interp_harness.py says why and how.
"""
from __future__ import annotations

import ast
import re
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


@needs_triton
def test_host_layer_int64_policy():
    """int64 offsets exactly when a tensor's largest element offset passes int32's range, whatever its
    layout (meta tensors: the sizes without the memory)."""
    from aegan_fast.kernels import host
    assert not host.needs_int64(torch.empty(2 ** 31 - 1, device="meta"))  # last offset 2**31 - 2
    assert host.needs_int64(torch.empty(2 ** 31, device="meta"))
    small = torch.empty(2, 3, 4, 5, device="meta")
    big_cl = torch.empty(2, 2 ** 14, 2 ** 8, 2 ** 8, device="meta").to(memory_format=torch.channels_last)
    assert host.needs_int64(small, big_cl) and not host.needs_int64(small)
    # a view's offsets are those of the tensor it walks: 2 elements 2**31 apart need int64
    assert host.needs_int64(torch.empty(2 ** 32, device="meta")[:: 2 ** 31])


@needs_triton
def test_host_layer_raises_one_exception_type():
    """Every check of the host layer raises ValueError naming the argument (the workers check each
    kernel's messages under the interpreter); without the interpreter CPU tensors are refused."""
    from aegan_fast.kernels import host
    if host.interpreting():
        pytest.skip("TRITON_INTERPRET=1: CPU tensors are allowed")
    x = torch.randn(2, 3, 4, 5)
    for call, msg in ((lambda: host.check_tensor("x", x), "x is on cpu: the Triton kernels need CUDA tensors"),
                      (lambda: host.check_tensor("w", x, like=("x", x), dim=3), "w must be 3-D"),
                      (lambda: host.check_tensor("w", x.double(), like=("x", x)), "float32, bfloat16 or float16"),
                      (lambda: host.check_tensor("s", x[0, 0, 0], shape=(3,), like=("x", x)),
                       "s must be of shape (3,)"),
                      (lambda: host.check_tensor("w", x.half(), like=("x", x), same_dtype=True), "share one dtype"),
                      (lambda: host.check_act(3), "unknown activation code 3"),
                      (lambda: host.check_act("relu"), "unknown activation code 'relu'"),
                      (lambda: host.check_dtype("out_dtype", torch.int32), "out_dtype must be")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            call()


@needs_triton
def test_the_aot_build_lists_every_kernel_and_names_a_missing_constexpr():
    """kernels/aot.py's list (what test_kernels_aot.py compiles for sm_80/sm_90, a build step) holds
    every launched @triton.jit kernel (a *_kernel) of the kernel modules, and a specialisation left
    without one of its constexprs is refused by name before anything compiles."""
    import triton
    from aegan_fast.kernels import _common, aot, bn_act, conv3x3, convt4x4
    launched = {v for m in (_common, bn_act, conv3x3, convt4x4) for name, v in vars(m).items()
                if name.endswith("_kernel") and isinstance(v, triton.runtime.jit.JITFunction)}
    listed = {fn for fn, _ in aot.kernels().values()}
    assert len(launched) >= 11 and launched == listed
    fn, consts = aot.kernels()["conv3x3_wgrad"]
    with pytest.raises(ValueError, match=r"_conv3x3_wgrad_kernel: no value for constexpr \[.*'HAS_PRO'"):
        aot.compile_kernel(fn, 80, constexprs={k: v for k, v in consts.items() if k != "HAS_PRO"})
