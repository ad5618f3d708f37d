#include "hybrid/model/decoding.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace hybrid {
namespace {

// Where a state's tensors are (its first layer's: a GDN state or attention keys).
at::Device device_of(const DecodingState& state) {
  const LayerDecodingState& any = state.layers[0];
  return any.state.defined() ? any.state.device() : any.keys.device();
}

}  // namespace

DecodingState stack_rows(const std::vector<DecodingState>& rows) {
  if (rows.empty()) throw std::invalid_argument("stack_rows: no rows");
  DecodingState out;
  out.batch = static_cast<int64_t>(rows.size());
  for (const DecodingState& row : rows) {
    if (row.batch != 1 || row.layers.size() != rows[0].layers.size() || row.padding.defined())
      throw std::invalid_argument("stack_rows: each row must be one sequence's state of the same model, not stacked");
    out.length = std::max(out.length, row.length);
  }
  std::vector<int64_t> padding;
  for (const DecodingState& row : rows) padding.push_back(out.length - row.length);
  out.padding = at::tensor(padding, at::kLong).to(device_of(rows[0]));
  auto stacked = [&](size_t i, at::Tensor LayerDecodingState::*part) {
    std::vector<at::Tensor> parts;
    for (const DecodingState& row : rows) parts.push_back(row.layers[i].*part);
    return at::cat(parts, 0);
  };
  for (size_t i = 0; i < rows[0].layers.size(); ++i) {
    LayerDecodingState layer;
    if (rows[0].layers[i].state.defined()) {  // Gated DeltaNet
      layer.state = stacked(i, &LayerDecodingState::state);
      layer.conv_inputs = stacked(i, &LayerDecodingState::conv_inputs);
    } else {  // attention: row b's keys and values in slots padding[b] .. length - 1
      auto right_aligned = [&](at::Tensor LayerDecodingState::*part) {
        std::vector<int64_t> sizes = (rows[0].layers[i].*part).sizes().vec();
        sizes[0] = out.batch, sizes[1] = out.length;
        at::Tensor all = at::zeros(sizes, (rows[0].layers[i].*part).options());
        for (int64_t b = 0; b < out.batch; ++b) {
          const int64_t held = rows[b].layers[i].cached;
          all[b].narrow(0, padding[b], held).copy_((rows[b].layers[i].*part)[0].narrow(0, 0, held));
        }
        return all;
      };
      layer.keys = right_aligned(&LayerDecodingState::keys);
      layer.values = right_aligned(&LayerDecodingState::values);
      layer.cached = out.length;
      layer.padding = out.padding;
    }
    out.layers.push_back(std::move(layer));
  }
  return out;
}

at::Tensor visible_slots(int64_t slots, const at::Tensor& query_slots, const at::Tensor& padding) {
  const at::Tensor s = at::arange(slots, query_slots.options()).unsqueeze(0);
  at::Tensor seen = s <= query_slots.unsqueeze(-1);
  if (padding.defined()) seen = (seen.unsqueeze(0) & (s.unsqueeze(0) >= padding.view({-1, 1, 1}))).unsqueeze(1);
  return seen;
}

std::vector<DecodingState> split_documents(const DecodingState& packed, const at::Tensor& cu_seqlens) {
  if (packed.batch != 1 || packed.padding.defined() || packed.next_slot.defined())
    throw std::invalid_argument("split_documents: the state of one packed row, not stacked or fixed");
  const auto offsets = cu_seqlens.accessor<int64_t, 1>();
  std::vector<DecodingState> rows(cu_seqlens.size(0) - 1);
  for (size_t d = 0; d < rows.size(); ++d) {
    const int64_t start = offsets[d], length = offsets[d + 1] - offsets[d];
    rows[d].batch = 1, rows[d].length = length;
    for (const LayerDecodingState& whole : packed.layers) {
      LayerDecodingState layer;
      if (whole.state.defined()) {  // Gated DeltaNet: a document's conv inputs and final state
        layer.state = whole.state.narrow(0, d, 1);
        layer.conv_inputs = whole.conv_inputs.narrow(0, d, 1);
      } else {  // attention: its keys and values
        layer.keys = whole.keys.narrow(1, start, length);
        layer.values = whole.values.narrow(1, start, length);
        layer.cached = length;
      }
      rows[d].layers.push_back(std::move(layer));
    }
  }
  return rows;
}

void fix_shapes(DecodingState& state, int64_t capacity) {
  if (state.length == 0 || state.layers.empty())
    throw std::invalid_argument("fix_shapes: the state has seen no tokens yet (its first forward makes its layers)");
  if (capacity < state.length + 1)
    throw std::invalid_argument("fix_shapes: capacity " + std::to_string(capacity) + " leaves no slot past the " +
                                std::to_string(state.length) + " held");
  for (LayerDecodingState& layer : state.layers) {
    if (layer.state.defined()) continue;  // Gated DeltaNet: fixed already (its step updates it in place)
    for (at::Tensor* cache : {&layer.keys, &layer.values}) {
      std::vector<int64_t> sizes = cache->sizes().vec();
      sizes[1] = capacity;
      at::Tensor fixed = at::zeros(sizes, cache->options());
      fixed.narrow(1, 0, layer.cached).copy_(cache->narrow(1, 0, layer.cached));
      *cache = fixed;
    }
  }
  const auto on = at::TensorOptions().dtype(at::kLong).device(device_of(state));
  state.next_slot = at::full({1}, state.length, on);
  state.next_positions = at::full({state.batch}, state.length, on);
  if (state.padding.defined()) state.next_positions -= state.padding;
  // The slots held so far, those up to the last token's (of each row, from its first on); each
  // step's forward marks the next.
  const auto attention = [](const LayerDecodingState& layer) { return !layer.state.defined(); };
  if (std::any_of(state.layers.begin(), state.layers.end(), attention))
    state.visible = visible_slots(capacity, state.next_slot - 1, state.padding);
  for (LayerDecodingState& layer : state.layers)
    if (attention(layer)) layer.next_slot = state.next_slot, layer.visible = state.visible;
}

}  // namespace hybrid
