// The plain parameters every fused BatchNorm kernel takes, shared by the CPU kernels (bn_act.h) and
// the CUDA kernels (cuda/bn_cuda.h): one description of a launch, filled in by the torch bindings
// after their argument checks, so both sides agree on what a layout, dtype or activation code means.
// No torch and no CUDA headers here: it compiles with g++ and nvcc alike.
#pragma once

#include <cstdint>

namespace aegan_fast {

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

// The memory-efficient backward divides by the weight to recover xhat. |w| is clamped to this floor
// (sign kept) on every backend: channels whose |w| falls below it get approximate gradients instead
// of inf/NaN. inplace_abn avoids this by normalising with |w| + eps in the forward; we do not,
// because our forward must equal nn.BatchNorm2d's (state_dict compatibility, parity with the reference).
constexpr float kMinAbsWeight = 1e-6f;

}  // namespace aegan_fast
