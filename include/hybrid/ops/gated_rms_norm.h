// The output norm of Gated DeltaNet, per value head (the last dim, D):
//   y = weight * (x * rsqrt(mean(x^2) + eps)) * silu(gate)
// x, gate [..., D] (any float dtypes, gate as x's leading shape), weight [D]. Sums in float32
// (float64 for float64 x); y comes back in x's dtype, or in `output` when given (x's or the
// gate's: GDN asks for the gate's, its projection's compute dtype, as the next matmul reads it),
// the normalised x rounded to x's dtype on the way, as transformers' olmo_hybrid does.
// Differentiable in x, gate and weight. On CUDA with
// D <= 256 one fused kernel does the forward and one the backward (kernels/gated_rms_norm.cu);
// elsewhere ATen ops do.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace hybrid::ops {

at::Tensor gated_rms_norm(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& weight, double eps,
                          std::optional<at::ScalarType> output = std::nullopt);

}  // namespace hybrid::ops
