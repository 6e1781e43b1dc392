// Fused BatchNorm2d + activation (+ residual add) kernels for CUDA: the torch-free core.
//
// Plain pointers and one params struct, so the kernels (bn_cuda.cu) compile with nvcc alone and the
// torch binding (bn_cuda_binding.cpp, every argument check up front with TORCH_CHECK) is the only
// place that knows about tensors. Same algorithm as the Triton kernels (kernels/) and the CPU ones
// (csrc/bn_act_cpu.cpp):
//
//   forward  = statistics pass (per-thread Welford, block tree merge, per-(block, split) partials,
//              fixed-order Chan merge of the partials in a finalize kernel) + apply pass;
//   backward = reduction pass (sum dz, sum dz*xhat per channel; for bn_add_act it also writes
//              dz = grad residual) + apply pass (grad input).
//
// Storage may be fp32, bf16 or fp16; arithmetic is fp32. Every activation-sized tensor (x, residual,
// y, dy, dx, dres) has the same dtype and memory format. Per-channel vectors are fp32.
//
// Addressing, for both memory formats: x[o, c, i] = o*sO + c*sC + i*sI with
//   NCHW:          o = n, i = h*W + w         (sO = C*HW, sC = HW, sI = 1)
//   channels_last: o = 0, i = (n*H + h)*W + w  (sO = 0,    sC = 1,  sI = C)
// and thread blocks lay their x dimension along the unit-stride axis (i for NCHW, c for NHWC).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../bn_params.h"

namespace aegan_fast {
namespace cuda {

using ::aegan_fast::Act;
using ::aegan_fast::BnParams;
using ::aegan_fast::DType;
using ::aegan_fast::Layout;

// How many programs share one channel block in the reduction passes, for a device with num_sms
// multiprocessors. The partials buffers hold splits * C floats each.
int bn_num_splits(const BnParams& p, int num_sms);

// ---- forward ----------------------------------------------------------------------------------

// mean[c] and biased var[c] (fp32) in one read of x. partials: 3 * splits * C floats of scratch.
void bn_stats(const BnParams& p, const void* x, int splits, float* partials, float* mean, float* var,
              cudaStream_t stream);

// y = act(x * scale[c] + shift[c] (+ residual)) with scale = w * rsqrt(var + eps), shift = b - mean * scale.
// residual, weight and bias may be null (no residual; w = 1; b = 0).
void bn_forward_apply(const BnParams& p, const void* x, const void* residual, const float* mean, const float* var,
                      const float* weight, const float* bias, void* y, cudaStream_t stream);

// ---- backward ---------------------------------------------------------------------------------

struct BnBackwardArgs {
  const void* dy = nullptr;        // gradient of the output
  const void* x = nullptr;         // the forward's input
  const void* residual = nullptr;  // bn_add_act: z = x*scale + shift + residual
  const float* mean = nullptr;     // batch (training) or running (eval) statistics
  const float* var = nullptr;
  const float* weight = nullptr;   // may be null (1)
  const float* bias = nullptr;     // may be null (0)
  bool training = true;
};

struct BnBackwardOut {
  void* dx = nullptr;      // required
  void* dres = nullptr;    // grad of the pre-activation (= grad residual); null: not written
  float* dweight = nullptr;  // sum(dz * xhat), length C, required
  float* dbias = nullptr;    // sum(dz), length C, required
};

// partials: 2 * splits * C floats of scratch.
void bn_backward(const BnParams& p, const BnBackwardArgs& a, const BnBackwardOut& o, int splits, float* partials,
                 cudaStream_t stream);

}  // namespace cuda
}  // namespace aegan_fast
