#include "hybrid/ops/rms_norm.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>

namespace hybrid::ops {

#ifdef HYBRID_CUDA_KERNELS
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& w, double eps);
std::pair<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dy,
                                                         double eps);
#endif

namespace {

// Left to autograd: the CPU path, and the float64 reference of the kernels.
at::Tensor rms_norm_aten(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor xa = x.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor normed = xa * at::rsqrt(xa.pow(2).mean(-1, true) + eps);
  return (weight * normed).to(x.scalar_type());
}

#ifdef HYBRID_CUDA_KERNELS
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows of D: the kernels see x as [rows, D], rows possibly further apart than D (a slice of a
// wider projection is read in place, not copied). Keeps x and the weight for the backward (r
// is recomputed there), where autograd over the ATen path keeps float32 copies of the rows.
struct RMSNormFunction : torch::autograd::Function<RMSNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    at::Tensor xr = x.reshape({-1, x.size(-1)}), w = weight.to(at::kFloat).contiguous();
    if (xr.stride(1) != 1 || xr.stride(0) < xr.size(1)) xr = xr.contiguous();
    ctx->save_for_backward({xr, w});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return rms_norm_cuda(xr, w, eps).view(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor dy = grads[0].reshape({-1, saved[0].size(1)}).contiguous();
    auto [dx, dw] = rms_norm_backward_cuda(saved[0], saved[1], dy, ctx->saved_data["eps"].toDouble());
    const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    return {dx.view(grads[0].sizes()), dw.to(weight_dtype), at::Tensor()};
  }
};
#endif

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (x.dim() < 1 || weight.dim() != 1 || weight.size(0) != x.size(-1))
    throw std::invalid_argument("rms_norm: weight must be [D] with D = x.size(-1)");
  if (weight.device() != x.device()) throw std::invalid_argument("rms_norm: weight must be on x's device");
#ifdef HYBRID_CUDA_KERNELS
  if (x.is_cuda() && x.scalar_type() != at::kDouble && x.size(-1) <= 4096 && x.numel() > 0)
    return RMSNormFunction::apply(x, weight, eps);
#endif
  return rms_norm_aten(x, weight, eps);
}

}  // namespace hybrid::ops
