#include "hybrid/ops/gated_rms_norm.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "argument_check.h"

namespace hybrid::ops {

#ifdef HYBRID_CUDA_KERNELS
at::Tensor gated_rms_norm_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& w, double eps,
                               at::ScalarType y_dtype);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_rms_norm_backward_cuda(const at::Tensor& x, const at::Tensor& gate,
                                                                            const at::Tensor& w, const at::Tensor& dy,
                                                                            double eps);
#endif

namespace {

// Left to autograd: the CPU path, and the float64 reference of the kernels.
at::Tensor gated_rms_norm_aten(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& weight, double eps,
                               at::ScalarType output) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor xa = x.to(acc);
  at::Tensor normed = (xa * at::rsqrt(xa.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
  return (weight * normed * at::silu(gate.to(acc))).to(output);
}

#ifdef HYBRID_CUDA_KERNELS
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows of D: the kernels see x as [rows, D] and read the gate where it is (a column slice of the
// fused projection in GDN; no copy). Keeps x, gate and the weight for the backward (r and the gate
// terms are recomputed there), where autograd over the ATen path keeps several float32 copies of
// the row data.
struct GatedRMSNormFunction : torch::autograd::Function<GatedRMSNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& weight,
                            double eps, at::ScalarType output) {
    const int64_t D = x.size(-1);
    at::Tensor xr = x.reshape({-1, D}).contiguous();
    at::Tensor w = weight.to(at::kFloat).contiguous();
    ctx->save_for_backward({xr, gate, w});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    ctx->saved_data["output_dtype"] = static_cast<int64_t>(output);
    return gated_rms_norm_cuda(xr, gate, w, eps, output).view(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& xr = saved[0];
    const auto output = static_cast<at::ScalarType>(ctx->saved_data["output_dtype"].toInt());
    at::Tensor dy = grads[0].reshape({-1, xr.size(1)}).to(output).contiguous();
    auto [dx, dgate, dw] = gated_rms_norm_backward_cuda(xr, saved[1], saved[2], dy, ctx->saved_data["eps"].toDouble());
    const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    return {dx.view(grads[0].sizes()), dgate.view(grads[0].sizes()), dw.to(weight_dtype), at::Tensor(), at::Tensor()};
  }
};
#endif

}  // namespace

at::Tensor gated_rms_norm(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& weight, double eps,
                          std::optional<at::ScalarType> output) {
  const detail::ArgumentCheck check{"gated_rms_norm"};
  check(x.dim() >= 1 && gate.sizes() == x.sizes(), "gate must have x's shape");
  check(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must be [D] with D = x.size(-1)");
  check(gate.device() == x.device() && weight.device() == x.device(), "gate and weight must be on x's device");
  const at::ScalarType y_dtype = output.value_or(x.scalar_type());
  check(y_dtype == x.scalar_type() || y_dtype == gate.scalar_type(), "the output dtype must be x's or the gate's");
#ifdef HYBRID_CUDA_KERNELS
  if (x.is_cuda() && x.scalar_type() != at::kDouble && gate.scalar_type() != at::kDouble && x.size(-1) <= 256 &&
      x.numel() > 0)
    return GatedRMSNormFunction::apply(x, gate, weight, eps, y_dtype);
#endif
  return gated_rms_norm_aten(x, gate, weight, eps, y_dtype);
}

}  // namespace hybrid::ops
