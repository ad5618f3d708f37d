#include "hybrid/ops/causal_conv.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

#include "argument_check.h"

namespace hybrid::ops {

#ifdef HYBRID_CUDA_KERNELS
at::Tensor causal_conv_silu_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& pos_in_doc);
std::pair<at::Tensor, at::Tensor> causal_conv_silu_backward_cuda(const at::Tensor& x, const at::Tensor& w,
                                                                 const at::Tensor& pos_in_doc, const at::Tensor& dy);
at::Tensor causal_conv_silu_step_cuda(const at::Tensor& x, at::Tensor& kept, const at::Tensor& w);
#endif

namespace {

// Sum of shifted copies, left to autograd: the float64 reference of the kernel, and the path on
// the CPU. Shift j reads x[t-j] with tap K-1-j; a document mask zeroes the taps that would reach
// into the previous document.
at::Tensor causal_conv_silu_aten(const at::Tensor& x, const at::Tensor& w, const at::Tensor& pos_in_doc) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t K = w.size(1), T = x.size(1);
  at::Tensor xa = x.to(acc), wa = w.to(acc);
  at::Tensor z = xa * wa.select(1, K - 1);
  for (int64_t j = 1; j < K && j < T; ++j) {
    at::Tensor shifted = at::constant_pad_nd(xa, {0, 0, j, 0}).narrow(1, 0, T);
    if (pos_in_doc.defined()) shifted = shifted * (pos_in_doc >= j).unsqueeze(-1).to(acc);
    z = z + shifted * wa.select(1, K - 1 - j);
  }
  return at::silu(z).to(x.scalar_type());
}

#ifdef HYBRID_CUDA_KERNELS
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The fused kernels keep only x for the backward (z is recomputed there), where autograd over
// the ATen path keeps every shifted copy. The positions travel outside the tensor arguments:
// autograd's apply cannot take an undefined tensor, which stands for "no documents".
struct Positions {
  at::Tensor pos_in_doc;
};

struct CausalConvSilu : torch::autograd::Function<CausalConvSilu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const Positions& p) {
    // A column slice (channels contiguous) is read in place, not copied.
    at::Tensor xc = x.stride(2) == 1 ? x : x.contiguous(), wc = w.to(at::kFloat).contiguous();
    ctx->save_for_backward({xc, wc});
    if (p.pos_in_doc.defined()) ctx->saved_data["pos_in_doc"] = p.pos_in_doc;
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(w.scalar_type());
    return causal_conv_silu_cuda(xc, wc, p.pos_in_doc);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor pos = ctx->saved_data.count("pos_in_doc") ? ctx->saved_data["pos_in_doc"].toTensor() : at::Tensor();
    auto [dx, dw] = causal_conv_silu_backward_cuda(saved[0], saved[1], pos, grads[0].contiguous());
    const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    return {dx, dw.to(weight_dtype), at::Tensor()};
  }
};
#endif

}  // namespace

at::Tensor causal_conv_silu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pos_in_doc) {
  const detail::ArgumentCheck check{"causal_conv_silu"};
  check(x.dim() == 3, "x must be [B, T, C]");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  check((weight.dim() == 2 || (weight.dim() == 3 && weight.size(1) == 1)) && weight.size(0) == C && weight.size(-1) >= 1,
        "weight must be [C, K] or [C, 1, K] with C = x.size(2) = " + std::to_string(C));
  check(!pos_in_doc.defined() || (pos_in_doc.sizes() == at::IntArrayRef({B, T}) && pos_in_doc.scalar_type() == at::kLong),
        "pos_in_doc must be [B, T] int64");
  check(weight.device() == x.device() && (!pos_in_doc.defined() || pos_in_doc.device() == x.device()),
        "weight and pos_in_doc must be on x's device");
  at::Tensor w = weight.reshape({C, weight.size(-1)});
#ifdef HYBRID_CUDA_KERNELS
  if (x.is_cuda() && x.scalar_type() != at::kDouble && w.size(1) <= 4 && x.numel() > 0)
    return CausalConvSilu::apply(x, w, Positions{pos_in_doc.defined() ? pos_in_doc.contiguous() : pos_in_doc});
#endif
  return causal_conv_silu_aten(x, w, pos_in_doc);
}

at::Tensor causal_conv_silu_step(const at::Tensor& x, at::Tensor& kept, const at::Tensor& weight) {
  const detail::ArgumentCheck check{"causal_conv_silu_step"};
  check(x.dim() == 3 && x.size(1) == 1, "x must be [B, 1, C]");
  const int64_t B = x.size(0), C = x.size(2);
  check((weight.dim() == 2 || (weight.dim() == 3 && weight.size(1) == 1)) && weight.size(0) == C && weight.size(-1) >= 1,
        "weight must be [C, K] or [C, 1, K] with C = x.size(2) = " + std::to_string(C));
  const int64_t K = weight.size(-1);
  check(kept.sizes() == at::IntArrayRef({B, K - 1, C}) && kept.is_contiguous() && kept.scalar_type() == x.scalar_type(),
        "kept must be contiguous [B, K - 1, C] = [" + std::to_string(B) + ", " + std::to_string(K - 1) + ", " +
            std::to_string(C) + "] in x's dtype");
  check(weight.device() == x.device() && kept.device() == x.device(), "weight and kept must be on x's device");
  const at::Tensor w = weight.reshape({C, K});
#ifdef HYBRID_CUDA_KERNELS
  const bool differentiable = c10::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad());
  if (x.is_cuda() && x.scalar_type() != at::kDouble && !differentiable && x.stride(2) == 1)
    return causal_conv_silu_step_cuda(x, kept, w.to(at::kFloat).contiguous());
#endif
  const at::Tensor window = at::cat({kept, x}, 1);
  kept.copy_(window.narrow(1, 1, K - 1));
  return causal_conv_silu(window, w, at::Tensor()).narrow(1, K - 1, 1);
}

}  // namespace hybrid::ops
