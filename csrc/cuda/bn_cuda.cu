// CUDA kernels for fused BatchNorm2d + activation (+ residual). Torch-free; see bn_cuda.h.
//
// Thread blocks are 2-D, kThreads threads: the x dimension runs along the unit-stride axis (i for
// NCHW, c for channels_last) so every warp load is coalesced, the y dimension along the other axis.
// A tile is (channels of the block) x (kUnroll * dim_i consecutive i); reduction kernels walk tiles
// s, s + S, s + 2S, ... (S = gridDim.y splits) and merge their per-thread state with a shared-memory
// tree along i; apply kernels take one tile per block (grid.x = tiles, grid.y = channel blocks).
//
// Statistics: per-thread Welford (exact running mean / M2, no E[x^2] - E[x]^2 cancellation), merged
// with Chan's formula in the block tree and, in a fixed order, across splits (deterministic).
#include "bn_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

namespace aegan_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kFinalizeThreads = 128;

// ---- storage <-> fp32 ---------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- activations (PyTorch's convention at z == 0: the negative side) ----------------------------
template <int ACT> __device__ __forceinline__ float activate(float z, float slope) {
  if (ACT == 1) return z > 0.f ? z : 0.f;
  if (ACT == 2) return z > 0.f ? z : z * slope;
  return z;
}
template <int ACT> __device__ __forceinline__ float activation_grad(float dy, float z, float slope) {
  if (ACT == 1) return z > 0.f ? dy : 0.f;
  if (ACT == 2) return z > 0.f ? dy : dy * slope;
  return dy;
}

// ---- the (o, c, i) walk -------------------------------------------------------------------------
struct Walk {
  int64_t C, NI, sO, sC, sI;
  int64_t n_tiles_i, n_tiles;  // tiles along i for one o; all tiles
  int dim_c, dim_i;            // block shape along c and along i
};

template <bool CL> __device__ __forceinline__ int tid_c() { return CL ? threadIdx.x : threadIdx.y; }
template <bool CL> __device__ __forceinline__ int tid_i() { return CL ? threadIdx.y : threadIdx.x; }

Walk make_walk(const BnParams& p) {
  Walk w;
  w.C = p.C;
  auto pow2 = [](int64_t v, int64_t cap) { int64_t r = 1; while (r < v && r < cap) r <<= 1; return r; };
  if (p.layout == Layout::kNCHW) {
    w.NI = p.HW; w.sO = p.C * p.HW; w.sC = p.HW; w.sI = 1;
    w.dim_i = static_cast<int>(pow2(p.HW, kThreads));
    w.dim_c = kThreads / w.dim_i;
    w.n_tiles_i = (w.NI + int64_t(w.dim_i) * kUnroll - 1) / (int64_t(w.dim_i) * kUnroll);
    w.n_tiles = p.N * w.n_tiles_i;
  } else {
    w.NI = p.N * p.HW; w.sO = 0; w.sC = 1; w.sI = p.C;
    w.dim_c = static_cast<int>(pow2(p.C, 32));
    w.dim_i = kThreads / w.dim_c;
    w.n_tiles_i = (w.NI + int64_t(w.dim_i) * kUnroll - 1) / (int64_t(w.dim_i) * kUnroll);
    w.n_tiles = w.n_tiles_i;
  }
  return w;
}

template <bool CL> dim3 block_of(const Walk& w) { return CL ? dim3(w.dim_c, w.dim_i) : dim3(w.dim_i, w.dim_c); }
int64_t cblocks(const Walk& w) { return (w.C + w.dim_c - 1) / w.dim_c; }

