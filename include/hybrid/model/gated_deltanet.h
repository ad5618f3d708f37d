// The Gated DeltaNet mixer exactly as OLMo Hybrid (HF `olmo_hybrid`):
//   q, k, v = proj(x);  [q k v] = silu(causal depthwise conv([q k v]))  (kernel conv_size, no bias)
//   q, k L2-normalised per head (float32);  beta = sigmoid(b_proj x) (x2 with allow_neg_eigval)
//   g = -exp(A_log) * softplus(a_proj x + dt_bias)  (float32)
//   o = delta_rule(q, k, v, g, beta);  y = o_proj(GatedRMSNorm(o, g_proj x))  (norm per value head)
#pragma once

#include <torch/nn/module.h>

#include "hybrid/config/config.h"
#include "hybrid/model/decoding.h"
#include "hybrid/model/layers.h"
#include "hybrid/model/packing.h"

namespace hybrid {

// The short convolution with its SiLU. Holds the depthwise conv weight [channels, 1, kernel]
// under HF's name `conv1d.weight`.
class CausalConvImpl : public torch::nn::Module {
 public:
  CausalConvImpl(int64_t channels, int64_t kernel);
  // x [B, T, C] -> silu(conv(x)) [B, T, C] (ops::causal_conv_silu): out_t = silu(sum_i w[k-1-i] x_{t-i}),
  // x before a document start counts as 0.
  at::Tensor forward(const at::Tensor& x, const Packing* packing);
  at::Tensor weight;
};
TORCH_MODULE(CausalConv);

class GatedDeltaNetImpl : public torch::nn::Module {
 public:
  explicit GatedDeltaNetImpl(const ModelConfig& cfg);
  // With `decoding` (no packing), x follows the tokens whose conv inputs and state it holds, and
  // leaves them updated: one token runs the decoding step, more the chunked op from the state.
  // With `decoding` and packing, an empty `decoding` takes each packed document's conv inputs and
  // final state, [N documents, ...] (split_documents makes them a state a document).
  at::Tensor forward(const at::Tensor& x, const Packing* packing, LayerDecodingState* decoding = nullptr);
  void set_delta_rule(const DeltaRuleConfig& options) { delta_rule_ = options; }

  Projection q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, a_proj{nullptr}, b_proj{nullptr},
      g_proj{nullptr}, o_proj{nullptr};
  CausalConv conv1d{nullptr};
  at::Tensor A_log, dt_bias;
  GatedRMSNorm o_norm{nullptr};

 private:
  at::Tensor conv_after(const at::Tensor& x, LayerDecodingState& decoding);
  at::Tensor last_inputs_of_documents(const at::Tensor& x, const Packing& packing) const;
  GDNConfig cfg_;
  DeltaRuleConfig delta_rule_;
};
TORCH_MODULE(GatedDeltaNet);

}  // namespace hybrid
