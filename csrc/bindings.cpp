// Torch bindings of the CPU kernels: argument checks, allocation, and the pybind11 module
// aegan_fast._C. The torch.library registration (custom ops, fake kernels, autograd) lives in
// aegan_fast/ops/_cpp.py; these functions are the eager kernels behind those ops.
//
// Every check happens here, up front, with TORCH_CHECK, so bad input gives one clear message and
// the kernels in bn_act_cpu.cpp can assume well-formed pointers.
#include <torch/extension.h>

#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bn_act.h"

namespace {

using at::Tensor;
using c10::optional;
namespace cpu = aegan_fast::cpu;

cpu::DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    case at::kHalf: return cpu::DType::kFloat16;
    default: TORCH_CHECK(false, "aegan_fast cpp ops: input must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return cpu::DType::kFloat32;
}

cpu::Act act_of(int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 2, "aegan_fast cpp ops: activation code must be 0 (identity), 1 (relu) or 2 "
              "(leaky_relu), got ", act);
  return static_cast<cpu::Act>(act);
}

// NCHW-contiguous or channels_last-contiguous, checked; a tensor that is both (C == 1 or H*W == 1)
// counts as NCHW.
cpu::Layout layout_of(const Tensor& x, const char* name) {
  if (x.is_contiguous()) return cpu::Layout::kNCHW;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return cpu::Layout::kNHWC;
  TORCH_CHECK(false, "aegan_fast cpp ops: ", name, " must be contiguous in NCHW or channels_last memory format "
              "(call .contiguous() first), got sizes ", x.sizes(), " strides ", x.strides());
  return cpu::Layout::kNCHW;
}

cpu::BnParams make_params(const Tensor& x, int64_t act, double slope) {
  TORCH_CHECK(x.device().is_cpu(), "aegan_fast cpp ops run on CPU tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "aegan_fast cpp ops: input must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) > 0, "aegan_fast cpp ops: input needs at least one channel");
  cpu::BnParams p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.HW = x.size(2) * x.size(3);
  p.layout = layout_of(x, "input");
  p.dtype = dtype_of(x);
  p.act = act_of(act);
  p.slope = static_cast<float>(slope);
  p.num_threads = at::get_num_threads();
  return p;
}

// Same shape, dtype, device and strides as x (the kernels index every tensor alike).
void check_like(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "aegan_fast cpp ops: ", name, " is on ", t.device(), ", input on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "aegan_fast cpp ops: ", name, " has dtype ", t.scalar_type(),
              ", input has ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "aegan_fast cpp ops: ", name, " has shape ", t.sizes(), ", input has ", x.sizes());
  TORCH_CHECK(t.numel() == 0 || t.strides() == x.strides(), "aegan_fast cpp ops: ", name,
              " must have the input's memory format (strides ", x.strides(), "), got strides ", t.strides());
}

// A per-channel parameter as a contiguous fp32 vector (ones / zeros when absent).
Tensor channel_vector(const optional<Tensor>& t, int64_t C, double fill, const char* name) {
  if (!t.has_value() || !t->defined()) return at::full({C}, fill, at::TensorOptions().dtype(at::kFloat));
  TORCH_CHECK(t->device().is_cpu(), "aegan_fast cpp ops: ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "aegan_fast cpp ops: ", name, " must have shape (", C, "), got ",
              t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "aegan_fast cpp ops: ", name, " must be floating point, got ",
              t->scalar_type());
  return t->to(at::kFloat).contiguous();
}

bool present(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

// A fresh activation-sized output is untouched memory, and on first touch each 4 KB page faults;
// on the VMs we run on that costs about as much as a pass over the data (a 67 MB output: ~15k
// faults, tens of ms). Advising transparent huge pages for the 2 MB-aligned interior, before the
// kernel's first touch, makes that 512x fewer faults. It is a hint (same as torch's
// THP_MEM_ALLOC_ENABLE=1 does for all of its allocations): no effect on results, ignored where THP
// is off; only for outputs this binding has just allocated.
Tensor fresh_like(const Tensor& x) {
  Tensor t = at::empty_like(x);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + uintptr_t(t.numel()) * uintptr_t(t.element_size());
  const uintptr_t a = (begin + kHuge - 1) & ~(kHuge - 1), b = end & ~(kHuge - 1);
  if (b > a && b - a >= 2 * kHuge) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#endif
  return t;
}

}  // namespace

