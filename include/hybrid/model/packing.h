// Where documents start and end inside a batch, for intra-document masking. Built once per
// forward from cu_seqlens over the flattened batch (row ends are always boundaries) and
// shared by every layer: GDN state, the short conv and attention never cross a boundary.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace hybrid {

struct Packing {
  // [N+1] int64 offsets into the flattened B*T tokens, on the host: the delta-rule op plans
  // its chunk layout from them there, and a device copy would make every layer wait.
  at::Tensor cu_seqlens;
  at::Tensor doc_ids;     // [B, T] int64: which document each token belongs to
  at::Tensor pos_in_doc;  // [B, T] int64: position of the token inside its document
  // For attention's variable-length kernel: cu_seqlens as int32 on the device, and the longest
  // document's length (known on the host, so no layer waits for the device).
  at::Tensor cu_seqlens_device;
  int64_t max_doc_len = 0;
};

// From document offsets within the flattened batch (need not include row ends: added here);
// doc_ids and pos_in_doc go to `device`.
Packing make_packing(const at::Tensor& cu_seqlens, int64_t batch, int64_t seq_len, at::Device device);

}  // namespace hybrid
