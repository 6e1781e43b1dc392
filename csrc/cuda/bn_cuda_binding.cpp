// Torch binding of the CUDA kernels (bn_cuda.cu): argument checks up front with TORCH_CHECK,
// allocation, the current stream, and three functions added to aegan_fast._C through the hook that
// csrc/bindings.cpp calls (aegan_fast_bind_cuda). The torch.library ops, fake kernels and autograd
// formulas are in aegan_fast/ops/_cuda.py.
//
// Compiled by the host compiler (setup.py adds csrc/cuda/*.cpp to the CUDAExtension); it needs only
// the c10/cuda headers, not ATen/cuda/CUDAContext.h (so a CUDA toolkit without cuBLAS headers can
// syntax-check it).
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "bn_cuda.h"

namespace {

using at::Tensor;
using c10::optional;
namespace kc = aegan_fast::cuda;

bool present(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

kc::DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return kc::DType::kFloat32;
    case at::kBFloat16: return kc::DType::kBFloat16;
    case at::kHalf: return kc::DType::kFloat16;
    default: TORCH_CHECK(false, "aegan_fast cuda ops: input must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return kc::DType::kFloat32;
}

kc::BnParams make_params(const Tensor& x, int64_t act, double slope, double eps) {
  TORCH_CHECK(x.is_cuda(), "aegan_fast cuda ops run on CUDA tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "aegan_fast cuda ops: input must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) > 0, "aegan_fast cuda ops: input needs at least one channel");
  TORCH_CHECK(act >= 0 && act <= 2, "aegan_fast cuda ops: activation code must be 0, 1 or 2, got ", act);
  TORCH_CHECK(eps >= 0, "aegan_fast cuda ops: eps must be >= 0, got ", eps);
  kc::BnParams p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.HW = x.size(2) * x.size(3);
  if (x.is_contiguous()) {
    p.layout = kc::Layout::kNCHW;
  } else {
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "aegan_fast cuda ops: input must be contiguous in "
                "NCHW or channels_last memory format, got strides ", x.strides());
    p.layout = kc::Layout::kNHWC;
  }
  p.dtype = dtype_of(x);
  p.act = static_cast<kc::Act>(act);
  p.slope = static_cast<float>(slope);
  p.eps = static_cast<float>(eps);
  return p;
}

void check_like(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "aegan_fast cuda ops: ", name, " is on ", t.device(), ", input on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "aegan_fast cuda ops: ", name, " has dtype ", t.scalar_type(),
              ", input has ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "aegan_fast cuda ops: ", name, " has shape ", t.sizes(), ", input ", x.sizes());
  TORCH_CHECK(t.strides() == x.strides(), "aegan_fast cuda ops: ", name, " must have the input's memory format "
              "(strides ", x.strides(), "), got ", t.strides());
}

