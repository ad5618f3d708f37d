// The hybrid language model: embedding, a stack of blocks (Gated DeltaNet or attention mixer,
// each followed by a SwiGLU MLP), final RMSNorm and LM head. Module and parameter names follow
// HF `olmo_hybrid` (model.layers.N.linear_attn.q_proj.weight, ...), so our model.safetensors
// plus a config.json is a transformers checkpoint.
//
// Norm placement per layer type:
//   pre:  h = x + mixer(input_layernorm(x));           y = h + mlp(post_attention_layernorm(h))
//   post: h = x + post_attention_layernorm(mixer(x));  y = h + post_feedforward_layernorm(mlp(h))
// (released OLMo Hybrid: GDN blocks pre, attention blocks post.)
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include "hybrid/config/config.h"
#include "hybrid/model/attention.h"
#include "hybrid/model/decoding.h"
#include "hybrid/model/gated_deltanet.h"
#include "hybrid/model/layers.h"

namespace hybrid {

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const ModelConfig& cfg, char type);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& positions, const Packing* packing,
                     LayerDecodingState* decoding = nullptr);
  char type() const { return type_; }

 private:
  char type_;
  bool pre_norm_;
  GatedDeltaNet linear_attn_{nullptr};
  Attention self_attn_{nullptr};
  MLP mlp_{nullptr};
  RMSNorm mixer_norm_{nullptr}, mlp_norm_{nullptr};
};
TORCH_MODULE(Block);

class BackboneImpl : public torch::nn::Module {
 public:
  explicit BackboneImpl(const ModelConfig& cfg);
  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(Backbone);

class HybridLMImpl : public torch::nn::Module {
 public:
  explicit HybridLMImpl(const ModelConfig& cfg);
  // input_ids [B, T] int64 -> logits [B, T, vocab]. cu_seqlens (document offsets in the
  // flattened batch) turns on intra-document masking; RoPE positions then restart per document.
  at::Tensor forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& cu_seqlens = std::nullopt);
  // Generation: logits [B, T, vocab] of tokens that follow the ones `decoding` has seen (none at
  // first), every layer going on from what it kept; `decoding` then holds these tokens too. The
  // same logits as a forward over all the tokens at once. No gradients. last_only: the last
  // position's alone, [B, 1, vocab] (a long prompt's whole logits at a 100k vocabulary take GBs).
  at::Tensor forward(const at::Tensor& input_ids, DecodingState& decoding, bool last_only = false);
  // Prompts of different lengths in one forward: documents packed in one row (input_ids [1, S],
  // cu_seqlens their [N + 1] int64 offsets on the host) -> each one's last logits [N, 1, vocab],
  // and in `rows` a decoding state a document, as its own forward alone would have left it
  // (stack_rows then decodes them on together).
  at::Tensor forward_documents(const at::Tensor& input_ids, const at::Tensor& cu_seqlens,
                               std::vector<DecodingState>& rows);
  // Final hidden states [B, T, d] before the LM head.
  at::Tensor hidden_states(const at::Tensor& input_ids, const std::optional<at::Tensor>& cu_seqlens = std::nullopt);
  at::Tensor lm_head_weight();

  // Recompute the first `layers` blocks (-1: all) in the backward instead of keeping their
  // activations.
  void set_activation_checkpointing(bool on, int64_t layers = -1) { checkpointed_layers_ = on ? layers : 0; }
  // How every Gated DeltaNet layer runs the delta rule.
  void set_delta_rule(const DeltaRuleConfig& options);

  // OLMo-style initialisation (see hybrid_lm.cpp), reproducible from the seed.
  void initialize(uint64_t seed);
  const ModelConfig& config() const { return cfg_; }

  Backbone model{nullptr};
  Projection lm_head{nullptr};  // null with tied embeddings

 private:
  // Embedding, blocks and final norm, at `positions` [B, T].
  at::Tensor run_blocks(const at::Tensor& input_ids, const at::Tensor& positions, const Packing* packing,
                        DecodingState* decoding);
  ModelConfig cfg_;
  int64_t checkpointed_layers_ = 0;  // -1: all
};
TORCH_MODULE(HybridLM);

// The initialisation of HybridLM::initialize for any module made of the model's layers (by
// parameter name: a layer or block on its own, as the benchmarks use them).
void initialize_parameters(torch::nn::Module& module, const ModelConfig& cfg, uint64_t seed);

}  // namespace hybrid
