#include "hybrid/ops/rms_norm.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

namespace hybrid::ops {

#ifdef HYBRID_CUDA_KERNELS
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& w, double eps, at::ScalarType y_dtype);
std::pair<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& residual, const at::Tensor& x,
                                                    const at::Tensor& w, double eps, at::ScalarType y_dtype);
at::Tensor rms_norm_add_cuda(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& x, const at::Tensor& w,
                                                                      const at::Tensor& dy, double eps,
                                                                      const at::Tensor& dsum,
                                                                      at::ScalarType copy_dtype);
#endif

namespace {

// Left to autograd: the CPU path, and the float64 reference of the kernels.
at::Tensor rms_norm_aten(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType output) {
  at::Tensor xa = x.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor normed = xa * at::rsqrt(xa.pow(2).mean(-1, true) + eps);
  return (weight * normed).to(output);
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

// The backward kernel over the saved rows and float32 weight, dy shaped like the rows (dsum and
// copy_dtype as rms_norm_backward_cuda takes them); {dx, dw in the weight's own dtype, dx's copy}.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(AutogradContext* ctx, const at::Tensor& rows,
                                                             const at::Tensor& w, const at::Tensor& dy,
                                                             const at::Tensor& dsum,
                                                             std::optional<at::ScalarType> copy_dtype = std::nullopt) {
  auto [dx, dw, dx_copy] = rms_norm_backward_cuda(rows, w, dy.reshape(rows.sizes()).contiguous(),
                                                  ctx->saved_data["eps"].toDouble(), dsum,
                                                  copy_dtype.value_or(rows.scalar_type()));
  return {dx, dw.to(static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt())), dx_copy};
}

// Keeps x's rows and the weight for the backward (r is recomputed there), where autograd over
// the ATen path keeps float32 copies of the rows.
struct RMSNormFunction : torch::autograd::Function<RMSNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps,
                            at::ScalarType output) {
    const at::Tensor xr = kernel_rows(x), w = keep_settings(ctx, weight, eps);
    ctx->save_for_backward({xr, w});
    return rms_norm_cuda(xr, w, eps, output).view(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [dx, dw, none] = norm_backward(ctx, saved[0], saved[1], grads[0], at::Tensor());
    return {dx.view(grads[0].sizes()), dw, at::Tensor(), at::Tensor()};
  }
};

// {x, norm(x)} (x float32): x returned as it is for its other use (a pre-norm block's residual
// add), so that the backward, given that use's gradient, adds it to the norm's as it writes x's
// (the kernel's dsum) where autograd would sum the two in a pass of its own.
struct RMSNormKeepingInputFunction : torch::autograd::Function<RMSNormKeepingInputFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps,
                               at::ScalarType output) {
    const at::Tensor xr = kernel_rows(x), w = keep_settings(ctx, weight, eps);
    ctx->save_for_backward({xr, w});
    ctx->set_materialize_grads(false);
    return {x, rms_norm_cuda(xr, w, eps, output).view(x.sizes())};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor &dkept = grads[0], &dn = grads[1];
    if (!dn.defined()) return {dkept, at::Tensor(), at::Tensor(), at::Tensor()};
    auto saved = ctx->get_saved_variables();
    const at::Tensor dsum = dkept.defined() ? dkept.reshape(saved[0].sizes()).contiguous() : at::Tensor();
    auto [dx, dw, none] = norm_backward(ctx, saved[0], saved[1], dn, dsum);
    return {dx.view(dn.sizes()), dw, at::Tensor(), at::Tensor()};
  }
};