// A per-channel vector as contiguous fp32 on x's device (undefined when absent: the kernels use 1 / 0).
Tensor channel_vector(const optional<Tensor>& t, const Tensor& x, const char* name) {
  if (!present(t)) return Tensor();
  TORCH_CHECK(t->device() == x.device(), "aegan_fast cuda ops: ", name, " is on ", t->device(), ", input on ",
              x.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "aegan_fast cuda ops: ", name, " must have shape (",
              x.size(1), "), got ", t->sizes());
  return t->to(at::kFloat).contiguous();
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
  kc::BnParams p = make_params(x, act, slope, eps);
  if (present(residual)) check_like(*residual, x, "residual");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor w = channel_vector(weight, x, "weight"), b = channel_vector(bias, x, "bias");
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
    mean = channel_vector(running_mean, x, "running_mean");
    var = channel_vector(running_var, x, "running_var");
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
// unless want_dres. src is x, or the output when src_is_output (memory-efficient mode, no residual).
std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_bn_backward(const Tensor& dy, const Tensor& src,
                                                            const optional<Tensor>& residual,
                                                            const optional<Tensor>& weight,
                                                            const optional<Tensor>& bias, const Tensor& mean,
                                                            const Tensor& var, bool training, double eps, int64_t act,
                                                            double slope, bool src_is_output, bool want_dres) {
  kc::BnParams p = make_params(src, act, slope, eps);
  check_like(dy, src, "grad_output");
  if (present(residual)) check_like(*residual, src, "residual");
  if (src_is_output) {
    TORCH_CHECK(p.act == kc::Act::kIdentity || (p.act == kc::Act::kLeakyRelu && slope > 0),
                "aegan_fast cuda ops: memory_efficient needs an invertible activation (identity or leaky_relu with "
                "negative_slope > 0)");
    TORCH_CHECK(!present(residual), "aegan_fast cuda ops: memory_efficient does not take a residual");
  }
  const optional<Tensor> m(mean), v(var);
  Tensor mean32 = channel_vector(m, src, "mean"), var32 = channel_vector(v, src, "var");
  const c10::cuda::CUDAGuard guard(src.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor w = channel_vector(weight, src, "weight"), b = channel_vector(bias, src, "bias");
  auto f32 = src.options().dtype(at::kFloat);
  Tensor dx = at::empty_like(src);
  Tensor dres = want_dres ? at::empty_like(src) : at::empty({0}, src.options());
  Tensor dw = at::empty({p.C}, f32), db = at::empty({p.C}, f32);
  const int splits = kc::bn_num_splits(p, num_sms(src));
  Tensor partials = at::empty({2 * splits * p.C}, f32);
  kc::BnBackwardArgs a;
  a.dy = dy.data_ptr();
  a.src = src.data_ptr();
  a.src_is_output = src_is_output;
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

// running = (1 - momentum) * running + momentum * batch, unbiased batch variance (count / (count - 1)),
// fp32 arithmetic, stored back in the running tensors' own dtype. In place.
void cuda_bn_running_update(Tensor& running_mean, Tensor& running_var, const Tensor& mean, const Tensor& var,
                            double momentum, int64_t count) {
  TORCH_CHECK(running_mean.is_cuda() && running_var.is_cuda() && mean.is_cuda() && var.is_cuda(),
              "aegan_fast cuda ops: running and batch statistics must be CUDA tensors");
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_var.numel() == C && mean.numel() == C && var.numel() == C,
              "aegan_fast cuda ops: running and batch statistics must have the same length");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && var.scalar_type() == at::kFloat && mean.is_contiguous() &&
                  var.is_contiguous(), "aegan_fast cuda ops: batch statistics must be contiguous float32");
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto direct = [](const Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous(); };
  Tensor rm = direct(running_mean) ? running_mean : running_mean.to(at::kFloat).contiguous();
  Tensor rv = direct(running_var) ? running_var : running_var.to(at::kFloat).contiguous();
  const float unbias = count > 1 ? static_cast<float>(double(count) / double(count - 1)) : 1.f;
  kc::bn_running_update(C, rm.data_ptr<float>(), rv.data_ptr<float>(), mean.data_ptr<float>(), var.data_ptr<float>(),
                        static_cast<float>(momentum), unbias, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!direct(running_mean)) running_mean.copy_(rm);
  if (!direct(running_var)) running_var.copy_(rv);
}

// Called by csrc/bindings.cpp's PYBIND11_MODULE when this file is linked in (a CUDA build).
void aegan_fast_bind_cuda(pybind11::module_& m) {
  m.def("cuda_bn_forward", &cuda_bn_forward, "CUDA fused BN(+residual)+activation forward; returns (out, mean, var)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("training"), py::arg("eps"), py::arg("act"), py::arg("slope"));
  m.def("cuda_bn_backward", &cuda_bn_backward,
        "CUDA fused BN(+residual)+activation backward; returns (dx, dres, dweight, dbias)", py::arg("dy"),
        py::arg("src"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("var"),
        py::arg("training"), py::arg("eps"), py::arg("act"), py::arg("slope"), py::arg("src_is_output"),
        py::arg("want_dres"));
  m.def("cuda_bn_running_update", &cuda_bn_running_update, "CUDA in-place running statistics update",
        py::arg("running_mean"), py::arg("running_var"), py::arg("mean"), py::arg("var"), py::arg("momentum"),
        py::arg("count"));
}
