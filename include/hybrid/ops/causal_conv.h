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

// One decoding step of it: x [B, 1, C] after the K - 1 inputs `kept` [B, K - 1, C] (contiguous, in
// x's dtype; zeros before a sequence's start) -> y [B, 1, C], and `kept` shifted by one in place (x
// appended). On CUDA one kernel where the window's concatenation, the conv over it and the shift
// took three launches (a decoding step launches one a layer); differentiable only off that kernel
// (where grad mode is on and x or weight require it, the ATen path runs).
at::Tensor causal_conv_silu_step(const at::Tensor& x, at::Tensor& kept, const at::Tensor& weight);

}  // namespace hybrid::ops
