// Gradients of column groups assembled without a concatenation. A fused projection's output y
// [..., W] is split into groups of columns that different ops consume (GDN: q, k and v for the
// conv, the gate for the norm, a and b for the op). Autograd's split would concatenate their
// gradients into y's gradient afterwards, a pass over all of it. Instead an op whose input is
// such a window can allocate its input's gradient as the same window of a fresh buffer of y's
// width (empty_window_like), and y's backward takes that buffer over when no other tensor refers
// to it (buffer_of_window), copying only the other groups' gradients into it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace hybrid::util {

// An uninitialised tensor of x's sizes, laid out like x when x is a window of columns of
// contiguous rows (x.stride(-1) == 1, the leading dims contiguous over rows of W = x.stride(-2) >
// x.size(-1) elements): the same columns of a fresh buffer of such rows, which nothing but the
// result refers to. A contiguous tensor otherwise.
at::Tensor empty_window_like(const at::Tensor& x);

// When g [..., width] is the columns [column, column + width) of contiguous rows of
// sizes.back() elements, in memory that no tensor but g refers to: those rows as one tensor of
// `sizes`. Undefined otherwise.
at::Tensor buffer_of_window(const at::Tensor& g, int64_t column, at::IntArrayRef sizes);

}  // namespace hybrid::util
