// split_rows: float32 rows as split bf16 rows (split_rows.cu), for the CUDA state pass.
#pragma once

#include <ATen/core/Tensor.h>

namespace hybrid::ops::detail {

// x [..., rows, cols] float32, split by rows into a tensor of the same bytes (contiguous). Read
// in place when x is contiguous or, for C x C matrices, each matrix transposed (x = y.mT() with
// y contiguous); other layouts are made contiguous first.
at::Tensor split_rows(const at::Tensor& x);

// The C x C matrices (C = 64) the state pass reads every chunk step (M, QKG) as it copies them:
// split rows swizzled (bf16_split.cuh's swizzled_word), so that a chunk's matrix in global memory
// is its shared-memory tile byte for byte (ldmatrix reads it without bank conflicts) and one bulk
// copy moves it. int32 of x's shape.
at::Tensor split_chunk_matrices(const at::Tensor& x);

}  // namespace hybrid::ops::detail
