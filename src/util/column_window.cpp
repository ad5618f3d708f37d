#include "hybrid/util/column_window.h"

#include <ATen/ATen.h>
#include <c10/util/strides.h>

#include <vector>

namespace hybrid::util {
namespace {

// Whether t's dims before the last are laid out as those of contiguous rows of W elements.
bool rows_of(const at::Tensor& t, int64_t W) {
  int64_t expected = W;
  for (int64_t i = t.dim() - 2; i >= 0; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) return false;
    expected *= t.size(i);
  }
  return true;
}

// A tensor over `storage` that is not a view of another tensor, so that it alone keeps the
// memory once the tensor the storage came from is gone.
at::Tensor over(const at::Storage& storage, const at::TensorOptions& options, int64_t offset, at::IntArrayRef sizes,
                at::IntArrayRef strides) {
  return at::empty({0}, options).set_(storage, offset, sizes, strides);
}

}  // namespace

at::Tensor empty_window_like(const at::Tensor& x) {
  const bool window = x.dim() >= 2 && x.stride(-1) == 1 && x.stride(-2) > x.size(-1) && rows_of(x, x.stride(-2)) &&
                      x.storage_offset() % x.stride(-2) + x.size(-1) <= x.stride(-2);
  if (!window) return at::empty(x.sizes(), x.options());
  const int64_t W = x.stride(-2);
  std::vector<int64_t> rows = x.sizes().vec();
  rows.back() = W;
  const at::Tensor buffer = at::empty(rows, x.options());
  return over(buffer.storage(), x.options(), x.storage_offset() % W, x.sizes(), c10::contiguous_strides(rows));
}

at::Tensor buffer_of_window(const at::Tensor& g, int64_t column, at::IntArrayRef sizes) {
  const int64_t W = sizes.back();
  if (!g.defined() || g.dim() != static_cast<int64_t>(sizes.size()) || g.dim() < 1 || g.stride(-1) != 1 ||
      column < 0 || column + g.size(-1) > W || g.storage_offset() < column || !rows_of(g, W))
    return {};
  for (int64_t i = 0; i + 1 < g.dim(); ++i)
    if (g.size(i) != sizes[i]) return {};
  const int64_t offset = g.storage_offset() - column;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const at::Storage& storage = g.storage();
  if (storage.use_count() != 1 || static_cast<int64_t>(storage.nbytes()) < (offset + numel) * g.element_size())
    return {};
  return over(storage, g.options(), offset, sizes, c10::contiguous_strides(sizes));
}

}  // namespace hybrid::util
