// Torch bindings of the CPU kernels: argument checks (csrc/bn_binding.h), allocation, and the
// pybind11 module aegan_fast._C. The torch.library ops (one schema per op, fake kernels, autograd)
// live in aegan_fast/ops/library.py; these functions are the eager kernels behind the cpp adapter.
#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bn_act.h"
#include "bn_binding.h"

namespace {

using namespace aegan_fast::binding;  // Tensor, optional, the shared checks
namespace cpu = aegan_fast::cpu;
constexpr const char* kWho = "cpp";

cpu::BnParams cpu_params(const Tensor& x, int64_t act, double slope, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "aegan_fast cpp ops run on CPU tensors, got ", x.device());
  cpu::BnParams p = make_params(x, act, slope, eps, kWho);
  p.num_threads = at::get_num_threads();
  return p;
}

// The CPU kernels read every per-channel vector: ones / zeros stand in for an absent weight / bias.
Tensor or_fill(const Tensor& t, int64_t C, double fill) {
  return t.defined() ? t : at::full({C}, fill, at::TensorOptions().dtype(at::kFloat));
}

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

// The optional out / dx buffers (not part of the ops' schema) let benchmarks time the kernels
// without the page faults of a fresh allocation.

// Forward. Returns (out, mean, var): in training the batch mean and biased batch variance (fp32),
// in eval mode (running statistics used) two empty tensors.
std::tuple<Tensor, Tensor, Tensor> bn_forward(const Tensor& x, const optional<Tensor>& residual,
                                              const optional<Tensor>& weight, const optional<Tensor>& bias,
                                              const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
                                              bool training, double eps, int64_t act, double slope,
                                              const optional<Tensor>& out_buffer) {
  cpu::BnParams p = cpu_params(x, act, slope, eps);
  if (present(residual)) check_like(*residual, x, "residual", kWho);
  const int64_t C = p.C;
  Tensor w = or_fill(channel_vector(weight, x, "weight", kWho), C, 1.0);
  Tensor b = or_fill(channel_vector(bias, x, "bias", kWho), C, 0.0);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  Tensor mean, var;
  if (training) {
    TORCH_CHECK(p.count() > 1, "Expected more than 1 value per channel when training, got input size ", x.sizes());
    std::vector<double> m(C), v(C);
    cpu::bn_stats(p, x.data_ptr(), m.data(), v.data());
    mean = at::empty({C}, f32);
    var = at::empty({C}, f32);
    for (int64_t c = 0; c < C; ++c) {
      mean.data_ptr<float>()[c] = float(m[c]);
      var.data_ptr<float>()[c] = float(v[c]);
    }
  } else {
    TORCH_CHECK(present(running_mean) && present(running_var),
                "aegan_fast cpp ops: eval mode (training=False) needs running_mean and running_var");
    mean = channel_vector(running_mean, x, "running_mean", kWho);
    var = channel_vector(running_var, x, "running_var", kWho);
  }
  Tensor invstd = invstd_of(var, eps);
  const float* mp = mean.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  std::vector<float> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = wp[c] * ip[c];  // the backward recomputes z with exactly these two expressions
    shift[c] = bp[c] - mp[c] * scale[c];
  }
  Tensor out = present(out_buffer) ? *out_buffer : fresh_like(x);
  check_like(out, x, "out", kWho);
  {
    pybind11::gil_scoped_release no_gil;
    cpu::bn_forward_apply(p, x.data_ptr(), present(residual) ? residual->data_ptr() : nullptr, scale.data(),
                          shift.data(), out.data_ptr());
  }
  if (!training) {
    mean = at::empty({0}, f32);
    var = at::empty({0}, f32);
  }
  return {out, mean, var};
}

