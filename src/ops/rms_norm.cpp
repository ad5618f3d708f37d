#include "hybrid/ops/rms_norm.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>
#include <string>

namespace hybrid::ops {

#ifdef HYBRID_CUDA_KERNELS
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& w, double eps);
std::pair<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& residual, const at::Tensor& x,
                                                    const at::Tensor& w, double eps);
at::Tensor rms_norm_add_cuda(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w, double eps);
std::pair<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dy,
                                                         double eps, const at::Tensor& dsum);
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

// x as the kernels read it, [rows, D] with unit column stride: its rows may lie further apart
// than D (a slice of a wider projection is read in place, not copied).
at::Tensor kernel_rows(const at::Tensor& x) {
  at::Tensor xr = x.reshape({-1, x.size(-1)});
  return xr.stride(1) != 1 || xr.stride(0) < xr.size(1) ? xr.contiguous() : xr;
}

// Keeps eps and the weight's dtype for the backward; returns the float32 weight the kernels read.
at::Tensor keep_settings(AutogradContext* ctx, const at::Tensor& weight, double eps) {
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
  return weight.to(at::kFloat).contiguous();
}

// The backward kernel over the saved rows and float32 weight, dy shaped like the rows (dsum as
// rms_norm_backward_cuda takes it); dw in the weight's own dtype.
std::pair<at::Tensor, at::Tensor> norm_backward(AutogradContext* ctx, const at::Tensor& rows, const at::Tensor& w,
                                                const at::Tensor& dy, const at::Tensor& dsum) {
  auto [dx, dw] = rms_norm_backward_cuda(rows, w, dy.reshape(rows.sizes()).contiguous(),
                                         ctx->saved_data["eps"].toDouble(), dsum);
  return {dx, dw.to(static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt()))};
}

// Keeps x's rows and the weight for the backward (r is recomputed there), where autograd over
// the ATen path keeps float32 copies of the rows.
struct RMSNormFunction : torch::autograd::Function<RMSNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    const at::Tensor xr = kernel_rows(x), w = keep_settings(ctx, weight, eps);
    ctx->save_for_backward({xr, w});
    return rms_norm_cuda(xr, w, eps).view(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [dx, dw] = norm_backward(ctx, saved[0], saved[1], grads[0], at::Tensor());
    return {dx.view(grads[0].sizes()), dw, at::Tensor()};
  }
};

// h = residual + x and n = norm(h), both float32, in one kernel; h is kept for the backward.
// Backward: h's gradient is dh (from h's own uses) plus the norm's, summed as the norm's is
// written, and it is both inputs' gradient (autograd rounds x's to x's dtype, as for an add).
struct AddRMSNormFunction : torch::autograd::Function<AddRMSNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& residual, const at::Tensor& x,
                               const at::Tensor& weight, double eps) {
    const at::Tensor w = keep_settings(ctx, weight, eps);
    auto [h, n] = add_rms_norm_cuda(residual.reshape({-1, x.size(-1)}).contiguous(), kernel_rows(x), w, eps);
    ctx->save_for_backward({h, w});
    ctx->set_materialize_grads(false);
    return {h.view(residual.sizes()), n.view(residual.sizes())};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &dh = grads[0], &dn = grads[1];
    if (!dn.defined()) return {dh, dh, at::Tensor(), at::Tensor()};
    const at::Tensor dsum = dh.defined() ? dh.reshape(h.sizes()).contiguous() : at::Tensor();
    auto [dx, dw] = norm_backward(ctx, h, saved[1], dn, dsum);
    at::Tensor d = dx.view(dn.sizes());
    return {d, d, dw, at::Tensor()};
  }
};

// h = residual + rms_norm(x) (float32) in one kernel; x's rows and the weight kept. Backward: h's
// gradient is the residual's, and the norm's input gradient from it rounded to x's dtype in the
// kernel (where autograd's add would round it in a pass of its own).
struct RMSNormAddFunction : torch::autograd::Function<RMSNormAddFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& residual, const at::Tensor& x,
                            const at::Tensor& weight, double eps) {
    const at::Tensor xr = kernel_rows(x), w = keep_settings(ctx, weight, eps);
    ctx->save_for_backward({xr, w});
    return rms_norm_add_cuda(residual.reshape({-1, x.size(-1)}).contiguous(), xr, w, eps).view(residual.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& dh = grads[0];
    auto [dx, dw] = norm_backward(ctx, saved[0], saved[1], dh, at::Tensor());
    return {dh, dx.view(dh.sizes()), dw, at::Tensor()};
  }
};
#endif

// residual, where given: added to x, so of x's shape and device.
void check_arguments(const at::Tensor& x, const at::Tensor& weight, const char* op,
                     const at::Tensor* residual = nullptr) {
  if (x.dim() < 1 || weight.dim() != 1 || weight.size(0) != x.size(-1))
    throw std::invalid_argument(std::string(op) + ": weight must be [D] with D = x.size(-1)");
  if (weight.device() != x.device()) throw std::invalid_argument(std::string(op) + ": weight must be on x's device");
  if (residual && (residual->sizes() != x.sizes() || residual->device() != x.device()))
    throw std::invalid_argument(std::string(op) + ": residual and x must have one shape and device");
}

#ifdef HYBRID_CUDA_KERNELS
bool kernels_take(const at::Tensor& x) {
  return x.is_cuda() && x.scalar_type() != at::kDouble && x.size(-1) <= 4096 && x.numel() > 0;
}
#endif

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_arguments(x, weight, "rms_norm");
#ifdef HYBRID_CUDA_KERNELS
  if (kernels_take(x)) return RMSNormFunction::apply(x, weight, eps);
#endif
  return rms_norm_aten(x, weight, eps);
}

std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& residual, const at::Tensor& x,
                                               const at::Tensor& weight, double eps) {
  check_arguments(x, weight, "add_rms_norm", &residual);
#ifdef HYBRID_CUDA_KERNELS
  if (kernels_take(x) && residual.scalar_type() == at::kFloat) {
    auto hn = AddRMSNormFunction::apply(residual, x, weight, eps);
    return {hn[0], hn[1]};
  }
#endif
  at::Tensor h = residual + x;
  return {h, rms_norm(h, weight, eps)};
}

at::Tensor add_normed(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_arguments(x, weight, "add_normed", &residual);
#ifdef HYBRID_CUDA_KERNELS
  if (kernels_take(x) && residual.scalar_type() == at::kFloat)
    return RMSNormAddFunction::apply(residual, x, weight, eps);
#endif
  return residual + rms_norm(x, weight, eps);
}

}  // namespace hybrid::ops
