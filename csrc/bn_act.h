// Fused BatchNorm2d + activation (+ residual add) kernels for the CPU: the torch-free core.
//
// These functions know nothing about torch: they take raw pointers and one plain params struct
// (BnParams), so the same code is linked into the torch extension (csrc/bindings.cpp, which does
// every argument check with TORCH_CHECK before calling in) and into the plain CMake library with
// its C++ tests (csrc/tests/). Nothing here validates arguments: callers must.
//
// Algorithm (issue 3): forward = one statistics pass + one apply pass; backward = one
// reduction pass + one apply pass (in eval mode the reduction pass also writes grad input, so
// backward is a single pass). Statistics are accumulated in fp32 over short blocks of a shifted
// input (x - K_c, K_c = the channel's first element), block totals are added in fp64 — see
// bn_act_cpu.cpp for why that is accurate. Storage may be fp32, bf16 or fp16; arithmetic is fp32.
#pragma once

#include <cstdint>

#include "bn_params.h"

namespace aegan_fast {
namespace cpu {

using ::aegan_fast::Act;
using ::aegan_fast::BnParams;
using ::aegan_fast::DType;
using ::aegan_fast::Layout;

// ---- forward ----------------------------------------------------------------------------------

// Batch statistics per channel: mean[c] and the biased variance var[c] (sum of squared deviations
// / count), both fp64. One read of x.
void bn_stats(const BnParams& p, const void* x, double* mean, double* var);

// y = act(x * scale[c] + shift[c] (+ residual)), written in p.dtype. residual may be null.
// scale/shift fold the normalisation and the affine: scale = w * invstd, shift = b - mean * scale.
void bn_forward_apply(const BnParams& p, const void* x, const void* residual, const float* scale,
                      const float* shift, void* y);

// ---- backward ---------------------------------------------------------------------------------

// What backward reads. It recomputes the pre-activation z = x * scale + shift (+ residual) from the
// saved input, exactly as the forward computed it, for the activation's derivative.
struct BnBackwardArgs {
  const void* dy = nullptr;        // gradient of the output, p.dtype
  const void* x = nullptr;         // the forward's input
  const void* residual = nullptr;  // bn_add_act with a non-identity activation; null otherwise
  // Per-channel fp32 vectors of length C.
  const float* mean = nullptr;    // batch mean (training) or running mean (eval)
  const float* invstd = nullptr;  // 1 / sqrt(var + eps) of the same statistics
  const float* weight = nullptr;  // gamma (callers pass ones when the module has no affine)
  const float* bias = nullptr;    // beta (zeros when none)
  bool training = true;           // batch statistics: gradient flows through mean and var too
};

struct BnBackwardOut {
  void* dx = nullptr;            // grad input, p.dtype (required)
  void* dres = nullptr;          // grad residual (= grad of the pre-activation), p.dtype; may be null
  float* dweight = nullptr;      // sum(dz * xhat) per channel (required, length C)
  float* dbias = nullptr;        // sum(dz) per channel (required, length C)
};

// The whole backward: reduction pass (+ apply pass in training mode).
void bn_backward(const BnParams& p, const BnBackwardArgs& a, const BnBackwardOut& o);

// ---- instruction set --------------------------------------------------------------------------
// The kernels are compiled for baseline x86-64, AVX2 and AVX-512 (F, BW, VL, DQ) and the best one the
// CPU supports runs ("base" only off x86 or with a compiler other than GCC). AEGAN_CPU_ISA=base|avx2
// |avx512 in the environment caps the choice at start; set_cpu_isa changes it (tests compare the
// paths) and returns false, changing nothing, for an unknown name or one this CPU cannot run.
const char* cpu_isa();       // the one in use
const char* best_cpu_isa();  // the best this CPU supports
bool set_cpu_isa(const char* name);

// ---- storage conversion (exposed for the C++ tests) -------------------------------------------
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);  // round to nearest even, NaN -> quiet NaN (as c10::BFloat16)
float fp16_to_float(uint16_t h);
uint16_t float_to_fp16(float f);  // IEEE binary16, round to nearest even (as c10::Half)

}  // namespace cpu
}  // namespace aegan_fast