// h = residual + x (float32) and n = norm(h) (in `output`) in one kernel; h is kept for the backward.
// Backward: h's gradient is dh (from h's own uses) plus the norm's, summed as the norm's is
// written, and it is both inputs' gradient, x's rounded to x's dtype (bf16 or half) by the same
// kernel as a second copy, where autograd's cast for the add would take a pass of its own.
struct AddRMSNormFunction : torch::autograd::Function<AddRMSNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& residual, const at::Tensor& x,
                               const at::Tensor& weight, double eps, at::ScalarType output) {
    const at::Tensor w = keep_settings(ctx, weight, eps);
    auto [h, n] = add_rms_norm_cuda(residual.reshape({-1, x.size(-1)}).contiguous(), kernel_rows(x), w, eps, output);
    ctx->save_for_backward({h, w});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->set_materialize_grads(false);
    return {h.view(residual.sizes()), n.view(residual.sizes())};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &dh = grads[0], &dn = grads[1];
    if (!dn.defined()) return {dh, dh, at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor dsum = dh.defined() ? dh.reshape(h.sizes()).contiguous() : at::Tensor();
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const bool copy = dsum.defined() && (x_dtype == at::kBFloat16 || x_dtype == at::kHalf);
    auto [dx, dw, dx_copy] = norm_backward(ctx, h, saved[1], dn, dsum, copy ? std::optional(x_dtype) : std::nullopt);
    at::Tensor d = dx.view(dn.sizes());
    return {d, copy ? dx_copy.view(dn.sizes()) : d, dw, at::Tensor(), at::Tensor()};
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
    auto [dx, dw, none] = norm_backward(ctx, saved[0], saved[1], dh, at::Tensor());
    return {dh, dx.view(dh.sizes()), dw, at::Tensor()};
  }
};
#endif

// residual, where given: added to x, so of x's shape and device. output, where given: the
// normalised values' dtype (x's, or the residual sum's), or bf16 or half for float32 values.
void check_arguments(const at::Tensor& x, const at::Tensor& weight, const char* op,
                     const at::Tensor* residual = nullptr, std::optional<at::ScalarType> output = std::nullopt) {
  const at::ScalarType values = residual ? at::result_type(*residual, x) : x.scalar_type();
  const bool low = output == at::kBFloat16 || output == at::kHalf;
  if (output && *output != values && !(values == at::kFloat && low))
    throw std::invalid_argument(std::string(op) + ": the output dtype must be x's, or bf16 or half for float32 x");
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

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, std::optional<at::ScalarType> output) {
  check_arguments(x, weight, "rms_norm", nullptr, output);
  const at::ScalarType y_dtype = output.value_or(x.scalar_type());
#ifdef HYBRID_CUDA_KERNELS
  if (kernels_take(x)) return RMSNormFunction::apply(x, weight, eps, y_dtype);
#endif
  return rms_norm_aten(x, weight, eps, y_dtype);
}

std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& residual, const at::Tensor& x,
                                               const at::Tensor& weight, double eps,
                                               std::optional<at::ScalarType> output) {
  check_arguments(x, weight, "add_rms_norm", &residual, output);
#ifdef HYBRID_CUDA_KERNELS
  const at::ScalarType n_dtype = output.value_or(at::kFloat);
  if (kernels_take(x) && residual.scalar_type() == at::kFloat) {
    auto hn = AddRMSNormFunction::apply(residual, x, weight, eps, n_dtype);
    return {hn[0], hn[1]};
  }
#endif
  at::Tensor h = residual + x;
  return {h, rms_norm(h, weight, eps, output)};
}

std::pair<at::Tensor, at::Tensor> rms_norm_keeping_input(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                         std::optional<at::ScalarType> output) {
  check_arguments(x, weight, "rms_norm_keeping_input", nullptr, output);
#ifdef HYBRID_CUDA_KERNELS
  const at::ScalarType y_dtype = output.value_or(x.scalar_type());
  if (kernels_take(x) && x.scalar_type() == at::kFloat) {
    auto kept = RMSNormKeepingInputFunction::apply(x, weight, eps, y_dtype);
    return {kept[0], kept[1]};
  }
#endif
  return {x, rms_norm(x, weight, eps, output)};
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
