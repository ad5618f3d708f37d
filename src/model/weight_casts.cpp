#include "hybrid/model/weight_casts.h"

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <mutex>
#include <unordered_map>
#include <vector>

namespace hybrid {
namespace {

struct Entry {
  std::vector<c10::weak_intrusive_ptr<c10::TensorImpl>> weights;
  std::vector<const void*> data;
  std::vector<int64_t> versions;
  at::ScalarType compute;
  int64_t padding;
  at::Tensor stacked;

  bool holds(at::TensorList ws, at::ScalarType c, int64_t p) const {
    if (c != compute || p != padding || ws.size() != weights.size()) return false;
    for (size_t i = 0; i < ws.size(); ++i)
      if (weights[i].expired() || weights[i]._unsafe_get_target() != ws[i].unsafeGetTensorImpl() ||
          data[i] != ws[i].data_ptr() || versions[i] != static_cast<int64_t>(ws[i]._version()))
        return false;
    return true;
  }
};

// Entries by their first weight (a weight that led two different groups would recast each
// time; no projection does that). Forwards run on the main thread and, recomputing checkpointed
// blocks, on autograd's; hence the lock. Never destroyed: CUDA tensors must not be freed by
// static destructors after the CUDA runtime has gone.
struct Cache {
  std::mutex mutex;
  bool enabled = true;
  std::unordered_map<const c10::TensorImpl*, Entry> entries;
};
Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

at::Tensor stack(at::TensorList weights, at::ScalarType compute, int64_t padding) {
  int64_t rows = padding;
  for (const at::Tensor& w : weights) rows += w.size(0);
  at::Tensor stacked = at::empty({rows, weights[0].size(1)}, weights[0].options().dtype(compute));
  int64_t row = 0;
  for (const at::Tensor& w : weights) {
    stacked.narrow(0, row, w.size(0)).copy_(w);  // the cast, written in place
    row += w.size(0);
  }
  if (padding > 0) stacked.narrow(0, row, padding).zero_();
  return stacked;
}

}  // namespace

at::Tensor weights_in_compute_dtype(at::TensorList weights, at::ScalarType compute, int64_t padding) {
  if (weights.size() == 1 && padding == 0 && weights[0].scalar_type() == compute) return weights[0];
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (!c.enabled || weights[0].scalar_type() == compute) return stack(weights, compute, padding);
  const c10::TensorImpl* key = weights[0].unsafeGetTensorImpl();
  auto found = c.entries.find(key);
  if (found != c.entries.end() && found->second.holds(weights, compute, padding)) return found->second.stacked;
  if (found != c.entries.end()) c.entries.erase(found);  // free the stale copy before casting anew
  for (auto it = c.entries.begin(); it != c.entries.end();)  // and those of weights gone
    it = it->second.weights[0].expired() ? c.entries.erase(it) : std::next(it);
  Entry e;
  for (const at::Tensor& w : weights) {
    e.weights.emplace_back(w.getIntrusivePtr());
    e.data.push_back(w.data_ptr());
    e.versions.push_back(static_cast<int64_t>(w._version()));
  }
  e.compute = compute, e.padding = padding;
  e.stacked = stack(weights, compute, padding);
  return c.entries.emplace(key, std::move(e)).first->second.stacked;
}

std::vector<std::vector<CachedCast>> cached_casts_of(at::TensorList weights) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  std::unordered_map<const c10::TensorImpl*, size_t> index;
  for (size_t i = 0; i < weights.size(); ++i) index.emplace(weights[i].unsafeGetTensorImpl(), i);
  std::vector<std::vector<CachedCast>> casts(weights.size());
  for (auto& [key, e] : c.entries) {
    int64_t row = 0;
    for (const auto& w : e.weights) {
      if (w.expired()) break;
      const c10::TensorImpl* impl = w._unsafe_get_target();
      if (auto found = index.find(impl); found != index.end())
        casts[found->second].push_back({e.stacked, row, impl->size(0)});
      row += impl->size(0);
    }
  }
  return casts;
}

void keep_casts_of(at::TensorList updated) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  std::unordered_map<const c10::TensorImpl*, const at::Tensor*> by_impl;
  for (const at::Tensor& w : updated) by_impl[w.unsafeGetTensorImpl()] = &w;
  for (auto it = c.entries.begin(); it != c.entries.end();) {
    Entry& e = it->second;
    bool keep = true;
    for (size_t i = 0; keep && i < e.weights.size(); ++i) {
      auto found = e.weights[i].expired() ? by_impl.end() : by_impl.find(e.weights[i]._unsafe_get_target());
      keep = found != by_impl.end() && found->second->data_ptr() == e.data[i];
    }
    if (keep)
      for (size_t i = 0; i < e.weights.size(); ++i)
        e.versions[i] = static_cast<int64_t>(by_impl[e.weights[i]._unsafe_get_target()]->_version());
    it = keep ? std::next(it) : c.entries.erase(it);
  }
}

void set_weight_cast_cache(bool enabled) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.enabled = enabled;
  if (!enabled) c.entries.clear();
}

void forget_weight_casts() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.entries.clear();
}

size_t weight_casts_cached() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.entries.size();
}

}  // namespace hybrid
