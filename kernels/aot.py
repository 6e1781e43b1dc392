"""Ahead-of-time compilation of every kernel for a CUDA target, without a GPU.

    python -m aegan_fast.kernels.aot --arch 90 --dtype bf16 --layout channels_last --out /tmp/ptx

``compile_kernel`` builds the same specialisation the JIT would pick at run time (unit strides
become constants, as Triton specialises integer arguments equal to 1) and returns triton's
CompiledKernel, whose ``asm`` dict holds "ttir", "ttgir", "llir", "ptx" and "cubin".
"""
from __future__ import annotations

import argparse
import os

from . import _common, bn_act, conv3x3, convt4x4

DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
# Pointer arguments that carry activations (the input dtype); every other pointer is fp32.
DATA_POINTERS = {"x_ptr", "y_ptr", "r_ptr", "dy_ptr", "src_ptr", "dx_ptr", "dz_ptr", "wt_ptr"}
FLOAT_SCALARS = {"eps", "slope", "inv_count"}


def kernels():
    """name -> (JITFunction, per-kernel constexpr defaults)."""
    tile = dict(BLOCK_C=64, BLOCK_I=32, INT64=False)
    return {
        "stats_partial": (_common._stats_partial_kernel, tile),
        "stats_finalize": (_common._stats_finalize_kernel, dict(BLOCK_C=_common.FINALIZE_BLOCK)),
        "sum_partials": (_common._sum_partials_kernel, dict(BLOCK_C=_common.FINALIZE_BLOCK)),
        "bn_act_fwd": (bn_act._bn_act_fwd_kernel, dict(tile, HAS_W=True, HAS_B=True, HAS_RES=False)),
        "bn_act_bwd_reduce": (bn_act._bn_bwd_reduce_kernel, dict(tile, HAS_W=True, HAS_B=True, HAS_RES=False)),
        "bn_act_bwd": (bn_act._bn_bwd_kernel, dict(tile, HAS_W=True, HAS_B=True, TRAINING=True)),
        "bn_add_act_fwd": (bn_act._bn_act_fwd_kernel, dict(tile, HAS_W=True, HAS_B=True, HAS_RES=True)),
        "bn_add_act_bwd_reduce": (bn_act._bn_bwd_reduce_kernel, dict(tile, HAS_W=True, HAS_B=True, HAS_RES=True)),
        # bn_add_act's apply pass: bn_act's, reading the dz its reduction wrote (the identity's dz = dy)
        "bn_add_act_bwd": (bn_act._bn_bwd_kernel, dict(tile, HAS_W=True, HAS_B=False, TRAINING=True, ACT=0)),
        "conv3x3_fwd": (conv3x3._conv3x3_fwd_kernel, dict(conv3x3.GPU_BLOCKS, HAS_PRO=True, STATS=True,
                                                           INT64=False)),
        # the BatchNorm-reduce variant: the plain dgrad's code plus its epilogue (one long compile, not two)
        "conv3x3_dgrad": (conv3x3._conv3x3_dgrad_kernel,
                          dict(conv3x3.GPU_BLOCKS, BN_REDUCE=True, HAS_W=True, HAS_B=True, INT64=False)),
        "conv3x3_wgrad": (conv3x3._conv3x3_wgrad_kernel, dict(conv3x3.GPU_WGRAD_BLOCKS, HAS_PRO=True, INT64=False)),
        "convt4x4_fwd": (convt4x4._convt_fwd_kernel, dict(convt4x4.FWD_BLOCKS, HAS_AFFINE=True, STATS=True,
                                                           INT64=False)),
        "convt4x4_dgrad": (convt4x4._convt_dgrad_kernel, dict(convt4x4.DGRAD_BLOCKS, INT64=False)),
        "convt4x4_wgrad": (convt4x4._convt_wgrad_kernel, dict(convt4x4.WGRAD_BLOCKS, HAS_AFFINE=True, INT64=False)),
    }


def compile_kernel(fn, arch: int, dtype: str = "fp32", layout: str = "nchw", activation: int = 2,
                   constexprs: dict | None = None, num_warps: int = 4):
    """Compile one @triton.jit kernel for sm_<arch>. ``layout`` decides which stride is the
    constant 1 (``sI`` for NCHW, ``sC`` for channels_last), as at run time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    params = fn.params if hasattr(fn, "params") else None
    const_names = {p.name for p in params if p.is_constexpr} if params is not None else set()
    consts = dict(constexprs or {})
    if "ACT" in names:
        consts.setdefault("ACT", activation)
    if "CL" in names:  # kernels that derive their strides from the shape (conv3x3)
        consts.setdefault("CL", layout == "channels_last")
    unit = "sI" if layout == "nchw" else "sC"
    if unit in names:
        consts[unit] = 1
    signature = {}
    for name in names:
        if name in consts or name in const_names:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = DTYPES[dtype] if name in DATA_POINTERS else "*fp32"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    missing = [n for n in names if signature[n] == "constexpr" and n not in consts]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
    # Pointers are 16-byte aligned (torch's allocator) and, at the shapes that matter (C=64,
    # 128x128 and up), every integer argument is a multiple of 16: the JIT notes both at run time.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or signature[n] == "i32"}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw")
    p.add_argument("--out", help="write <kernel>.ptx and <kernel>.cubin here")
    a = p.parse_args(argv)
    for name, (fn, consts) in kernels().items():
        k = compile_kernel(fn, a.arch, a.dtype, a.layout, constexprs=consts)
        print(f"{name:32s} ptx {len(k.asm['ptx']):7d} B  cubin {len(k.asm.get('cubin', b'')):7d} B")
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, f"{name}.ptx"), "w") as f:
                f.write(k.asm["ptx"])
            with open(os.path.join(a.out, f"{name}.cubin"), "wb") as f:
                f.write(k.asm["cubin"])


if __name__ == "__main__":
    main()
