// C++ tests of the torch-free CPU kernels (run by ctest): every kernel against a naive fp64
// implementation, for both layouts, all activations, with and without residual, training and eval,
// memory-efficient backward, and the fp16 / bf16 conversions. Exit code 0 = pass.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "bn_act.h"

using namespace aegan_fast::cpu;

static int failures = 0;

static void expect_close(const char* what, double got, double want, double rtol, double atol) {
  if (!(std::fabs(got - want) <= atol + rtol * std::fabs(want))) {
    if (failures < 20) std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
    ++failures;
  }
}

// Index of logical element (n, c, s) in the given layout.
static int64_t at(const BnParams& p, int64_t n, int64_t c, int64_t s) {
  return p.layout == Layout::kNCHW ? (n * p.C + c) * p.HW + s : (n * p.HW + s) * p.C + c;
}

static double act_fwd(Act a, double z, double slope) {
  if (a == Act::kIdentity) return z;
  if (a == Act::kRelu) return z > 0 ? z : 0;
  return z > 0 ? z : z * slope;
}
static double act_grad(Act a, double z, double slope) {
  if (a == Act::kIdentity) return 1;
  if (a == Act::kRelu) return z > 0 ? 1 : 0;
  return z > 0 ? 1 : slope;
}

static void run_case(int64_t N, int64_t C, int64_t HW, Layout layout, Act act, bool residual, bool training,
                     double mean_offset) {
  BnParams p;
  p.N = N; p.C = C; p.HW = HW; p.layout = layout; p.act = act; p.slope = 0.2f;
  const int64_t numel = p.numel(), M = p.count();
  std::mt19937 rng(1234 + N * 7 + C * 13 + HW);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(numel), r(numel), dy(numel), w(C), b(C), rm(C), rv(C);
  for (int64_t c = 0; c < C; ++c) {
    w[c] = 0.5f + 0.1f * float(c);
    b[c] = 0.1f * float(c) - 0.2f;
    rm[c] = 0.3f; rv[c] = 1.7f;
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < HW; ++s) {
        const int64_t i = at(p, n, c, s);
        x[i] = float(mean_offset) + (1.f + c) * nd(rng);
        r[i] = nd(rng);
        dy[i] = nd(rng);
      }
  const double eps = 1e-5;
  // naive fp64 statistics
  std::vector<double> mu(C), var(C);
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, ss = 0;
    for (int64_t n = 0; n < N; ++n) for (int64_t q = 0; q < HW; ++q) s += x[at(p, n, c, q)];
    mu[c] = s / M;
    for (int64_t n = 0; n < N; ++n) for (int64_t q = 0; q < HW; ++q) { double d = x[at(p, n, c, q)] - mu[c]; ss += d * d; }
    var[c] = ss / M;
  }
  std::vector<double> km(C), kv(C);
  bn_stats(p, x.data(), km.data(), kv.data());
  for (int64_t c = 0; c < C; ++c) {
    // mean: error relative to the spread (what normalisation sees), not to |mean|
    expect_close("mean", km[c], mu[c], 1e-9, 1e-6 * std::sqrt(var[c]));
    expect_close("var", kv[c], var[c], 1e-6, 0);
  }
  // forward
  std::vector<float> mean_f(C), invstd_f(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    mean_f[c] = float(training ? km[c] : rm[c]);
    invstd_f[c] = float(1.0 / std::sqrt((training ? kv[c] : rv[c]) + eps));
    scale[c] = w[c] * invstd_f[c];
    shift[c] = b[c] - mean_f[c] * scale[c];
  }
  std::vector<float> y(numel);
  bn_forward_apply(p, x.data(), residual ? r.data() : nullptr, scale.data(), shift.data(), y.data());
  std::vector<double> z(numel), xhat(numel);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t q = 0; q < HW; ++q) {
        const int64_t i = at(p, n, c, q);
        const double m = training ? mu[c] : rm[c], v = training ? var[c] : rv[c];
        xhat[i] = (x[i] - m) / std::sqrt(v + eps);
        z[i] = xhat[i] * w[c] + b[c] + (residual ? r[i] : 0.0);
        // The kernel folds the normalisation into y = x * scale + shift, as ATen's CPU batch_norm
        // does: an fp32 rounding of x * scale is the error floor (it matters when |mean| >> std).
        expect_close("forward", y[i], act_fwd(act, z[i], p.slope), 1e-5,
                     1e-5 + 4 * 1.2e-7 * std::fabs(double(x[i]) * scale[c]));
      }
  // backward
  std::vector<float> dx(numel), dres(numel), dw(C), db(C);
  BnBackwardArgs a;
  a.dy = dy.data();
  a.x = x.data();
  a.residual = (residual && act != Act::kIdentity) ? r.data() : nullptr;
  a.mean = mean_f.data(); a.invstd = invstd_f.data(); a.weight = w.data(); a.bias = b.data();
  a.training = training;
  BnBackwardOut o;
  o.dx = dx.data(); o.dres = residual ? dres.data() : nullptr; o.dweight = dw.data(); o.dbias = db.data();
  bn_backward(p, a, o);
  std::vector<double> gz(numel), sg(C, 0), sgx(C, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t q = 0; q < HW; ++q) {
        const int64_t i = at(p, n, c, q);
        gz[i] = dy[i] * act_grad(act, z[i], p.slope);
        sg[c] += gz[i];
        sgx[c] += gz[i] * xhat[i];
      }
  for (int64_t c = 0; c < C; ++c) {
    double scale_c = 0;
    for (int64_t n = 0; n < N; ++n) for (int64_t q = 0; q < HW; ++q) scale_c += std::fabs(gz[at(p, n, c, q)]);
    expect_close("dbias", db[c], sg[c], 1e-5, 1e-6 * scale_c);
    expect_close("dweight", dw[c], sgx[c], 1e-5, 1e-5 * scale_c);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t q = 0; q < HW; ++q) {
        const int64_t i = at(p, n, c, q);
        const double v = training ? var[c] : rv[c];
        const double k = w[c] / std::sqrt(v + eps);
        const double want = training ? k * (gz[i] - sg[c] / M - xhat[i] * sgx[c] / M) : k * gz[i];
        expect_close("dx", dx[i], want, 1e-4, 1e-5);
        if (residual) expect_close("dres", dres[i], gz[i], 1e-6, 0);  // fp32 dy * slope
      }
}

