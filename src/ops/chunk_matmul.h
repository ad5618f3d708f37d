// Batched products of chunk-layout matrices, [H, NC, R, C] x [H, NC, C, N] (either operand may be
// a transposed view of a contiguous tensor, as mT gives).
//
// tf32: on CUDA float32, cuBLAS on TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32): float32
// storage and accumulation, operands rounded to 10 mantissa bits, about 4e-4 relative error per
// product where float32 CUDA-core GEMMs give 1e-7. Only for products whose errors do not
// compound: the state recurrence itself runs on operands split into two bf16 (16 significant
// bits) with a float32 state (kernels/delta_state_pass.cu).
// Otherwise at::matmul.
#pragma once

#include <ATen/ATen.h>

namespace hybrid::ops::detail {

// The transposed view of a batch of matrices (no copy; chunk_matmul reads it as such).
inline at::Tensor mT(const at::Tensor& x) { return x.transpose(-1, -2); }

// alpha a b; with `into` (contiguous, of the product's shape and dtype), into += alpha a b in
// place and returned, so sums of products need no separate passes over memory.
at::Tensor chunk_matmul(const at::Tensor& a, const at::Tensor& b, bool tf32, double alpha = 1,
                        const at::Tensor& into = {});

}  // namespace hybrid::ops::detail