// ---- Welford ------------------------------------------------------------------------------------
struct Welford {
  float n, mean, m2;
  __device__ __forceinline__ void add(float x) {
    n += 1.f;
    const float d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  __device__ __forceinline__ void merge(float nb, float meanb, float m2b) {  // Chan et al.
    if (nb == 0.f) return;
    const float nab = n + nb;
    const float d = meanb - mean;
    const float f = nb / nab;
    mean += d * f;
    m2 += m2b + d * d * n * f;
    n = nab;
  }
};

// Tree-merge of the Welford states of the threads that share a channel (same tid_c), along i.
// Returns the merged state in the thread with tid_i == 0.
template <bool CL>
__device__ Welford block_merge(Welford a, const Walk& w) {
  __shared__ float sn[kThreads], smean[kThreads], sm2[kThreads];
  const int idx = tid_c<CL>() * w.dim_i + tid_i<CL>();
  sn[idx] = a.n; smean[idx] = a.mean; sm2[idx] = a.m2;
  for (int stride = w.dim_i / 2; stride > 0; stride >>= 1) {
    __syncthreads();
    if (tid_i<CL>() < stride) {
      a.merge(sn[idx + stride], smean[idx + stride], sm2[idx + stride]);
      sn[idx] = a.n; smean[idx] = a.mean; sm2[idx] = a.m2;
    }
  }
  return a;
}

template <bool CL>
__device__ void block_sum2(float& a, float& b, const Walk& w) {
  __shared__ float sa[kThreads], sb[kThreads];
  const int idx = tid_c<CL>() * w.dim_i + tid_i<CL>();
  sa[idx] = a; sb[idx] = b;
  for (int stride = w.dim_i / 2; stride > 0; stride >>= 1) {
    __syncthreads();
    if (tid_i<CL>() < stride) {
      a += sa[idx + stride]; b += sb[idx + stride];
      sa[idx] = a; sb[idx] = b;
    }
  }
}

// ---- statistics ---------------------------------------------------------------------------------
template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads) stats_partial_kernel(Walk w, const T* __restrict__ x,
                                                                 float* __restrict__ pcount, float* __restrict__ pmean,
                                                                 float* __restrict__ pm2) {
  const int64_t c = int64_t(blockIdx.x) * w.dim_c + tid_c<CL>();
  const int64_t s = blockIdx.y, S = gridDim.y;
  Welford acc{0.f, 0.f, 0.f};
  if (c < w.C) {
    for (int64_t t = s; t < w.n_tiles; t += S) {
      const int64_t o = t / w.n_tiles_i;
      const int64_t i0 = (t % w.n_tiles_i) * w.dim_i * kUnroll + tid_i<CL>();
      const T* base = x + o * w.sO + c * w.sC;
      float v[kUnroll];
      bool ok[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + int64_t(u) * w.dim_i;
        ok[u] = i < w.NI;
        v[u] = ok[u] ? to_f(base[i * w.sI]) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (ok[u]) acc.add(v[u]);
    }
  }
  acc = block_merge<CL>(acc, w);
  if (tid_i<CL>() == 0 && c < w.C) {
    pcount[s * w.C + c] = acc.n;
    pmean[s * w.C + c] = acc.mean;
    pm2[s * w.C + c] = acc.m2;
  }
}

__global__ void stats_finalize_kernel(int64_t C, int64_t S, const float* __restrict__ pcount,
                                      const float* __restrict__ pmean, const float* __restrict__ pm2,
                                      float* __restrict__ mean, float* __restrict__ var) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Welford acc{0.f, 0.f, 0.f};
  for (int64_t s = 0; s < S; ++s) acc.merge(pcount[s * C + c], pmean[s * C + c], pm2[s * C + c]);
  mean[c] = acc.mean;
  var[c] = acc.n > 0.f ? acc.m2 / acc.n : 0.f;
}

__global__ void sum_partials_kernel(int64_t C, int64_t S, const float* __restrict__ pa, const float* __restrict__ pb,
                                    float* __restrict__ a, float* __restrict__ b) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sa = 0.f, sb = 0.f;
  for (int64_t s = 0; s < S; ++s) { sa += pa[s * C + c]; sb += pb[s * C + c]; }
  a[c] = sa;
  b[c] = sb;
}

// ---- per-channel constants ----------------------------------------------------------------------
struct Channel {
  float mean, invstd, w, b, scale, shift;
};
__device__ __forceinline__ Channel channel(int64_t c, const float* mean, const float* var, const float* weight,
                                           const float* bias, float eps) {
  Channel k;
  k.mean = mean[c];
  k.invstd = rsqrtf(var[c] + eps);
  k.w = weight ? weight[c] : 1.f;
  k.b = bias ? bias[c] : 0.f;
  k.scale = k.w * k.invstd;
  k.shift = k.b - k.mean * k.scale;
  return k;
}

// ---- forward apply ------------------------------------------------------------------------------
template <typename T, bool CL, int ACT>
__global__ void __launch_bounds__(kThreads) forward_apply_kernel(Walk w, const T* __restrict__ x,
                                                                 const T* __restrict__ residual,
                                                                 const float* __restrict__ mean,
                                                                 const float* __restrict__ var,
                                                                 const float* __restrict__ weight,
                                                                 const float* __restrict__ bias, float eps, float slope,
                                                                 T* __restrict__ y) {
  const int64_t c = int64_t(blockIdx.y) * w.dim_c + tid_c<CL>();
  if (c >= w.C) return;
  const Channel k = channel(c, mean, var, weight, bias, eps);
  const int64_t t = blockIdx.x;
  const int64_t o = t / w.n_tiles_i;
  const int64_t i0 = (t % w.n_tiles_i) * w.dim_i * kUnroll + tid_i<CL>();
  const int64_t base = o * w.sO + c * w.sC;
  float v[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = i0 + int64_t(u) * w.dim_i;
    v[u] = i < w.NI ? to_f(x[base + i * w.sI]) * k.scale + k.shift : 0.f;
    if (residual != nullptr && i < w.NI) v[u] += to_f(residual[base + i * w.sI]);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = i0 + int64_t(u) * w.dim_i;
    if (i < w.NI) y[base + i * w.sI] = from_f<T>(activate<ACT>(v[u], slope));
  }
}

