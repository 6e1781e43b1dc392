// CPU kernels for fused BatchNorm2d + activation (+ residual). Torch-free; see bn_act.h.
//
// Parallelism: NCHW work is cut into tiles of at most kTile contiguous values of one (n, c) plane,
// and OpenMP splits the tiles statically; NHWC (channels_last) work is cut into blocks of rows of C
// values, each thread owning a contiguous range of rows. Inner loops run over contiguous memory
// with per-channel constants hoisted, and are written so the compiler vectorises them
// (`omp simd`, templates instead of runtime branches on activation / mode, selects whose both arms
// are computed unconditionally: with GCC's default -ftrapping-math a conditional multiply is not
// if-converted and the whole loop stays scalar, 4x slower; the build also passes -fno-trapping-math).
//
// Statistics (numerically careful): each tile (NCHW) or row block (NHWC) is reduced in two fp32
// passes while it sits in L1 — first its mean m_b, then sums of d = x - m_b and d^2, giving the
// block's (count, mean, M2) with M2 = sum d^2 - (sum d)^2 / n_b (the corrected two-pass formula).
// Blocks are merged in fp64 with Chan et al.'s parallel Welford update, so there is no
// catastrophic cancellation of E[x^2] - E[x]^2 even when |mean| >> std, and no fp32 sum over more
// than one block. Backward sums (sum dz, sum dz*xhat) are fp32 within a block, fp64 across blocks.
// With a fixed thread count the results are deterministic run to run.
#include "bn_act.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace aegan_fast {
namespace cpu {

// One copy of the kernels per instruction set (bn_act_cpu_kernels.h), chosen at run time.
// fp-contract=off in the vector regions (AVX-512F has fused multiply-add of its own): the forward's
// z = x*scale + shift and the backward's recomputation of it for the activation's mask must round
// alike, and the baseline build (no FMA) rounds them unfused, so every path gives the same z.
namespace isa_base {
namespace {
#include "bn_act_cpu_kernels.h"
}  // namespace
}  // namespace isa_base

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define AEGAN_X86_ISAS 1
#pragma GCC push_options
#pragma GCC target("avx2")
#pragma GCC optimize("fp-contract=off")
namespace isa_avx2 {
namespace {
#include "bn_act_cpu_kernels.h"
}  // namespace
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#pragma GCC optimize("fp-contract=off")
namespace isa_avx512 {
namespace {
#include "bn_act_cpu_kernels.h"
}  // namespace
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

namespace {

constexpr const char* kIsaNames[] = {"base", "avx2", "avx512"};
enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU (and its OS: __builtin_cpu_supports checks XCR0) supports.
int best_isa() {
#ifdef AEGAN_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2")) return kAvx2;
#endif
  return kBase;
}

int isa_by_name(const char* name) {
  for (int i = 0; i < 3; ++i)
    if (name && std::strcmp(name, kIsaNames[i]) == 0) return i;
  return -1;
}

// AEGAN_CPU_ISA=base|avx2|avx512 caps the choice (never above what the CPU has).
int initial_isa() {
  const int best = best_isa();
  const int want = isa_by_name(std::getenv("AEGAN_CPU_ISA"));
  return want >= 0 ? std::min(want, best) : best;
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{initial_isa()};
  return isa;
}

}  // namespace

#ifdef AEGAN_X86_ISAS
#define AEGAN_ISA_CALL(FN, ...)                                    \
  switch (current_isa().load(std::memory_order_relaxed)) {         \
    case kAvx512: return isa_avx512::FN(__VA_ARGS__);              \
    case kAvx2: return isa_avx2::FN(__VA_ARGS__);                  \
    default: return isa_base::FN(__VA_ARGS__);                     \
  }
#else
#define AEGAN_ISA_CALL(FN, ...) return isa_base::FN(__VA_ARGS__);
#endif

void bn_stats(const BnParams& p, const void* x, double* mean, double* var) {
  AEGAN_ISA_CALL(stats, p, x, mean, var)
}

void bn_forward_apply(const BnParams& p, const void* x, const void* residual, const float* scale,
                      const float* shift, void* y) {
  AEGAN_ISA_CALL(forward_apply, p, x, residual, scale, shift, y)
}

void bn_backward(const BnParams& p, const BnBackwardArgs& a, const BnBackwardOut& o) {
  AEGAN_ISA_CALL(backward, p, a, o)
}
#undef AEGAN_ISA_CALL

const char* cpu_isa() { return kIsaNames[current_isa().load(std::memory_order_relaxed)]; }

const char* best_cpu_isa() { return kIsaNames[best_isa()]; }

bool set_cpu_isa(const char* name) {
  const int want = isa_by_name(name);
  if (want < 0 || want > best_isa()) return false;
  current_isa().store(want, std::memory_order_relaxed);
  return true;
}

float bf16_to_float(uint16_t h) { return isa_base::b2f(h); }
uint16_t float_to_bf16(float f) { return isa_base::f2b(f); }
float fp16_to_float(uint16_t h) { return isa_base::h2f(h); }
uint16_t float_to_fp16(float f) { return isa_base::f2h(f); }

}  // namespace cpu
}  // namespace aegan_fast
