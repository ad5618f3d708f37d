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
  // Attention: [B, capacity, kv heads, head dim], of which the first `cached` tokens are held;
  // the capacity doubles when it runs out, so that n tokens decoded one at a time copy O(n)
  // keys, where a concatenation a token copied O(n^2).
  at::Tensor keys, values;
  int64_t cached = 0;
};

struct DecodingState {
  std::vector<LayerDecodingState> layers;  // one a block, filled by the first forward
  int64_t batch = 0, length = 0;           // sequences; tokens seen, the next token's position
};

}  // namespace hybrid
