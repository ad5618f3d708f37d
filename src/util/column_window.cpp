#include "hybrid/util/column_window.h"

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>
#include <c10/util/strides.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace hybrid::util {
namespace {

// Whether t's dims before the last are laid out as those of contiguous rows of W elements.
bool rows_of(const at::TensorBase& t, int64_t W) {
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

// A buffer empty_window_like handed out windows of, and the columns it handed out, by the memory
// of the tensor whose windows they mirror. Both references weak: an entry serves while that
// tensor's memory and the buffer both live (a weak reference also keeps a StorageImpl's address
// from being reused, so the key cannot name another tensor's memory).
struct Handout {
  c10::weak_intrusive_ptr<c10::StorageImpl> source, buffer;
  int64_t first_row;          // the windows' first row in the source: storage_offset / W
  std::vector<int64_t> rows;  // the buffer's sizes, W last
  at::ScalarType dtype;
  std::vector<std::pair<int64_t, int64_t>> columns;  // [begin, end) of each window handed out
};
struct Handouts {
  std::mutex mutex;  // backward functions run on autograd's threads, one a device
  std::unordered_map<const c10::StorageImpl*, Handout> by_source;
};
Handouts& handouts() {
  static Handouts* h = new Handouts;  // never destroyed: CUDA memory outlives static destructors
  return *h;
}

// The buffer of x's earlier sibling window, when there is one that x's columns fit beside.
at::Storage sibling_buffer(Handout& h, const at::Tensor& x, int64_t first_row, const std::vector<int64_t>& rows,
                           int64_t begin, int64_t end) {
  if (h.first_row != first_row || h.rows != rows || h.dtype != x.scalar_type()) return {};
  for (const auto& [b, e] : h.columns)
    if (begin < e && b < end) return {};  // the same columns twice: two gradients, not one
  c10::intrusive_ptr<c10::StorageImpl> buffer = h.buffer.lock();
  if (!buffer || buffer->device() != x.device()) return {};
  h.columns.emplace_back(begin, end);
  return at::Storage(std::move(buffer));
}

}  // namespace

at::Tensor empty_window_like(const at::Tensor& x) {
  const bool window = x.dim() >= 2 && x.stride(-1) == 1 && x.stride(-2) > x.size(-1) && rows_of(x, x.stride(-2)) &&
                      x.storage_offset() % x.stride(-2) + x.size(-1) <= x.stride(-2);
  if (!window) return at::empty(x.sizes(), x.options());
  const int64_t W = x.stride(-2), column = x.storage_offset() % W, first_row = x.storage_offset() / W;
  std::vector<int64_t> rows = x.sizes().vec();
  rows.back() = W;
  const auto window_of = [&](const at::Storage& buffer) {
    return over(buffer, x.options(), column, x.sizes(), c10::contiguous_strides(rows));
  };
  Handouts& all = handouts();
  std::lock_guard<std::mutex> lock(all.mutex);
  for (auto it = all.by_source.begin(); it != all.by_source.end();)  // forget sources and buffers gone
    it = it->second.source.expired() || it->second.buffer.expired() ? all.by_source.erase(it) : std::next(it);
  const c10::StorageImpl* source = x.storage().unsafeGetStorageImpl();
  auto found = all.by_source.find(source);
  if (found != all.by_source.end()) {
    const at::Storage buffer = sibling_buffer(found->second, x, first_row, rows, column, column + x.size(-1));
    if (buffer) return window_of(buffer);
  }
  const at::Tensor buffer = at::empty(rows, x.options());
  all.by_source.insert_or_assign(source, Handout{x.storage().getWeakStorageImpl(), buffer.storage().getWeakStorageImpl(),
                                                 first_row, rows, x.scalar_type(), {{column, column + x.size(-1)}}});
  return window_of(buffer.storage());
}

at::Tensor buffer_of_windows(at::TensorList windows, at::IntArrayRef columns, at::IntArrayRef sizes) {
  const int64_t W = sizes.back();
  // Whether g is the columns [column, column + g's width) of rows of `sizes` that start `offset`
  // elements into its memory (any offset where offset < 0).
  auto fits = [&](const at::TensorBase& g, int64_t column, int64_t offset) {
    if (!g.defined() || g.dim() != static_cast<int64_t>(sizes.size()) || g.dim() < 1 || g.stride(-1) != 1 ||
        column < 0 || column + g.size(-1) > W || g.storage_offset() < column || !rows_of(g, W))
      return false;
    for (int64_t i = 0; i + 1 < g.dim(); ++i)
      if (g.size(i) != sizes[i]) return false;
    return offset < 0 || g.storage_offset() - column == offset;
  };
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  for (size_t i = 0; i < windows.size(); ++i) {
    const at::Tensor& g = windows[i];
    if (!fits(g, columns[i], -1)) continue;
    const int64_t offset = g.storage_offset() - columns[i];
    const at::Storage& storage = g.storage();
    if (static_cast<int64_t>(storage.nbytes()) < (offset + numel) * g.element_size()) continue;
    // Every tensor on this memory must be one of the windows, each in its own place, or the
    // base a window is a view of (autograd keeps it: GDN's gate gradient comes back through the
    // gate's view as [..., heads, D]) where that base is the same window.
    std::vector<const c10::TensorImpl*> holders;
    auto hold = [&](const at::TensorBase& t) {
      if (std::find(holders.begin(), holders.end(), t.unsafeGetTensorImpl()) == holders.end())
        holders.push_back(t.unsafeGetTensorImpl());
    };
    bool in_place = true;
    for (size_t j = 0; j < windows.size(); ++j) {
      const at::Tensor& w = windows[j];
      if (!w.defined() || w.storage().unsafeGetStorageImpl() != storage.unsafeGetStorageImpl()) continue;
      in_place = in_place && fits(w, columns[j], offset);
      hold(w);
      if (w.is_view() && fits(w._base(), columns[j], offset) && w._base().size(-1) == w.size(-1)) hold(w._base());
    }
    if (in_place && storage.use_count() == holders.size())
      return over(storage, g.options(), offset, sizes, c10::contiguous_strides(sizes));
  }
  return {};
}

}  // namespace hybrid::util
