// The CPU kernels' bodies, included once per instruction set by bn_act_cpu.cpp, each time inside
// its own namespace and `#pragma GCC target` region (baseline x86-64, AVX2, AVX-512), so one build
// runs vector code on the CPU it finds and stays correct on one without AVX-512 or AVX2. No include
// guard and no #include on purpose: every standard header is included by bn_act_cpu.cpp *before*
// any target region, so no standard-library function is compiled with an ISA the CPU may lack.
// Storage types, helpers and kernels: see bn_act_cpu.cpp's header comment.
constexpr int64_t kTile = 2048;             // values per NCHW tile (8 KB of fp32: stays in L1)
constexpr int64_t kMinParallelWork = 16384;  // below this many values, one thread
constexpr int kLanes = 32;                   // independent fp32 partial sums per reduction

// ---- storage types ------------------------------------------------------------------------------
struct bf16_t { uint16_t v; };
struct f16_t { uint16_t v; };

inline float bits_to_float(uint32_t w) { float f; std::memcpy(&f, &w, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t w; std::memcpy(&w, &f, 4); return w; }

// IEEE half <-> float by bit manipulation (the algorithm of Maratyszcza's FP16 library, as used by
// c10::Half), branch-free so loops over it vectorise.
inline float h2f(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = UINT32_C(0xE0) << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = bits_to_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = UINT32_C(126) << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_to_float((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

inline uint16_t f2h(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
  base = bits_to_float((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
  const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT32_C(0x7E00) : nonsign));
}

inline float b2f(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline uint16_t f2b(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
  return uint16_t(f != f ? UINT32_C(0x7FC0) : rounded);
}

inline float ld(float v) { return v; }
inline float ld(bf16_t v) { return b2f(v.v); }
inline float ld(f16_t v) { return h2f(v.v); }
inline void st(float* p, float v) { *p = v; }
inline void st(bf16_t* p, float v) { p->v = f2b(v); }
inline void st(f16_t* p, float v) { p->v = f2h(v); }

// ---- small helpers ------------------------------------------------------------------------------
int max_threads(const BnParams& p) {
  if (p.num_threads > 0) return p.num_threads;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int threads_for(const BnParams& p, int64_t work) {
  if (work < kMinParallelWork) return 1;
  const int64_t useful = std::max<int64_t>(1, work / kMinParallelWork);
  return int(std::min<int64_t>(max_threads(p), useful));
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Rows [begin, end) of thread `tid` out of `nt` over `rows` rows.
inline void split_rows(int64_t rows, int tid, int nt, int64_t& begin, int64_t& end) {
  const int64_t per = rows / nt, extra = rows % nt;
  begin = tid * per + std::min<int64_t>(tid, extra);
  end = begin + per + (tid < extra ? 1 : 0);
}

struct Welford {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mean_b, double m2_b) {
    if (nb <= 0) return;
    if (n <= 0) { n = nb; mean = mean_b; m2 = m2_b; return; }
    const double tot = n + nb, delta = mean_b - mean;
    mean += delta * (nb / tot);
    m2 += m2_b + delta * delta * (n * nb / tot);
    n = tot;
  }
  void merge(const Welford& o) { merge(o.n, o.mean, o.m2); }
};

template <Act A>
inline float activate(float z, float slope) {
  if constexpr (A == Act::kIdentity) return z;
  else if constexpr (A == Act::kRelu) return z < 0.f ? 0.f : z;  // NaN propagates, as torch's relu
  else {
    const float neg = z * slope;  // computed unconditionally so the select vectorises
    return z < 0.f ? neg : z;
  }
}

// ---- statistics ---------------------------------------------------------------------------------
template <typename T>
void stats_nchw(const BnParams& p, const T* x, double* mean, double* var) {
  const int64_t C = p.C, HW = p.HW, NC = p.N * p.C;
  const int64_t tiles_per_plane = (HW + kTile - 1) / kTile;
  const int64_t tiles = NC * tiles_per_plane;
  std::vector<double> tmean(tiles), tm2(tiles);
  const int nt = threads_for(p, p.numel());
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t nc = t / tiles_per_plane, i0 = (t % tiles_per_plane) * kTile;
    const int64_t n = std::min(kTile, HW - i0);
    const T* src = x + nc * HW + i0;
    // kLanes independent partial sums: one vector accumulator would make the loop wait on FP-add
    // latency (about one value per cycle), slower than memory.
    float s[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) s[j] += ld(src[i + j]);
    }
    float st = 0.f;
    for (; i < n; ++i) st += ld(src[i]);
    for (int j = 0; j < kLanes; ++j) st += s[j];
    const float m = st / float(n);
    float d1[kLanes] = {}, d2[kLanes] = {};
    for (i = 0; i + kLanes <= n; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        const float d = ld(src[i + j]) - m;
        d1[j] += d;
        d2[j] += d * d;
      }
    }
    float sd = 0.f, sdd = 0.f;
    for (; i < n; ++i) {
      const float d = ld(src[i]) - m;
      sd += d;
      sdd += d * d;
    }
    for (int j = 0; j < kLanes; ++j) {
      sd += d1[j];
      sdd += d2[j];
    }
    tmean[t] = double(m) + double(sd) / double(n);
    tm2[t] = std::max(0.0, double(sdd) - double(sd) * double(sd) / double(n));
  }
  // Merge tiles per channel in a fixed order (n, then position): deterministic.
  for (int64_t c = 0; c < C; ++c) {
    Welford w;
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t k = 0; k < tiles_per_plane; ++k) {
        const int64_t t = (n * C + c) * tiles_per_plane + k;
        w.merge(double(std::min(kTile, HW - k * kTile)), tmean[t], tm2[t]);
      }
    mean[c] = w.mean;
    var[c] = w.n > 0 ? w.m2 / w.n : 0.0;
  }
}

template <typename T>
void stats_nhwc(const BnParams& p, const T* x, double* mean, double* var) {
  const int64_t C = p.C, rows = p.N * p.HW;
  const int64_t block_rows = std::max<int64_t>(1, kTile / C);
  const int nt = threads_for(p, p.numel());
  std::vector<Welford> part(size_t(nt) * C);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id(), nth = thread_count();
    int64_t r0, r1;
    split_rows(rows, tid, nth, r0, r1);
    Welford* acc = part.data() + size_t(tid) * C;
    std::vector<float> s(C), sd(C), sdd(C), m(C);
    for (int64_t b0 = r0; b0 < r1; b0 += block_rows) {
      const int64_t b1 = std::min(r1, b0 + block_rows), nb = b1 - b0;
      std::fill(s.begin(), s.end(), 0.f);
      std::fill(sd.begin(), sd.end(), 0.f);
      std::fill(sdd.begin(), sdd.end(), 0.f);
      float* __restrict s_ = s.data();
      float* __restrict sd_ = sd.data();
      float* __restrict sdd_ = sdd.data();
      float* __restrict m_ = m.data();
      for (int64_t r = b0; r < b1; ++r) {
        const T* row = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) s_[c] += ld(row[c]);
      }
      for (int64_t c = 0; c < C; ++c) m_[c] = s_[c] / float(nb);
      for (int64_t r = b0; r < b1; ++r) {
        const T* row = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float d = ld(row[c]) - m_[c];
          sd_[c] += d;
          sdd_[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c)
        acc[c].merge(double(nb), double(m_[c]) + double(sd_[c]) / double(nb),
                     std::max(0.0, double(sdd_[c]) - double(sd_[c]) * double(sd_[c]) / double(nb)));
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    Welford w;
    for (int t = 0; t < nt; ++t) w.merge(part[size_t(t) * C + c]);
    mean[c] = w.mean;
    var[c] = w.n > 0 ? w.m2 / w.n : 0.0;
  }
}

// ---- forward apply ------------------------------------------------------------------------------
template <typename T, Act A, bool kRes>
void forward_apply_impl(const BnParams& p, const T* x, const T* res, const float* scale, const float* shift,
                        T* y) {
  const int64_t C = p.C, HW = p.HW;
  const float slope = p.slope;
  const int nt = threads_for(p, p.numel());
  if (p.layout == Layout::kNCHW) {
    const int64_t tpp = (HW + kTile - 1) / kTile, tiles = p.N * C * tpp;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t nc = t / tpp, i0 = (t % tpp) * kTile, n = std::min(kTile, HW - i0);
      const int64_t c = nc % C, off = nc * HW + i0;
      const float sc = scale[c], sh = shift[c];
      const T* __restrict xs = x + off;
      T* __restrict ys = y + off;
      if constexpr (kRes) {
        const T* __restrict rs = res + off;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) st(ys + i, activate<A>(ld(xs[i]) * sc + sh + ld(rs[i]), slope));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) st(ys + i, activate<A>(ld(xs[i]) * sc + sh, slope));
      }
    }
  } else {
    const int64_t rows = p.N * HW;
#pragma omp parallel num_threads(nt)
    {
      int64_t r0, r1;
      split_rows(rows, thread_id(), thread_count(), r0, r1);
      const float* __restrict sc = scale;
      const float* __restrict sh = shift;
      for (int64_t r = r0; r < r1; ++r) {
        const T* __restrict xs = x + r * C;
        T* __restrict ys = y + r * C;
        if constexpr (kRes) {
          const T* __restrict rs = res + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) st(ys + c, activate<A>(ld(xs[c]) * sc[c] + sh[c] + ld(rs[c]), slope));
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) st(ys + c, activate<A>(ld(xs[c]) * sc[c] + sh[c], slope));
        }
      }
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------
// Where the activation's derivative comes from: none (identity), z = x*sc + sh recomputed from x, or
// z = x*sc + sh + residual (bn_add_act: the residual is saved, so z is exactly the forward's).
enum class Mask { kNone, kFromZ, kFromZRes };

