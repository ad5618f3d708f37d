// split_rows: float32 rows as split bf16 rows (split_rows.cu), for the CUDA state pass.
#pragma once

#include <ATen/core/Tensor.h>

namespace hybrid::ops::detail {

// x [..., rows, cols] float32, split by rows into a tensor of the same bytes (contiguous). Read
// in place when x is contiguous or, for C x C matrices, each matrix transposed (x = y.mT() with
// y contiguous); other layouts are made contiguous first.
at::Tensor split_rows(const at::Tensor& x);

}  // namespace hybrid::ops::detail
