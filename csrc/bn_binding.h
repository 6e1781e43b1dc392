// Torch-side helpers shared by the CPU binding (bindings.cpp) and the CUDA binding
// (cuda/bn_cuda_binding.cpp): argument checks and the translation of tensors into BnParams. Every
// check happens here, up front, with TORCH_CHECK, so bad input gives one clear message (naming the
// backend, `who`) and the torch-free kernels can assume well-formed pointers.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "bn_params.h"

namespace aegan_fast {
namespace binding {

using at::Tensor;
using c10::optional;

inline bool present(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

inline DType dtype_of(const Tensor& x, const char* who) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "aegan_fast ", who, " ops: input must be float32, bfloat16 or float16, got ",
                         x.scalar_type());
  }
  return DType::kFloat32;
}

inline Act act_of(int64_t act, const char* who) {
  TORCH_CHECK(act == int64_t(Act::kIdentity) || act == int64_t(Act::kRelu) || act == int64_t(Act::kLeakyRelu),
              "aegan_fast ", who, " ops: activation code must be 0 (identity), 1 (relu) or 2 (leaky_relu), got ", act);
  return static_cast<Act>(act);
}

// NCHW-contiguous or channels_last-contiguous, checked; a tensor that is both (C == 1 or H*W == 1)
// counts as NCHW.
inline Layout layout_of(const Tensor& x, const char* who) {
  if (x.is_contiguous()) return Layout::kNCHW;
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "aegan_fast ", who, " ops: input must be contiguous "
              "in NCHW or channels_last memory format (call .contiguous() first), got sizes ", x.sizes(), " strides ",
              x.strides());
  return Layout::kNHWC;
}

// The launch description of x; the caller has checked x's device.
inline BnParams make_params(const Tensor& x, int64_t act, double slope, double eps, const char* who) {
  TORCH_CHECK(x.dim() == 4, "aegan_fast ", who, " ops: input must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) > 0, "aegan_fast ", who, " ops: input needs at least one channel");
  TORCH_CHECK(eps >= 0, "aegan_fast ", who, " ops: eps must be >= 0, got ", eps);
  BnParams p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.HW = x.size(2) * x.size(3);
  p.layout = layout_of(x, who);
  p.dtype = dtype_of(x, who);
  p.act = act_of(act, who);
  p.slope = static_cast<float>(slope);
  p.eps = static_cast<float>(eps);
  return p;
}

// Same shape, dtype, device and strides as x (the kernels index every tensor alike).
inline void check_like(const Tensor& t, const Tensor& x, const char* name, const char* who) {
  TORCH_CHECK(t.device() == x.device(), "aegan_fast ", who, " ops: ", name, " is on ", t.device(), ", input on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "aegan_fast ", who, " ops: ", name, " has dtype ", t.scalar_type(),
              ", input has ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "aegan_fast ", who, " ops: ", name, " has shape ", t.sizes(), ", input has ",
              x.sizes());
  TORCH_CHECK(t.numel() == 0 || t.strides() == x.strides(), "aegan_fast ", who, " ops: ", name,
              " must have the input's memory format (strides ", x.strides(), "), got strides ", t.strides());
}

// A per-channel vector as a contiguous fp32 tensor on x's device; undefined when absent.
inline Tensor channel_vector(const optional<Tensor>& t, const Tensor& x, const char* name, const char* who) {
  if (!present(t)) return Tensor();
  TORCH_CHECK(t->device() == x.device(), "aegan_fast ", who, " ops: ", name, " is on ", t->device(), ", input on ",
              x.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "aegan_fast ", who, " ops: ", name, " must have shape (",
              x.size(1), "), got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "aegan_fast ", who, " ops: ", name,
              " must be floating point, got ", t->scalar_type());
  return t->to(at::kFloat).contiguous();
}

// 1 / sqrt(var + eps) in fp32 from the fp32 variance: the forward and the backward both call this,
// so they fold the normalisation with bit-identical factors (and agree on the activation's sign).
inline Tensor invstd_of(const Tensor& var32, double eps) { return var32.to(at::kDouble).add(eps).rsqrt().to(at::kFloat); }

}  // namespace binding
}  // namespace aegan_fast