// Per-channel constants of the backward passes.
struct BwdConst {
  std::vector<float> m1, m2;   // xhat = (x - m1) * m2
  std::vector<float> sc, sh;   // z = x * sc + sh (+ residual)  (activation mask recomputed from x)
  std::vector<float> k1;       // w * invstd                 (grad input scale)
  std::vector<float> ga, gb;   // mean(dz), mean(dz * xhat)  (training apply pass)
};

// dz (the gradient of the pre-activation) and xhat for one element.
template <typename T, Act A, Mask kMask>
inline void bwd_elem(const T* dy, const T* src, const T* res, int64_t i, float m1, float m2, float sc, float sh,
                     float slope, float& dz, float& xhat) {
  const float g = ld(dy[i]);
  const float s = ld(src[i]);
  if constexpr (A == Act::kIdentity || kMask == Mask::kNone) {
    dz = g;
  } else {
    float pre = s * sc + sh;  // exactly the forward's z, so the sign test agrees
    if constexpr (kMask == Mask::kFromZRes) pre += ld(res[i]);
    if constexpr (A == Act::kRelu) {
      dz = pre > 0.f ? g : 0.f;
    } else {
      const float gneg = g * slope;
      dz = pre > 0.f ? g : gneg;
    }
  }
  xhat = (s - m1) * m2;
}

