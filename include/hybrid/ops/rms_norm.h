// RMSNorm over the last dim, D:  y = weight * x * rsqrt(mean(x^2) + eps)
// x [..., D] (any float dtype), weight [D]. Sums in float32 (float64 for float64 x); y in x's
// dtype, or for float32 x in `output` (bf16 or half) when given: the float32 y cast to it, bit for
// bit, without the float32 y and the cast's pass (a pre-norm block asks for its projections'
// compute dtype, bf16 under autocast, as they read y; y's gradient then comes back in that dtype,
// as it would through the cast). Differentiable in x and weight. On CUDA with D <= 4096 one fused
// kernel does the forward and one the backward (kernels/rms_norm.cu); elsewhere ATen ops do.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

namespace hybrid::ops {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    std::optional<at::ScalarType> output = std::nullopt);

// {h, rms_norm(h, output)} for h = residual + x: a pre-norm block's residual add and its next
// norm. With a float32 residual on CUDA (D <= 4096) one kernel forms both, and the backward adds
// h's gradient from its other uses as it writes the norm's (and writes x's, in x's dtype, beside
// it): the same values and gradients, bit for bit, as the add and rms_norm apart, in fewer
// passes. Elsewhere those two ops.
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& residual, const at::Tensor& x,
                                               const at::Tensor& weight, double eps,
                                               std::optional<at::ScalarType> output = std::nullopt);

// {x, rms_norm(x, output)} for a pre-norm block's input x, which feeds both the block's residual
// add and its first norm: the first is x itself, as that other use, and with float32 x on CUDA
// (D <= 4096) the norm's backward adds that use's gradient to x's as it writes it, where autograd
// would sum the two in a pass of its own: bit for bit x and rms_norm(x, output) apart.
std::pair<at::Tensor, at::Tensor> rms_norm_keeping_input(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                         std::optional<at::ScalarType> output = std::nullopt);

// residual + rms_norm(x): a post-norm block's add of its normalised branch. With a float32
// residual on CUDA (D <= 4096) one kernel writes the sum alone (the norm, in x's dtype, never
// stored) and the backward rounds the norm's gradient to x's dtype as it reads it: bit for bit
// the add and rms_norm apart. Elsewhere those two ops.
at::Tensor add_normed(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace hybrid::ops