// Backward. mean / var: the batch statistics (training) or the running ones (eval); residual: the
// forward's residual when the activation is not the identity (z is recomputed from x and it), else
// None. Returns (dx, dres, dweight, dbias); dres is empty unless want_dres; dweight / dbias are the
// fp32 per-channel sums sum(dz * xhat) / sum(dz).
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward(const Tensor& dy, const Tensor& x, const optional<Tensor>& residual,
                                                       const optional<Tensor>& weight, const optional<Tensor>& bias,
                                                       const Tensor& mean, const Tensor& var, bool training, double eps,
                                                       int64_t act, double slope, bool want_dres,
                                                       const optional<Tensor>& dx_buffer) {
  cpu::BnParams p = cpu_params(x, act, slope, eps);
  check_like(dy, x, "grad_output", kWho);
  if (present(residual)) check_like(*residual, x, "residual", kWho);
  const int64_t C = p.C;
  const optional<Tensor> m(mean), v(var);
  Tensor mean32 = channel_vector(m, x, "mean", kWho), var32 = channel_vector(v, x, "var", kWho);
  Tensor invstd = invstd_of(var32, eps);
  Tensor w = or_fill(channel_vector(weight, x, "weight", kWho), C, 1.0);
  Tensor b = or_fill(channel_vector(bias, x, "bias", kWho), C, 0.0);
  Tensor dx = present(dx_buffer) ? *dx_buffer : fresh_like(x);
  check_like(dx, x, "dx", kWho);
  Tensor dres = want_dres ? fresh_like(x) : at::empty({0}, x.options());
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  Tensor dw = at::empty({C}, f32), db = at::empty({C}, f32);
  cpu::BnBackwardArgs a;
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.residual = present(residual) ? residual->data_ptr() : nullptr;
  a.mean = mean32.data_ptr<float>();
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
  return {dx, dres, dw, db};
}

// The CUDA side (csrc/cuda/, compiled only when torch has CUDA) adds its functions to this module
// by defining this hook; it is weak so the CPU-only build links without it.
void aegan_fast_bind_cuda(pybind11::module_& m) __attribute__((weak));

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aegan_fast native kernels: fused BatchNorm + activation (+ residual), CPU (and CUDA when built)";
  m.def("bn_forward", &bn_forward, "fused BN(+residual)+activation forward; returns (out, mean, biased var)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("training"), py::arg("eps"), py::arg("act"), py::arg("slope"),
        py::arg("out") = py::none());
  m.def("bn_backward", &bn_backward, "fused BN(+residual)+activation backward; returns (dx, dres, dweight, dbias)",
        py::arg("dy"), py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("mean"),
        py::arg("var"), py::arg("training"), py::arg("eps"), py::arg("act"), py::arg("slope"), py::arg("want_dres"),
        py::arg("dx") = py::none());
  m.def("cpu_isa", [] { return std::string(cpu::cpu_isa()); },
        "the instruction set the CPU kernels run with: base, avx2 or avx512");
  m.def("best_cpu_isa", [] { return std::string(cpu::best_cpu_isa()); },
        "the best instruction set this CPU supports for the CPU kernels");
  m.def("set_cpu_isa", [](const std::string& name) {
          const std::string before = cpu::cpu_isa();
          TORCH_CHECK_VALUE(cpu::set_cpu_isa(name.c_str()), "aegan_fast cpp ops: instruction set must be one of base, "
                            "avx2, avx512 and at most ", cpu::best_cpu_isa(), " on this CPU, got '", name, "'");
          return before;
        }, "run the CPU kernels with this instruction set (tests); returns the previous one", py::arg("name"));
  // The activation codes of bn_params.h, for the test that the Python table agrees.
  py::dict codes;
  codes["identity"] = int(aegan_fast::Act::kIdentity);
  codes["relu"] = int(aegan_fast::Act::kRelu);
  codes["leaky_relu"] = int(aegan_fast::Act::kLeakyRelu);
  m.attr("ACTIVATION_CODES") = codes;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.attr("with_cuda") = aegan_fast_bind_cuda != nullptr;
  if (aegan_fast_bind_cuda != nullptr) aegan_fast_bind_cuda(m);
}