// Reduction pass: per-channel sum(dz), sum(dz * xhat) into sd, sdx (fp64, length C). Writes dres = dz
// when kDres, and in eval mode (kEval) grad input dx = dz * k1 too.
template <typename T, Act A, Mask kMask, bool kDres, bool kEval>
void bwd_reduce(const BnParams& p, const T* dy, const T* src, const T* res, const BwdConst& k, T* dres, T* dx,
                double* sd, double* sdx) {
  const int64_t C = p.C, HW = p.HW;
  const float slope = p.slope;
  const int nt = threads_for(p, p.numel());
  if (p.layout == Layout::kNCHW) {
    const int64_t tpp = (HW + kTile - 1) / kTile, tiles = p.N * C * tpp;
    std::vector<double> t_sd(tiles), t_sdx(tiles);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t nc = t / tpp, i0 = (t % tpp) * kTile, n = std::min(kTile, HW - i0);
      const int64_t c = nc % C, off = nc * HW + i0;
      const float m1 = k.m1[c], m2 = k.m2[c], sc = k.sc[c], sh = k.sh[c], k1 = k.k1[c];
      const T* dys = dy + off;
      const T* ss = src + off;
      const T* rs = res ? res + off : nullptr;
      T* __restrict drs = kDres ? dres + off : nullptr;
      T* __restrict dxs = kEval ? dx + off : nullptr;
      float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = 0; i < n; ++i) {
        float dz, xh;
        bwd_elem<T, A, kMask>(dys, ss, rs, i, m1, m2, sc, sh, slope, dz, xh);
        a += dz;
        b += dz * xh;
        if constexpr (kDres) st(drs + i, dz);
        if constexpr (kEval) st(dxs + i, dz * k1);
      }
      t_sd[t] = a;
      t_sdx[t] = b;
    }
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, b = 0;
      for (int64_t n = 0; n < p.N; ++n)
        for (int64_t q = 0; q < tpp; ++q) {
          a += t_sd[(n * C + c) * tpp + q];
          b += t_sdx[(n * C + c) * tpp + q];
        }
      sd[c] = a;
      sdx[c] = b;
    }
  } else {
    const int64_t rows = p.N * HW, block_rows = std::max<int64_t>(1, kTile / C);
    std::vector<double> part(size_t(nt) * 2 * C, 0.0);
#pragma omp parallel num_threads(nt)
    {
      const int tid = thread_id();
      int64_t r0, r1;
      split_rows(rows, tid, thread_count(), r0, r1);
      double* pa = part.data() + size_t(tid) * 2 * C;
      double* pb = pa + C;
      std::vector<float> fa(C), fb(C);
      float* __restrict a_ = fa.data();
      float* __restrict b_ = fb.data();
      const float* __restrict m1 = k.m1.data();
      const float* __restrict m2 = k.m2.data();
      const float* __restrict sc = k.sc.data();
      const float* __restrict sh = k.sh.data();
      const float* __restrict k1 = k.k1.data();
      for (int64_t b0 = r0; b0 < r1; b0 += block_rows) {
        const int64_t b1 = std::min(r1, b0 + block_rows);
        std::fill(fa.begin(), fa.end(), 0.f);
        std::fill(fb.begin(), fb.end(), 0.f);
        for (int64_t r = b0; r < b1; ++r) {
          const int64_t off = r * C;
          const T* dys = dy + off;
          const T* ss = src + off;
          const T* rs = res ? res + off : nullptr;
          T* __restrict drs = kDres ? dres + off : nullptr;
          T* __restrict dxs = kEval ? dx + off : nullptr;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            float dz, xh;
            bwd_elem<T, A, kMask>(dys, ss, rs, c, m1[c], m2[c], sc[c], sh[c], slope, dz, xh);
            a_[c] += dz;
            b_[c] += dz * xh;
            if constexpr (kDres) st(drs + c, dz);
            if constexpr (kEval) st(dxs + c, dz * k1[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          pa[c] += a_[c];
          pb[c] += b_[c];
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, b = 0;
      for (int t = 0; t < nt; ++t) {
        a += part[size_t(t) * 2 * C + c];
        b += part[size_t(t) * 2 * C + C + c];
      }
      sd[c] = a;
      sdx[c] = b;
    }
  }
}

// Apply pass (training): dx = k1 * (dz - mean(dz) - xhat * mean(dz * xhat)).
template <typename T, Act A, Mask kMask>
void bwd_apply(const BnParams& p, const T* dy, const T* src, const T* res, const BwdConst& k, T* dx) {
  const int64_t C = p.C, HW = p.HW;
  const float slope = p.slope;
  const int nt = threads_for(p, p.numel());
  if (p.layout == Layout::kNCHW) {
    const int64_t tpp = (HW + kTile - 1) / kTile, tiles = p.N * C * tpp;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t nc = t / tpp, i0 = (t % tpp) * kTile, n = std::min(kTile, HW - i0);
      const int64_t c = nc % C, off = nc * HW + i0;
      const float m1 = k.m1[c], m2 = k.m2[c], sc = k.sc[c], sh = k.sh[c];
      const float k1 = k.k1[c], ga = k.ga[c], gb = k.gb[c];
      const T* dys = dy + off;
      const T* ss = src + off;
      const T* rs = res ? res + off : nullptr;
      T* __restrict dxs = dx + off;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float dz, xh;
        bwd_elem<T, A, kMask>(dys, ss, rs, i, m1, m2, sc, sh, slope, dz, xh);
        st(dxs + i, k1 * (dz - ga - xh * gb));
      }
    }
  } else {
    const int64_t rows = p.N * HW;
#pragma omp parallel num_threads(nt)
    {
      int64_t r0, r1;
      split_rows(rows, thread_id(), thread_count(), r0, r1);
      const float* __restrict m1 = k.m1.data();
      const float* __restrict m2 = k.m2.data();
      const float* __restrict sc = k.sc.data();
      const float* __restrict sh = k.sh.data();
      const float* __restrict k1 = k.k1.data();
      const float* __restrict ga = k.ga.data();
      const float* __restrict gb = k.gb.data();
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * C;
        const T* dys = dy + off;
        const T* ss = src + off;
        const T* rs = res ? res + off : nullptr;
        T* __restrict dxs = dx + off;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          float dz, xh;
          bwd_elem<T, A, kMask>(dys, ss, rs, c, m1[c], m2[c], sc[c], sh[c], slope, dz, xh);
          st(dxs + c, k1[c] * (dz - ga[c] - xh * gb[c]));
        }
      }
    }
  }
}

