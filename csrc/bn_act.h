// Fused BatchNorm2d + activation (+ residual add) kernels for the CPU: the torch-free core.
//
// These functions know nothing about torch: they take raw pointers and one plain params struct
// (BnParams), so the same code is linked into the torch extension (csrc/bindings.cpp, which does
// every argument check with TORCH_CHECK before calling in) and into the plain CMake library with
// its C++ tests (csrc/tests/). Nothing here validates arguments: callers must.
//
// Algorithm (DESIGN §3, issue 3): forward = one statistics pass + one apply pass; backward = one
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
using ::aegan_fast::kMinAbsWeight;
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

// Where backward gets xhat (the normalised input) and the activation's derivative from.
struct BnBackwardArgs {
  const void* dy = nullptr;   // gradient of the output, p.dtype
  // src: x itself (xhat = (x - mean) * invstd), or, in memory-efficient mode, the output y
  // (xhat = (act^-1(y) - b) / w). The activation must then be invertible: identity or LeakyReLU
  // with slope > 0.
  const void* src = nullptr;
  bool src_is_output = false;
  // y: the output, used for the activation's derivative (y > 0 <=> pre-activation > 0 for ReLU and
  // LeakyReLU with slope >= 0). Null: the derivative comes from z = x * scale + shift recomputed
  // from x (bn_act), or from src when src_is_output. Needed for bn_add_act (z includes residual).
  const void* y = nullptr;
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

// ---- storage conversion (exposed for the C++ tests) -------------------------------------------
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);  // round to nearest even, NaN -> quiet NaN (as c10::BFloat16)
float fp16_to_float(uint16_t h);
uint16_t float_to_fp16(float f);  // IEEE binary16, round to nearest even (as c10::Half)

}  // namespace cpu
}  // namespace aegan_fast
