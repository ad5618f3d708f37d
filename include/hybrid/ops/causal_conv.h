// The short convolution of Gated DeltaNet: a causal depthwise conv along time followed by SiLU,
//   y[b, t, c] = silu( sum_{j=0}^{K-1} w[c, K-1-j] x[b, t-j, c] ),
// where x before the start of the sequence, or before the start of the token's document when
// pos_in_doc is given (term j counts only while j <= pos_in_doc[b, t]), counts as 0.
// Shapes: x [B, T, C]; weight [C, K] or [C, 1, K] (PyTorch's depthwise Conv1d layout);
// pos_in_doc [B, T] int64 or undefined. y comes back in x's dtype, summed in float32 (or float64
// for float64 x). Differentiable in x and weight. On CUDA with K <= 4 a fused kernel does the
// forward and the backward (kernels/causal_conv.cu); elsewhere ATen ops do.
#pragma once

#include <ATen/core/Tensor.h>

namespace hybrid::ops {

at::Tensor causal_conv_silu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pos_in_doc);

}  // namespace hybrid::ops
