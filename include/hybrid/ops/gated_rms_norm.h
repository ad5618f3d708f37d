// The output norm of Gated DeltaNet, per value head (the last dim, D):
//   y = weight * (x * rsqrt(mean(x^2) + eps)) * silu(gate)
// x, gate [..., D] (any float dtypes, gate as x's leading shape), weight [D]. Sums in float32
// (float64 for float64 x); y comes back in x's dtype, the normalised x rounded to x's dtype on
// the way, as transformers' olmo_hybrid does. Differentiable in x, gate and weight. On CUDA with
// D <= 256 one fused kernel does the forward and one the backward (kernels/gated_rms_norm.cu);
// elsewhere ATen ops do.
#pragma once

#include <ATen/core/Tensor.h>

namespace hybrid::ops {

at::Tensor gated_rms_norm(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& weight, double eps);

}  // namespace hybrid::ops
