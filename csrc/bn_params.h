// The plain parameters every fused BatchNorm kernel takes, shared by the CPU kernels (bn_act.h) and
// the CUDA kernels (cuda/bn_cuda.h): one description of a launch, filled in by the torch bindings
// after their argument checks, so both sides agree on what a layout, dtype or activation code means.
// No torch and no CUDA headers here: it compiles with g++ and nvcc alike.
#pragma once

#include <cstdint>

namespace aegan_fast {

// The one C++ definition of the activation codes (CPU and CUDA kernels alike); the Python table
// aegan_fast/ops/activations.py must agree (tests/test_ops_cpp.py compares it with _C.ACTIVATION_CODES).
enum class Act : int32_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2 };
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// kNCHW: plain contiguous (N, C, H, W). kNHWC: channels_last, i.e. (N, H, W, C) in memory.
enum class Layout : int32_t { kNCHW = 0, kNHWC = 1 };

struct BnParams {
  int64_t N = 0, C = 0, HW = 0;  // logical sizes; HW = H * W
  Layout layout = Layout::kNCHW;
  DType dtype = DType::kFloat32;  // storage type of every activation-sized tensor (x, residual, y, dy, dx, dres)
  Act act = Act::kIdentity;
  float slope = 0.f;              // LeakyReLU negative slope (ignored for other activations)
  float eps = 1e-5f;              // added to the variance (the CUDA kernels fold it in themselves)
  int num_threads = 0;            // CPU: OpenMP threads, <= 0 means the OpenMP default; unused on CUDA

  int64_t count() const { return N * HW; }  // values per channel
  int64_t numel() const { return N * C * HW; }
};


}  // namespace aegan_fast
