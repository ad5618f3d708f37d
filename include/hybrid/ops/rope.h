// Rotary position embedding of attention's queries and keys, in the rotate-half convention of
// HF's Llama and OLMo models: for x [B, T, H, D] (D even, h = D / 2) at positions p [B, T],
//   y[..., i]     = x[..., i] cos(p f_i) - x[..., i + h] sin(p f_i)
//   y[..., i + h] = x[..., i + h] cos(p f_i) + x[..., i] sin(p f_i),    f_i = theta^(-2 i / D)
// for i < h, with f_i and the angles in float32 as HF computes them, the arithmetic in float32
// (float64 for float64 input) and y in x's dtype. q and k go through together (they share the
// angles). Differentiable; the backward is the rotation by -p. On CUDA one kernel each way
// (kernels/rope.cu) that keeps nothing but the positions; elsewhere ATen ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace hybrid::ops {

// q [B, T, Hq, D] and k [B, T, Hk, D] (any strides), positions [B, T] integers on their device.
// Returns the rotated q and k, contiguous, in their dtypes.
std::pair<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                       double theta);

}  // namespace hybrid::ops
