// residual + x w^T with the sum written to a new tensor, for the projections that add their
// product onto the residual stream (project.cpp's linear_onto).
#pragma once

#include <ATen/ATen.h>

namespace hybrid::ops {

// residual [M, N] float32 + x [M, K] w^T (w [N, K]), x and w bf16 or half of one dtype, all
// contiguous on one CUDA device: one cuBLASLt product whose C is the residual and D a new float32
// tensor, the float32 sums added unrounded. ATen's addmm takes C and D as one tensor, so it first
// copies the residual into its result: a pass over [M, N] float32 (60 us a 7b-width block's
// fwd+bwd, 0.77 ms a 1b.yaml step). An undefined tensor where it does not apply (another device,
// dtype or layout, or no CUDA kernels built): the caller's addmm then.
at::Tensor matmul_onto(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w);

}  // namespace hybrid::ops
