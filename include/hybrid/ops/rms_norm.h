// RMSNorm over the last dim, D:  y = weight * x * rsqrt(mean(x^2) + eps)
// x [..., D] (any float dtype), weight [D]. Sums in float32 (float64 for float64 x); y in x's
// dtype. Differentiable in x and weight. On CUDA with D <= 4096 one fused kernel does the
// forward and one the backward (kernels/rms_norm.cu); elsewhere ATen ops do.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace hybrid::ops {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// {h, rms_norm(h)} for h = residual + x: a pre-norm block's residual add and its next norm. With
// a float32 residual on CUDA (D <= 4096) one kernel forms both, and the backward adds h's
// gradient from its other uses as it writes the norm's: the same values and gradients, bit for
// bit, as the add and rms_norm apart, in fewer passes. Elsewhere those two ops.
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& residual, const at::Tensor& x,
                                               const at::Tensor& weight, double eps);

// residual + rms_norm(x): a post-norm block's add of its normalised branch. With a float32
// residual on CUDA (D <= 4096) one kernel writes the sum alone (the norm, in x's dtype, never
// stored) and the backward rounds the norm's gradient to x's dtype as it reads it: bit for bit
// the add and rms_norm apart. Elsewhere those two ops.
at::Tensor add_normed(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace hybrid::ops
