// Torch binding of the CUDA kernels (bn_cuda.cu): argument checks up front (csrc/bn_binding.h),
// allocation, the current stream, and two functions added to aegan_fast._C through the hook that
// csrc/bindings.cpp calls (aegan_fast_bind_cuda). The torch.library ops, fake kernels and autograd
// formulas are in aegan_fast/ops/library.py.
//
// Compiled by the host compiler (setup.py adds csrc/cuda/*.cpp to the CUDAExtension); it needs only
// the c10/cuda headers, not ATen/cuda/CUDAContext.h (so a CUDA toolkit without cuBLAS headers can
// syntax-check it).
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "../bn_binding.h"
#include "bn_cuda.h"

namespace {

using namespace aegan_fast::binding;  // Tensor, optional, the shared checks
namespace kc = aegan_fast::cuda;
constexpr const char* kWho = "cuda";

kc::BnParams cuda_params(const Tensor& x, int64_t act, double slope, double eps) {
  TORCH_CHECK(x.is_cuda(), "aegan_fast cuda ops run on CUDA tensors, got ", x.device());
  return make_params(x, act, slope, eps, kWho);
}

const float* ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

int num_sms(const Tensor& x) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, x.get_device()));
  return n;
}

}  // namespace

// Returns (out, mean, var): the batch mean and biased variance (fp32) in training; empty tensors in
// eval mode, where the running statistics are used (the caller saves those for backward).
std::tuple<Tensor, Tensor, Tensor> cuda_bn_forward(const Tensor& x, const optional<Tensor>& residual,
                                                   const optional<Tensor>& weight, const optional<Tensor>& bias,
                                                   const optional<Tensor>& running_mean,
                                                   const optional<Tensor>& running_var, bool training, double eps,
                                                   int64_t act, double slope) {
  kc::BnParams p = cuda_params(x, act, slope, eps);
  if (present(residual)) check_like(*residual, x, "residual", kWho);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor w = channel_vector(weight, x, "weight", kWho), b = channel_vector(bias, x, "bias", kWho);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor mean, var;
  if (training) {
    TORCH_CHECK(p.count() > 1, "Expected more than 1 value per channel when training, got input size ", x.sizes());
    const int splits = kc::bn_num_splits(p, num_sms(x));
    Tensor partials = at::empty({3 * splits * p.C}, f32);
    mean = at::empty({p.C}, f32);
    var = at::empty({p.C}, f32);
    kc::bn_stats(p, x.data_ptr(), splits, partials.data_ptr<float>(), mean.data_ptr<float>(), var.data_ptr<float>(),
                 stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_CHECK(present(running_mean) && present(running_var),
                "aegan_fast cuda ops: eval mode (training=False) needs running_mean and running_var");
    mean = channel_vector(running_mean, x, "running_mean", kWho);
    var = channel_vector(running_var, x, "running_var", kWho);
  }
  Tensor out = at::empty_like(x);
  TORCH_CHECK(out.strides() == x.strides(), "aegan_fast cuda ops: internal error, output strides differ from input's");
  kc::bn_forward_apply(p, x.data_ptr(), present(residual) ? residual->data_ptr() : nullptr, mean.data_ptr<float>(),
                       var.data_ptr<float>(), ptr(w), ptr(b), out.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!training) {
    mean = at::empty({0}, f32);
    var = at::empty({0}, f32);
  }
  return {out, mean, var};
}

// Returns (dx, dres, dweight, dbias); dweight / dbias are fp32 sums (sum dz*xhat, sum dz), dres is empty
// unless want_dres. residual: the forward's, when the activation is not the identity (z is recomputed).
std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_bn_backward(const Tensor& dy, const Tensor& x,
                                                            const optional<Tensor>& residual,
                                                            const optional<Tensor>& weight,
                                                            const optional<Tensor>& bias, const Tensor& mean,
                                                            const Tensor& var, bool training, double eps, int64_t act,
                                                            double slope, bool want_dres) {
  kc::BnParams p = cuda_params(x, act, slope, eps);
  check_like(dy, x, "grad_output", kWho);
  if (present(residual)) check_like(*residual, x, "residual", kWho);
  const optional<Tensor> m(mean), v(var);
  Tensor mean32 = channel_vector(m, x, "mean", kWho), var32 = channel_vector(v, x, "var", kWho);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor w = channel_vector(weight, x, "weight", kWho), b = channel_vector(bias, x, "bias", kWho);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty_like(x);
  Tensor dres = want_dres ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor dw = at::empty({p.C}, f32), db = at::empty({p.C}, f32);
  const int splits = kc::bn_num_splits(p, num_sms(x));
  Tensor partials = at::empty({2 * splits * p.C}, f32);
  kc::BnBackwardArgs a;
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.residual = present(residual) ? residual->data_ptr() : nullptr;
  a.mean = mean32.data_ptr<float>();
  a.var = var32.data_ptr<float>();
  a.weight = ptr(w);
  a.bias = ptr(b);
  a.training = training;
  kc::BnBackwardOut o;
  o.dx = dx.data_ptr();
  o.dres = want_dres ? dres.data_ptr() : nullptr;
  o.dweight = dw.data_ptr<float>();
  o.dbias = db.data_ptr<float>();
  kc::bn_backward(p, a, o, splits, partials.data_ptr<float>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dres, dw, db};
}

// Called by csrc/bindings.cpp's PYBIND11_MODULE when this file is linked in (a CUDA build).
void aegan_fast_bind_cuda(pybind11::module_& m) {
  m.def("cuda_bn_forward", &cuda_bn_forward, "CUDA fused BN(+residual)+activation forward; returns (out, mean, var)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("training"), py::arg("eps"), py::arg("act"), py::arg("slope"));
  m.def("cuda_bn_backward", &cuda_bn_backward,
        "CUDA fused BN(+residual)+activation backward; returns (dx, dres, dweight, dbias)", py::arg("dy"),
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("var"),
        py::arg("training"), py::arg("eps"), py::arg("act"), py::arg("slope"), py::arg("want_dres"));
}