static void test_conversions() {
  // fp16: every finite half survives half -> float -> half; a few known values.
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t hv = uint16_t(h);
    if ((hv & 0x7C00) == 0x7C00 && (hv & 0x03FF)) continue;  // NaN payloads
    if (float_to_fp16(fp16_to_float(hv)) != hv) { if (failures < 20) std::printf("FAIL fp16 roundtrip %04x\n", h); ++failures; }
  }
  expect_close("fp16 1", fp16_to_float(0x3C00), 1.0, 0, 0);
  expect_close("fp16 -2", fp16_to_float(0xC000), -2.0, 0, 0);
  expect_close("fp16 min subnormal", fp16_to_float(0x0001), std::ldexp(1.0, -24), 0, 0);
  if (float_to_fp16(65520.f) != 0x7C00) { std::printf("FAIL fp16 overflow\n"); ++failures; }
  if (float_to_fp16(1.0f + std::ldexp(1.0f, -11)) != 0x3C00) { std::printf("FAIL fp16 ties-to-even\n"); ++failures; }
  // bf16: round to nearest even, NaN stays NaN.
  for (uint32_t h = 0; h < 65536; h += 7) {
    const uint16_t hv = uint16_t(h);
    if ((hv & 0x7F80) == 0x7F80 && (hv & 0x007F)) continue;
    if (float_to_bf16(bf16_to_float(hv)) != hv) { if (failures < 20) std::printf("FAIL bf16 roundtrip %04x\n", h); ++failures; }
  }
  if (float_to_bf16(1.0f + std::ldexp(1.0f, -8)) != 0x3F80) { std::printf("FAIL bf16 ties-to-even\n"); ++failures; }
  if (float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -9)) != 0x3F81) { std::printf("FAIL bf16 round up\n"); ++failures; }
  if (!std::isnan(bf16_to_float(float_to_bf16(std::nanf(""))))) { std::printf("FAIL bf16 nan\n"); ++failures; }
}

static void test_bf16_kernel() {
  // The bf16 forward equals the fp32 forward rounded once to bf16.
  BnParams p;
  p.N = 2; p.C = 3; p.HW = 5000; p.act = Act::kLeakyRelu; p.slope = 0.2f;
  const int64_t n = p.numel();
  std::vector<float> xf(n), yf(n);
  std::vector<uint16_t> xb(n), yb(n);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t i = 0; i < n; ++i) { xb[i] = float_to_bf16(nd(rng)); xf[i] = bf16_to_float(xb[i]); }
  std::vector<float> scale{1.5f, -0.5f, 2.f}, shift{0.1f, 0.f, -1.f};
  bn_forward_apply(p, xf.data(), nullptr, scale.data(), shift.data(), yf.data());
  p.dtype = DType::kBFloat16;
  bn_forward_apply(p, xb.data(), nullptr, scale.data(), shift.data(), yb.data());
  for (int64_t i = 0; i < n; ++i)
    if (yb[i] != float_to_bf16(yf[i])) { if (failures < 20) std::printf("FAIL bf16 forward at %ld\n", long(i)); ++failures; }
}

int main() {
  test_conversions();
  test_bf16_kernel();
  const Act acts[] = {Act::kIdentity, Act::kRelu, Act::kLeakyRelu};
  const int64_t shapes[][3] = {{3, 5, 63}, {2, 3, 5000}, {1, 64, 300}, {4, 1, 1}};
  int cases = 0;
  for (auto& s : shapes)
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
      for (Act act : acts)
        for (bool residual : {false, true})
          for (bool training : {true, false}) {
            run_case(s[0], s[1], s[2], layout, act, residual, training, 0.0);
            ++cases;
          }
  // |mean| >> std: the statistics must not cancel catastrophically.
  run_case(2, 3, 5000, Layout::kNCHW, Act::kIdentity, false, true, 1000.0);
  run_case(2, 3, 5000, Layout::kNHWC, Act::kIdentity, false, true, 1000.0);
  cases += 2;
  std::printf("%d kernel cases, %s (%d failures)\n", cases, failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