template <typename T, Act A, Mask kMask>
void backward_impl(const BnParams& p, const BnBackwardArgs& a, const BnBackwardOut& o) {
  const int64_t C = p.C;
  const double count = double(p.count());
  BwdConst k;
  k.m1.resize(C); k.m2.resize(C); k.sc.resize(C); k.sh.resize(C); k.k1.resize(C); k.ga.resize(C); k.gb.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const float w = a.weight[c], b = a.bias[c], mu = a.mean[c], is = a.invstd[c];
    k.k1[c] = w * is;
    k.sc[c] = w * is;           // same expression as the forward's scale/shift, so z matches bit for bit
    k.sh[c] = b - mu * k.sc[c];
    k.m1[c] = mu;
    k.m2[c] = is;
  }
  const T* dy = static_cast<const T*>(a.dy);
  const T* src = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  T* dx = static_cast<T*>(o.dx);
  T* dres = static_cast<T*>(o.dres);
  std::vector<double> sd(C), sdx(C);
  if (a.training) {
    if (dres) bwd_reduce<T, A, kMask, true, false>(p, dy, src, res, k, dres, dx, sd.data(), sdx.data());
    else bwd_reduce<T, A, kMask, false, false>(p, dy, src, res, k, dres, dx, sd.data(), sdx.data());
    for (int64_t c = 0; c < C; ++c) {
      k.ga[c] = float(sd[c] / count);
      k.gb[c] = float(sdx[c] / count);
    }
    bwd_apply<T, A, kMask>(p, dy, src, res, k, dx);
  } else {
    if (dres) bwd_reduce<T, A, kMask, true, true>(p, dy, src, res, k, dres, dx, sd.data(), sdx.data());
    else bwd_reduce<T, A, kMask, false, true>(p, dy, src, res, k, dres, dx, sd.data(), sdx.data());
  }
  for (int64_t c = 0; c < C; ++c) {
    o.dbias[c] = float(sd[c]);
    o.dweight[c] = float(sdx[c]);
  }
}

