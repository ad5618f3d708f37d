// Gradients of column groups assembled without a concatenation. A fused projection's output y
// [..., W] is split into groups of columns that different ops consume (GDN: q, k and v for the
// conv, the gate for the norm, a and b for the op). Autograd's split would concatenate their
// gradients into y's gradient afterwards, a pass over all of it. Instead an op whose input is
// such a window can allocate its input's gradient as the same window of a buffer of y's width
// (empty_window_like: the gated norm and the conv share one), and y's backward takes that buffer
// over when no other tensor refers to it (buffer_of_windows), copying only the other groups'
// gradients into it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace hybrid::util {

// An uninitialised tensor of x's sizes, laid out like x when x is a window of columns of
// contiguous rows (x.stride(-1) == 1, the leading dims contiguous over rows of W = x.stride(-2) >
// x.size(-1) elements): the same columns of a buffer of such rows, which nothing but the windows
// handed out of it refers to. That buffer is a fresh one for the first window of x's memory, and
// the same one for each later window of other columns of the same rows while the first's is
// alive (GDN: the gate's gradient, then q, k and v's), so that y's backward finds them all in
// place. A contiguous tensor where x is no such window.
at::Tensor empty_window_like(const at::Tensor& x);

// When some windows[i] [..., width_i] is the columns [columns[i], columns[i] + width_i) of
// contiguous rows of sizes.back() elements, in memory that no tensor but the windows refers to,
// each of those in its own columns of the same rows: those rows as one tensor of `sizes`.
// Undefined otherwise. Undefined windows are skipped.
at::Tensor buffer_of_windows(at::TensorList windows, at::IntArrayRef columns, at::IntArrayRef sizes);

}  // namespace hybrid::util
