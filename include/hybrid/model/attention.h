// Softmax attention as in OLMo Hybrid: q, k, v, o projections without bias, QK-norm
// (RMSNorm over the full projected width, per head, or none), RoPE with float32 tables
// (or NoPE), grouped KV heads, causal SDPA; with a Packing, no attention across documents.
#pragma once

#include <torch/nn/module.h>

#include "hybrid/config/config.h"
#include "hybrid/model/decoding.h"
#include "hybrid/model/layers.h"
#include "hybrid/model/packing.h"

namespace hybrid {

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const ModelConfig& cfg);
  // x [B, T, d]; positions [B, T]; packing optional. With `decoding` (no packing), x follows the
  // tokens whose keys and values it holds, and its own are appended; with `decoding` and packing,
  // an empty `decoding` takes the packed row's keys and values (split_documents splits them).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& positions, const Packing* packing,
                     LayerDecodingState* decoding = nullptr);

  Projection q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  RMSNorm q_norm{nullptr}, k_norm{nullptr};

 private:
  int64_t n_heads_, n_kv_heads_, head_dim_;
  at::Tensor attend_after(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, LayerDecodingState& decoding,
                          double scale) const;
  at::Tensor attend_at_slot(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, LayerDecodingState& decoding,
                            double scale) const;
  std::string qk_norm_;
  bool rope_;
  double rope_theta_;
};
TORCH_MODULE(Attention);

}  // namespace hybrid
