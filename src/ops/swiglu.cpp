#include "hybrid/ops/swiglu.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>

namespace hybrid::ops {

#ifdef HYBRID_CUDA_KERNELS
at::Tensor swiglu_cuda(const at::Tensor& gate_up);
at::Tensor swiglu_backward_cuda(const at::Tensor& gate_up, const at::Tensor& dh);
#endif

namespace {

// Left to autograd: the CPU path and the float64 reference of the kernels.
at::Tensor swiglu_aten(const at::Tensor& gate_up) {
  const int64_t H = gate_up.size(-1) / 2;
  const auto acc = gate_up.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return (at::silu(gate_up.narrow(-1, 0, H).to(acc)) * gate_up.narrow(-1, H, H).to(acc)).to(gate_up.scalar_type());
}

#ifdef HYBRID_CUDA_KERNELS
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Keeps only gate_up (the sigmoid is recomputed in the backward), where autograd over the ATen
// path keeps silu(g) besides it.
struct SwiGLUFunction : torch::autograd::Function<SwiGLUFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate_up) {
    const at::Tensor x = gate_up.contiguous();
    ctx->save_for_backward({x});
    return swiglu_cuda(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    return {swiglu_backward_cuda(x, grads[0].to(x.scalar_type()).contiguous())};
  }
};
#endif

}  // namespace

at::Tensor swiglu(const at::Tensor& gate_up) {
  if (gate_up.dim() < 1 || gate_up.size(-1) % 2 != 0)
    throw std::invalid_argument("swiglu: the last dim must hold g and u side by side (an even size)");
#ifdef HYBRID_CUDA_KERNELS
  if (gate_up.is_cuda() && gate_up.scalar_type() != at::kDouble && gate_up.numel() > 0)
    return SwiGLUFunction::apply(gate_up);
#endif
  return swiglu_aten(gate_up);
}

}  // namespace hybrid::ops
