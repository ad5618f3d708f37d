// The MLP's activation on its fused gate-and-up projection:
//   h = silu(g) u  for gate_up = [g | u], [..., 2 H] -> [..., H]
// in float32 arithmetic (float64 for float64 input), h in gate_up's dtype. Differentiable; its
// gradient comes back as one [..., 2 H] tensor, which the projection's backward reads as it is
// (two groups' gradients would be concatenated first: a pass over 2 H columns a token). On CUDA
// one kernel each way (kernels/swiglu.cu); elsewhere ATen ops.
#pragma once

#include <ATen/core/Tensor.h>

namespace hybrid::ops {

at::Tensor swiglu(const at::Tensor& gate_up);

}  // namespace hybrid::ops