template <typename T, Act A>
void backward_act(const BnParams& p, const BnBackwardArgs& a, const BnBackwardOut& o) {
  if constexpr (A == Act::kIdentity) backward_impl<T, A, Mask::kNone>(p, a, o);
  else if (a.residual) backward_impl<T, A, Mask::kFromZRes>(p, a, o);
  else backward_impl<T, A, Mask::kFromZ>(p, a, o);
}

template <typename T>
void backward_typed(const BnParams& p, const BnBackwardArgs& a, const BnBackwardOut& o) {
  switch (p.act) {
    case Act::kIdentity: return backward_act<T, Act::kIdentity>(p, a, o);
    case Act::kRelu: return backward_act<T, Act::kRelu>(p, a, o);
    case Act::kLeakyRelu: return backward_act<T, Act::kLeakyRelu>(p, a, o);
  }
}

template <typename T>
void forward_apply_typed(const BnParams& p, const void* x, const void* res, const float* scale, const float* shift,
                         void* y) {
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(res);
  T* yt = static_cast<T*>(y);
#define AEGAN_FWD(ACT)                                                             \
  if (rt) forward_apply_impl<T, ACT, true>(p, xt, rt, scale, shift, yt);          \
  else forward_apply_impl<T, ACT, false>(p, xt, rt, scale, shift, yt);            \
  return;
  switch (p.act) {
    case Act::kIdentity: AEGAN_FWD(Act::kIdentity)
    case Act::kRelu: AEGAN_FWD(Act::kRelu)
    case Act::kLeakyRelu: AEGAN_FWD(Act::kLeakyRelu)
  }
#undef AEGAN_FWD
}

template <typename T>
void stats_typed(const BnParams& p, const void* x, double* mean, double* var) {
  if (p.layout == Layout::kNCHW) stats_nchw<T>(p, static_cast<const T*>(x), mean, var);
  else stats_nhwc<T>(p, static_cast<const T*>(x), mean, var);
}


// ---- entry points of this instruction set: switch on the storage type ---------------------------
#define AEGAN_DISPATCH_DTYPE(DT, FN, ...)                       \
  switch (DT) {                                                 \
    case DType::kFloat32: FN<float>(__VA_ARGS__); break;        \
    case DType::kBFloat16: FN<bf16_t>(__VA_ARGS__); break;      \
    case DType::kFloat16: FN<f16_t>(__VA_ARGS__); break;        \
  }

void stats(const BnParams& p, const void* x, double* mean, double* var) {
  AEGAN_DISPATCH_DTYPE(p.dtype, stats_typed, p, x, mean, var)
}

void forward_apply(const BnParams& p, const void* x, const void* residual, const float* scale, const float* shift,
                   void* y) {
  AEGAN_DISPATCH_DTYPE(p.dtype, forward_apply_typed, p, x, residual, scale, shift, y)
}

void backward(const BnParams& p, const BnBackwardArgs& a, const BnBackwardOut& o) {
  AEGAN_DISPATCH_DTYPE(p.dtype, backward_typed, p, a, o)
}
#undef AEGAN_DISPATCH_DTYPE
