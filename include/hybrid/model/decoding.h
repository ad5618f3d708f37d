// What generation keeps between forward calls, so that each new token costs one step rather
// than a forward over everything before it: a Gated DeltaNet layer's last conv_size - 1 conv
// inputs and its delta-rule state, an attention layer's keys (after RoPE) and values.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace hybrid {

struct LayerDecodingState {
  at::Tensor conv_inputs;  // GDN: [B, conv_size - 1, 2 Hk K + Hv V], the inputs before the conv
  at::Tensor state;        // GDN: [B, Hv, K, V], float32 (float64 for a float64 model)
  at::Tensor keys, values;  // attention: [B, tokens so far, kv heads, head dim]
};

struct DecodingState {
  std::vector<LayerDecodingState> layers;  // one a block, filled by the first forward
  int64_t batch = 0, length = 0;           // sequences; tokens seen, the next token's position
};

}  // namespace hybrid
