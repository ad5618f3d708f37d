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
  // Attention of rows decoded apart and stacked (stack_rows): [B] int64, how many of a row's first
  // slots are padding before its keys (masked out); undefined where no row has any.
  at::Tensor padding;
  // Attention with fixed shapes (fix_shapes): DecodingState::next_slot and ::visible, shared.
  at::Tensor next_slot, visible;
};

struct DecodingState {
  std::vector<LayerDecodingState> layers;  // one a block, filled by the first forward
  int64_t batch = 0, length = 0;           // sequences; tokens seen (stacked rows: slots), the next position
  at::Tensor padding;  // stacked rows: [B] int64, row b's next position is length - padding[b]
  // Fixed shapes (fix_shapes), for one-token steps that a CUDA graph can replay: what moves from
  // step to step lives on the device and is advanced there. next_slot: [1] int64, the attention
  // caches' slot the next token's keys go to (= length); next_positions: [B] int64, each row's.
  at::Tensor next_slot, next_positions;
  // With attention layers: the key slots the next token sees, bool [1, capacity] (of stacked rows
  // [B, 1, 1, capacity]: from each row's first slot on), as SDPA takes the mask. Every attention
  // layer reads it; a step's forward first marks next_slot in it (one launch a step, where each
  // layer formed the mask from next_slot and the padding in two to four).
  at::Tensor visible;
};

// Which key slots each query sees: slot s for the query in slot p where s <= p, and of stacked
// rows (padding: [B] int64, stack_rows) only from the row's own first slot on. query_slots: [T]
// int64 on the device; the mask is [T, slots], or with padding [B, 1, T, slots] (SDPA's boolean
// mask: true may attend).
at::Tensor visible_slots(int64_t slots, const at::Tensor& query_slots, const at::Tensor& padding);

// Gives a state after its first forward fixed shapes for one-token steps up to `capacity` slots
// in all: every attention layer's keys and values at that capacity (the slots past `length` zero,
// masked until written), the next slot, positions and visible slots on the device. Each one-token
// forward then writes its keys at next_slot, attends over every slot up to it, and advances them
// in place, so that every step runs the same kernels on the same memory. The same values as
// without.
void fix_shapes(DecodingState& state, int64_t capacity);

// Rows that went through the model apart (a DecodingState each, batch 1, of any lengths) as one
// batch that decodes on from where each stopped: the GDN layers' states and conv inputs stacked,
// the attention layers' keys and values right-aligned at the longest row's length (the slots
// before a shorter row's keys are padding, masked out). Each row's tokens then go on as they would
// have alone (the same values on the CPU; on a GPU up to the kernels' rounding).
DecodingState stack_rows(const std::vector<DecodingState>& rows);

// A state after one forward over documents packed in one row (HybridLM::forward_documents;
// cu_seqlens: their [N + 1] int64 offsets on the host) as N states of batch 1, each what that
// document's forward alone would have left. Views of the packed state's memory (each document's
// own, contiguous: the one-token steps may update them in place); stack_rows copies them.
std::vector<DecodingState> split_documents(const DecodingState& packed, const at::Tensor& cu_seqlens);

}  // namespace hybrid