// The optional out / dx buffers (not part of the custom ops' schema) let benchmarks time the
// kernels without the page faults of a fresh allocation.

// Forward. Returns (out, mean, invstd, var_unbiased):
//  training: mean / invstd are the batch's (saved for backward), var_unbiased feeds the running
//            update (bn_running_update); eval: mean / invstd come from the running statistics and
//            var_unbiased is empty.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_forward(const Tensor& x, const optional<Tensor>& residual,
                                                      const optional<Tensor>& weight, const optional<Tensor>& bias,
                                                      const optional<Tensor>& running_mean,
                                                      const optional<Tensor>& running_var, bool training, double eps,
                                                      int64_t act, double slope, const optional<Tensor>& out_buffer) {
  cpu::BnParams p = make_params(x, act, slope);
  TORCH_CHECK(eps >= 0, "aegan_fast cpp ops: eps must be >= 0, got ", eps);
  if (present(residual)) check_like(*residual, x, "residual");
  const int64_t C = p.C;
  Tensor w = channel_vector(weight, C, 1.0, "weight");
  Tensor b = channel_vector(bias, C, 0.0, "bias");
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  Tensor mean = at::empty({C}, f32), invstd = at::empty({C}, f32);
  Tensor var_unbiased = at::empty({training ? C : 0}, f32);
  std::vector<double> m(C), v(C);
  if (training) {
    TORCH_CHECK(p.count() > 1, "Expected more than 1 value per channel when training, got input size ", x.sizes());
    cpu::bn_stats(p, x.data_ptr(), m.data(), v.data());
    const double n = double(p.count());
    float* vu = var_unbiased.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) vu[c] = float(v[c] * n / (n - 1.0));
  } else {
    TORCH_CHECK(present(running_mean) && present(running_var),
                "aegan_fast cpp ops: eval mode (training=False) needs running_mean and running_var");
    Tensor rm = channel_vector(running_mean, C, 0.0, "running_mean").to(at::kDouble);
    Tensor rv = channel_vector(running_var, C, 1.0, "running_var").to(at::kDouble);
    for (int64_t c = 0; c < C; ++c) { m[c] = rm.data_ptr<double>()[c]; v[c] = rv.data_ptr<double>()[c]; }
  }
  float* mp = mean.data_ptr<float>();
  float* ip = invstd.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  std::vector<float> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    mp[c] = float(m[c]);
    ip[c] = float(1.0 / std::sqrt(v[c] + eps));
    scale[c] = wp[c] * ip[c];   // the backward recomputes z with exactly these two expressions
    shift[c] = bp[c] - mp[c] * scale[c];
  }
  Tensor out = present(out_buffer) ? *out_buffer : fresh_like(x);
  check_like(out, x, "out");
  {
    pybind11::gil_scoped_release no_gil;
    cpu::bn_forward_apply(p, x.data_ptr(), present(residual) ? residual->data_ptr() : nullptr, scale.data(),
                          shift.data(), out.data_ptr());
  }
  return {out, mean, invstd, var_unbiased};
}

