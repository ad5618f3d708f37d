#include "hybrid/model/packing.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "hybrid/util/host_to_device.h"

namespace hybrid {

Packing make_packing(const at::Tensor& cu_seqlens, int64_t batch, int64_t seq_len, at::Device device) {
  at::Tensor cu = cu_seqlens.to(at::kCPU, at::kLong).contiguous();
  const int64_t total = batch * seq_len;
  std::vector<int64_t> bounds(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
  for (int64_t b = 0; b <= batch; ++b) bounds.push_back(b * seq_len);
  std::sort(bounds.begin(), bounds.end());
  bounds.erase(std::unique(bounds.begin(), bounds.end()), bounds.end());
  if (bounds.front() != 0 || bounds.back() != total)
    throw std::invalid_argument("cu_seqlens must lie within [0, batch * seq_len]");

  std::vector<int64_t> doc(total), pos(total);
  for (size_t d = 0; d + 1 < bounds.size(); ++d)
    for (int64_t t = bounds[d]; t < bounds[d + 1]; ++t) doc[t] = d, pos[t] = t - bounds[d];
  Packing p;
  p.cu_seqlens = at::tensor(bounds, at::kLong);
  p.cu_seqlens_device = util::to_device_async(bounds, device).to(at::kInt);
  for (size_t d = 0; d + 1 < bounds.size(); ++d) p.max_doc_len = std::max(p.max_doc_len, bounds[d + 1] - bounds[d]);
  p.doc_ids = util::to_device_async(doc, device).view({batch, seq_len});
  p.pos_in_doc = util::to_device_async(pos, device).view({batch, seq_len});
  return p;
}

}  // namespace hybrid