// ---- backward -----------------------------------------------------------------------------------
struct BwdArgs {
  const void* dy;
  const void* x;
  const void* residual;
  const float *mean, *var, *weight, *bias;
  float eps, slope;
};

// dz (the gradient at the pre-activation) and xhat at one element, from x (and the residual).
template <typename T, int ACT>
__device__ __forceinline__ void dz_xhat(const BwdArgs& a, const Channel& k, int64_t off, float& dz, float& xhat) {
  const float dy = to_f(static_cast<const T*>(a.dy)[off]);
  const float x = to_f(static_cast<const T*>(a.x)[off]);
  xhat = (x - k.mean) * k.invstd;
  if (ACT == 0) {
    dz = dy;
  } else {
    float z = x * k.scale + k.shift;  // exactly the forward's z, so the sign test agrees
    if (a.residual != nullptr) z += to_f(static_cast<const T*>(a.residual)[off]);
    dz = activation_grad<ACT>(dy, z, a.slope);
  }
}

template <typename T, bool CL, int ACT>
__global__ void __launch_bounds__(kThreads) backward_reduce_kernel(Walk w, BwdArgs a, T* __restrict__ dres,
                                                                   float* __restrict__ pdz, float* __restrict__ pdzx) {
  const int64_t c = int64_t(blockIdx.x) * w.dim_c + tid_c<CL>();
  const int64_t s = blockIdx.y, S = gridDim.y;
  float acc_dz = 0.f, acc_dzx = 0.f;
  if (c < w.C) {
    const Channel k = channel(c, a.mean, a.var, a.weight, a.bias, a.eps);
    for (int64_t t = s; t < w.n_tiles; t += S) {
      const int64_t o = t / w.n_tiles_i;
      const int64_t i0 = (t % w.n_tiles_i) * w.dim_i * kUnroll + tid_i<CL>();
      const int64_t base = o * w.sO + c * w.sC;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + int64_t(u) * w.dim_i;
        if (i < w.NI) {
          float dz, xhat;
          dz_xhat<T, ACT>(a, k, base + i * w.sI, dz, xhat);
          if (dres != nullptr) dres[base + i * w.sI] = from_f<T>(dz);
          acc_dz += dz;
          acc_dzx += dz * xhat;
        }
      }
    }
  }
  block_sum2<CL>(acc_dz, acc_dzx, w);
  if (tid_i<CL>() == 0 && c < w.C) {
    pdz[s * w.C + c] = acc_dz;
    pdzx[s * w.C + c] = acc_dzx;
  }
}

// dx = w*invstd * (dz - mean(dz) - xhat * mean(dz*xhat)) in training, w*invstd*dz in eval. dz is read
// from dz_in when the reduction pass wrote it (bn_add_act), else recomputed.
template <typename T, bool CL, int ACT>
__global__ void __launch_bounds__(kThreads) backward_apply_kernel(Walk w, BwdArgs a, const T* __restrict__ dz_in,
                                                                  const float* __restrict__ sum_dz,
                                                                  const float* __restrict__ sum_dzx, float inv_count,
                                                                  bool training, T* __restrict__ dx) {
  const int64_t c = int64_t(blockIdx.y) * w.dim_c + tid_c<CL>();
  if (c >= w.C) return;
  const Channel k = channel(c, a.mean, a.var, a.weight, a.bias, a.eps);
  const float mdz = training ? sum_dz[c] * inv_count : 0.f;
  const float mdzx = training ? sum_dzx[c] * inv_count : 0.f;
  const int64_t t = blockIdx.x;
  const int64_t o = t / w.n_tiles_i;
  const int64_t i0 = (t % w.n_tiles_i) * w.dim_i * kUnroll + tid_i<CL>();
  const int64_t base = o * w.sO + c * w.sC;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = i0 + int64_t(u) * w.dim_i;
    if (i < w.NI) {
      const int64_t off = base + i * w.sI;
      float dz, xhat;
      if (dz_in != nullptr) {
        dz = to_f(dz_in[off]);
        xhat = (to_f(static_cast<const T*>(a.x)[off]) - k.mean) * k.invstd;
      } else {
        dz_xhat<T, ACT>(a, k, off, dz, xhat);
      }
      const float g = training ? dz - mdz - xhat * mdzx : dz;
      dx[off] = from_f<T>(k.scale * g);
    }
  }
}