// Backward. src is x, or the output when memory_efficient; y is the output when the activation
// mask must come from it (bn_add_act), else None. Returns (dx, dres, dweight, dbias); dres is empty
// unless want_dres, dweight / dbias are empty when weight / bias are None.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward(const Tensor& dy, const Tensor& src, const optional<Tensor>& y,
                                                       const optional<Tensor>& weight, const optional<Tensor>& bias,
                                                       const Tensor& mean, const Tensor& invstd, bool training,
                                                       int64_t act, double slope, bool memory_efficient,
                                                       bool want_dres, const optional<Tensor>& dx_buffer) {
  cpu::BnParams p = make_params(src, act, slope);
  check_like(dy, src, "grad_output");
  if (present(y)) check_like(*y, src, "output");
  const int64_t C = p.C;
  if (memory_efficient) {
    TORCH_CHECK(p.act == cpu::Act::kIdentity || (p.act == cpu::Act::kLeakyRelu && slope > 0),
                "aegan_fast cpp ops: memory_efficient needs an invertible activation (identity or leaky_relu with "
                "negative_slope > 0)");
    TORCH_CHECK(!present(y), "aegan_fast cpp ops: memory_efficient takes the output as src, not as y");
  }
  TORCH_CHECK(p.act != cpu::Act::kLeakyRelu || slope >= 0 || !present(y),
              "aegan_fast cpp ops: with a residual, leaky_relu needs negative_slope >= 0 (the backward reads the "
              "activation's derivative off the output's sign)");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && invstd.scalar_type() == at::kFloat && mean.numel() == C &&
                  invstd.numel() == C && mean.is_contiguous() && invstd.is_contiguous(),
              "aegan_fast cpp ops: mean and invstd must be contiguous float32 vectors of length C=", C);
  Tensor w = channel_vector(weight, C, 1.0, "weight");
  Tensor b = channel_vector(bias, C, 0.0, "bias");
  Tensor dx = present(dx_buffer) ? *dx_buffer : fresh_like(src);
  check_like(dx, src, "dx");
  Tensor dres = want_dres ? fresh_like(src) : at::empty({0}, src.options());
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  Tensor dw = at::empty({C}, f32), db = at::empty({C}, f32);
  cpu::BnBackwardArgs a;
  a.dy = dy.data_ptr();
  a.src = src.data_ptr();
  a.src_is_output = memory_efficient;
  a.y = present(y) ? y->data_ptr() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.invstd = invstd.data_ptr<float>();
  a.weight = w.data_ptr<float>();
  a.bias = b.data_ptr<float>();
  a.training = training;
  cpu::BnBackwardOut o;
  o.dx = dx.data_ptr();
  o.dres = want_dres ? dres.data_ptr() : nullptr;
  o.dweight = dw.data_ptr<float>();
  o.dbias = db.data_ptr<float>();
  {
    pybind11::gil_scoped_release no_gil;
    cpu::bn_backward(p, a, o);
  }
  Tensor dw_out = present(weight) ? dw.to(weight->scalar_type()) : at::empty({0}, f32);
  Tensor db_out = present(bias) ? db.to(bias->scalar_type()) : at::empty({0}, f32);
  return {dx, dres, dw_out, db_out};
}

// running = (1 - momentum) * running + momentum * batch, in fp64 like ATen's CPU batch_norm, then
// stored back in the running tensors' own dtype. In place.
void bn_running_update(Tensor& running_mean, Tensor& running_var, const Tensor& mean, const Tensor& var_unbiased,
                       double momentum) {
  TORCH_CHECK(running_mean.device().is_cpu() && running_var.device().is_cpu(),
              "aegan_fast cpp ops: running statistics must be CPU tensors");
  TORCH_CHECK(running_mean.numel() == mean.numel() && running_var.numel() == var_unbiased.numel() &&
                  mean.numel() == var_unbiased.numel(),
              "aegan_fast cpp ops: running statistics and batch statistics must have the same length, got ",
              running_mean.numel(), ", ", running_var.numel(), ", ", mean.numel(), ", ", var_unbiased.numel());
  auto update = [momentum](Tensor& running, const Tensor& batch) {
    Tensor r = running.to(at::kDouble).mul(1.0 - momentum).add(batch.to(at::kDouble), momentum);
    running.copy_(r);
  };
  update(running_mean, mean);
  update(running_var, var_unbiased);
}

// The CUDA side (csrc/cuda/, compiled only when torch has CUDA) adds its functions to this module
// by defining this hook; it is weak so the CPU-only build links without it.
void aegan_fast_bind_cuda(pybind11::module_& m) __attribute__((weak));

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aegan_fast native kernels: fused BatchNorm + activation (+ residual), CPU (and CUDA when built)";
  m.def("bn_forward", &bn_forward, "fused BN(+residual)+activation forward; returns (out, mean, invstd, var_unbiased)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("training"), py::arg("eps"), py::arg("act"), py::arg("slope"),
        py::arg("out") = py::none());
  m.def("bn_backward", &bn_backward, "fused BN(+residual)+activation backward; returns (dx, dres, dweight, dbias)",
        py::arg("dy"), py::arg("src"), py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("mean"),
        py::arg("invstd"), py::arg("training"), py::arg("act"), py::arg("slope"), py::arg("memory_efficient"),
        py::arg("want_dres"), py::arg("dx") = py::none());
  m.def("bn_running_update", &bn_running_update, "in-place running statistics update (fp64 arithmetic)",
        py::arg("running_mean"), py::arg("running_var"), py::arg("mean"), py::arg("var_unbiased"),
        py::arg("momentum"));
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.attr("with_cuda") = aegan_fast_bind_cuda != nullptr;
  if (aegan_fast_bind_cuda != nullptr) aegan_fast_bind_cuda(m);
}
