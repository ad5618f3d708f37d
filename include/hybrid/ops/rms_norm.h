// RMSNorm over the last dim, D:  y = weight * x * rsqrt(mean(x^2) + eps)
// x [..., D] (any float dtype), weight [D]. Sums in float32 (float64 for float64 x); y in x's
// dtype. Differentiable in x and weight. On CUDA with D <= 4096 one fused kernel does the
// forward and one the backward (kernels/rms_norm.cu); elsewhere ATen ops do.
#pragma once

#include <ATen/core/Tensor.h>

namespace hybrid::ops {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace hybrid::ops