// ---- dispatch: f(storage type tag, layout tag) / f(storage, layout, activation) -------------------
template <typename F>
void dispatch_storage(const BnParams& p, F&& f) {
  auto with_layout = [&](auto t) {
    if (p.layout == Layout::kNHWC) f(t, std::true_type{});
    else f(t, std::false_type{});
  };
  switch (p.dtype) {
    case DType::kFloat32: with_layout(float{}); break;
    case DType::kBFloat16: with_layout(__nv_bfloat16{}); break;
    case DType::kFloat16: with_layout(__half{}); break;
  }
}

template <typename F>
void dispatch(const BnParams& p, F&& f) {
  dispatch_storage(p, [&](auto t, auto cl) {
    switch (p.act) {
      case Act::kIdentity: f(t, cl, std::integral_constant<int, 0>{}); break;
      case Act::kRelu: f(t, cl, std::integral_constant<int, 1>{}); break;
      case Act::kLeakyRelu: f(t, cl, std::integral_constant<int, 2>{}); break;
    }
  });
}

unsigned grid_1d(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

int bn_num_splits(const BnParams& p, int num_sms) {
  const Walk w = make_walk(p);
  const int64_t target = 4 * std::max(num_sms, 1);
  const int64_t per_cblock = (target + cblocks(w) - 1) / cblocks(w);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({w.n_tiles, per_cblock, 65535})));
}

void bn_stats(const BnParams& p, const void* x, int splits, float* partials, float* mean, float* var,
              cudaStream_t stream) {
  const Walk w = make_walk(p);
  float* pcount = partials;
  float* pmean = partials + int64_t(splits) * p.C;
  float* pm2 = partials + 2 * int64_t(splits) * p.C;
  dispatch_storage(p, [&](auto t, auto cl) {  // statistics do not depend on the activation
    using T = decltype(t);
    constexpr bool CL = decltype(cl)::value;
    stats_partial_kernel<T, CL><<<dim3(cblocks(w), splits), block_of<CL>(w), 0, stream>>>(
        w, static_cast<const T*>(x), pcount, pmean, pm2);
  });
  stats_finalize_kernel<<<grid_1d(p.C, kFinalizeThreads), kFinalizeThreads, 0, stream>>>(p.C, splits, pcount, pmean,
                                                                                         pm2, mean, var);
}

void bn_forward_apply(const BnParams& p, const void* x, const void* residual, const float* mean, const float* var,
                      const float* weight, const float* bias, void* y, cudaStream_t stream) {
  const Walk w = make_walk(p);
  dispatch(p, [&](auto t, auto cl, auto act) {
    using T = decltype(t);
    constexpr bool CL = decltype(cl)::value;
    constexpr int ACT = decltype(act)::value;
    forward_apply_kernel<T, CL, ACT><<<dim3(w.n_tiles, cblocks(w)), block_of<CL>(w), 0, stream>>>(
        w, static_cast<const T*>(x), static_cast<const T*>(residual), mean, var, weight, bias, p.eps, p.slope,
        static_cast<T*>(y));
  });
}

void bn_backward(const BnParams& p, const BnBackwardArgs& a, const BnBackwardOut& o, int splits, float* partials,
                 cudaStream_t stream) {
  const Walk w = make_walk(p);
  const BwdArgs args{a.dy, a.x, a.residual, a.mean, a.var, a.weight, a.bias, p.eps, p.slope};
  float* pdz = partials;
  float* pdzx = partials + int64_t(splits) * p.C;
  dispatch(p, [&](auto t, auto cl, auto act) {
    using T = decltype(t);
    constexpr bool CL = decltype(cl)::value;
    constexpr int ACT = decltype(act)::value;
    backward_reduce_kernel<T, CL, ACT><<<dim3(cblocks(w), splits), block_of<CL>(w), 0, stream>>>(
        w, args, static_cast<T*>(o.dres), pdz, pdzx);
  });
  sum_partials_kernel<<<grid_1d(p.C, kFinalizeThreads), kFinalizeThreads, 0, stream>>>(p.C, splits, pdz, pdzx,
                                                                                       o.dbias, o.dweight);
  dispatch(p, [&](auto t, auto cl, auto act) {
    using T = decltype(t);
    constexpr bool CL = decltype(cl)::value;
    constexpr int ACT = decltype(act)::value;
    backward_apply_kernel<T, CL, ACT><<<dim3(w.n_tiles, cblocks(w)), block_of<CL>(w), 0, stream>>>(
        w, args, static_cast<const T*>(o.dres), o.dbias, o.dweight, 1.f / static_cast<float>(p.count()), a.training,
        static_cast<T*>(o.dx));
  });
}

}  // namespace cuda
}  // namespace aegan_fast
