#include "hybrid/model/hybrid_lm.h"

#include "hybrid/model/activation_checkpoint.h"
#include "hybrid/ops/rms_norm.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <stdexcept>
#include <string>

namespace hybrid {

BlockImpl::BlockImpl(const ModelConfig& cfg, char type) : type_(type) {
  pre_norm_ = (type == 'G' ? cfg.gdn_norm : cfg.attention_norm) == "pre";
  if (type == 'G')
    linear_attn_ = register_module("linear_attn", GatedDeltaNet(cfg));
  else
    self_attn_ = register_module("self_attn", Attention(cfg));
  // HF's names: Llama-style for pre-norm blocks, OLMo2-style for post-norm ones.
  mixer_norm_ = register_module(pre_norm_ ? "input_layernorm" : "post_attention_layernorm", RMSNorm(cfg.d_model, cfg.norm_eps));
  mlp_ = register_module("mlp", MLP(cfg.d_model, cfg.mlp_hidden));
  mlp_norm_ = register_module(pre_norm_ ? "post_attention_layernorm" : "post_feedforward_layernorm",
                              RMSNorm(cfg.d_model, cfg.norm_eps));
}

at::Tensor BlockImpl::forward(const at::Tensor& x, const at::Tensor& positions, const Packing* packing,
                              LayerDecodingState* decoding) {
  auto mixer = [&](const at::Tensor& in) {
    return type_ == 'G' ? linear_attn_(in, packing, decoding) : self_attn_(in, positions, packing, decoding);
  };
  if (pre_norm_) {  // h = x + mixer(norm(x)); h + mlp(norm(h)), the first add and the norm after it in one op
    // The norms' outputs feed projections alone (the mixer's, the MLP's): written in their
    // compute dtype (bf16 under autocast), not in float32 for a cast pass to round the same way
    // (two passes of 189 MB a block's forward at 7b.yaml's width and 8K tokens, and half the
    // bytes of the outputs and their gradients). Their gradients come back rounded to that
    // dtype, as through torch.autocast's cast, where project() gives a float32 input a float32 one.
    // x's two uses (the residual, the first norm) get their gradients summed in the norm's backward.
    const at::ScalarType into = projection_dtype(x);
    auto [residual, normed_x] = ops::rms_norm_keeping_input(x, mixer_norm_->weight, mixer_norm_->eps, into);
    auto [h, normed] = ops::add_rms_norm(residual, mixer(normed_x), mlp_norm_->weight, mlp_norm_->eps, into);
    return mlp_(normed, h);  // h + mlp(normed), the add in the down projection's matmul
  }
  at::Tensor h = ops::add_normed(x, mixer(x), mixer_norm_->weight, mixer_norm_->eps);  // x + norm(mixer(x))
  return ops::add_normed(h, mlp_(h), mlp_norm_->weight, mlp_norm_->eps);
}

BackboneImpl::BackboneImpl(const ModelConfig& cfg) {
  embed_tokens = register_module("embed_tokens", Embedding(cfg.vocab_size, cfg.d_model));
  layers = register_module("layers", torch::nn::ModuleList());
  for (char t : cfg.layer_types()) layers->push_back(Block(cfg, t));
  norm = register_module("norm", RMSNorm(cfg.d_model, cfg.norm_eps));
}

HybridLMImpl::HybridLMImpl(const ModelConfig& cfg) : cfg_(cfg) {
  model = register_module("model", Backbone(cfg));
  if (!cfg.tie_embeddings) lm_head = register_module("lm_head", Projection(cfg.d_model, cfg.vocab_size));
}

at::Tensor HybridLMImpl::lm_head_weight() { return lm_head ? lm_head->weight : model->embed_tokens->weight; }

at::Tensor HybridLMImpl::hidden_states(const at::Tensor& input_ids, const std::optional<at::Tensor>& cu_seqlens) {
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  std::optional<Packing> packing;
  at::Tensor positions;
  if (cu_seqlens) {
    packing = make_packing(*cu_seqlens, B, T, input_ids.device());
    positions = packing->pos_in_doc;  // RoPE positions restart in each document
  } else {
    positions = at::arange(T, input_ids.options().dtype(at::kLong)).unsqueeze(0).expand({B, T});
  }
  return run_blocks(input_ids, positions, packing ? &*packing : nullptr, nullptr);
}

at::Tensor HybridLMImpl::forward(const at::Tensor& input_ids, DecodingState& decoding, bool last_only) {
  at::NoGradGuard no_grad;
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  if (T == 0) throw std::invalid_argument("HybridLM::forward: no tokens to go on with");
  if (decoding.length == 0) {
    decoding.layers.assign(model->layers->size(), LayerDecodingState{});
    decoding.batch = B;
  } else if (B != decoding.batch) {
    throw std::invalid_argument("HybridLM::forward: " + std::to_string(B) + " sequences continue a decoding state of " +
                                std::to_string(decoding.batch));
  }
  const bool fixed = decoding.next_slot.defined();  // fix_shapes: one token, positions on the device
  if (fixed && T != 1) throw std::invalid_argument("HybridLM::forward: fixed-shape decoding takes one token a row");
  at::Tensor positions;
  if (fixed) {
    if (decoding.visible.defined()) {  // the attention caches' next slot, seen from this step on
      if (decoding.length >= decoding.visible.size(-1))
        throw std::invalid_argument("HybridLM::forward: the fixed-shape caches' " +
                                    std::to_string(decoding.visible.size(-1)) + " slots are full");
      decoding.visible.index_fill_(-1, decoding.next_slot, true);
    }
    positions = decoding.next_positions.unsqueeze(1);
  } else {
    positions = at::arange(decoding.length, decoding.length + T, input_ids.options().dtype(at::kLong))
                    .unsqueeze(0)
                    .expand({B, T});
    if (decoding.padding.defined()) positions = positions - decoding.padding.unsqueeze(1);  // stacked rows
  }
  at::Tensor hidden = run_blocks(input_ids, positions, nullptr, &decoding);
  if (last_only) hidden = hidden.narrow(1, T - 1, 1);
  at::Tensor logits = project(hidden, lm_head_weight());
  if (fixed) decoding.next_slot.add_(1), decoding.next_positions.add_(1);
  decoding.length += T;
  return logits;
}

at::Tensor HybridLMImpl::forward_documents(const at::Tensor& input_ids, const at::Tensor& cu_seqlens,
                                           std::vector<DecodingState>& rows) {
  at::NoGradGuard no_grad;
  if (input_ids.dim() != 2 || input_ids.size(0) != 1 || input_ids.size(1) == 0)
    throw std::invalid_argument("HybridLM::forward_documents: the documents packed in one row [1, S]");
  const Packing packing = make_packing(cu_seqlens, 1, input_ids.size(1), input_ids.device());
  if (packing.cu_seqlens.sizes() != cu_seqlens.sizes())  // make_packing drops empty documents
    throw std::invalid_argument("HybridLM::forward_documents: cu_seqlens must cover the row, no document empty");
  DecodingState packed;
  packed.layers.assign(model->layers->size(), LayerDecodingState{});
  packed.batch = 1;
  at::Tensor hidden = run_blocks(input_ids, packing.pos_in_doc, &packing, &packed);  // positions restart
  const at::Tensor last = packing.cu_seqlens.narrow(0, 1, packing.cu_seqlens.size(0) - 1) - 1;
  hidden = hidden[0].index_select(0, last.to(hidden.device())).unsqueeze(1);  // [N, 1, d]
  rows = split_documents(packed, packing.cu_seqlens);
  return project(hidden, lm_head_weight());
}

at::Tensor HybridLMImpl::run_blocks(const at::Tensor& input_ids, const at::Tensor& positions, const Packing* p,
                                    DecodingState* decoding) {
  at::Tensor h = model->embed_tokens(input_ids);
  const int64_t n_layers = static_cast<int64_t>(model->layers->size());
  const int64_t checkpointed =
      !at::GradMode::is_enabled() ? 0 : (checkpointed_layers_ < 0 ? n_layers : checkpointed_layers_);
  const std::string types = cfg_.layer_types();
  for (int64_t i = 0; i < n_layers; ++i) {
    // A profiler trace's scope for the block's forward ops (hybrid-train --profile-steps); the
    // name is formed only while a trace records.
    RECORD_USER_SCOPE("block " + std::to_string(i) + (types[i] == 'G' ? " (GDN)" : " (attention)"));
    BlockImpl* block = (*model->layers)[i]->as<Block>();
    LayerDecodingState* kept = decoding ? &decoding->layers[i] : nullptr;
    h = i < checkpointed ? checkpointed_block(*block, h, positions, p) : block->forward(h, positions, p, kept);
  }
  return model->norm(h);
}

at::Tensor HybridLMImpl::forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& cu_seqlens) {
  return project(hidden_states(input_ids, cu_seqlens), lm_head_weight());
}

void HybridLMImpl::set_delta_rule(const DeltaRuleConfig& options) {
  for (const auto& m : modules())
    if (auto* gdn = dynamic_cast<GatedDeltaNetImpl*>(m.get())) gdn->set_delta_rule(options);
}

// OLMo-style: weights ~ N(0, init_std) truncated at 3 std; the projections that write into
// the residual stream (attention/GDN o_proj, MLP down_proj) scaled by 1/sqrt(2 n_layers);
// norms 1; GDN A_log = log U(0, 16) (as HF: uniform in [a_log_min, a_log_max] = [0, 16]) and
// dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 0.1] floored at 1e-4; the depthwise
// conv uniform in +-1/sqrt(kernel) like torch's Conv1d default.
void HybridLMImpl::initialize(uint64_t seed) { initialize_parameters(*this, cfg_, seed); }

void initialize_parameters(torch::nn::Module& module, const ModelConfig& cfg, uint64_t seed) {
  at::NoGradGuard no_grad;
  at::manual_seed(seed);
  const double std = cfg.init_std, out_std = std / std::sqrt(2.0 * cfg.n_layers);
  auto trunc_normal = [](at::Tensor& w, double s) { w.normal_(0, s).clamp_(-3 * s, 3 * s); };
  for (auto& item : module.named_parameters()) {
    const std::string& name = item.key();
    at::Tensor& p = item.value();
    auto ends_with = [&](const std::string& suffix) {
      return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (ends_with("A_log")) {
      p.uniform_(0, 16).log_();
    } else if (ends_with("dt_bias")) {
      at::Tensor dt = (at::rand_like(p) * (std::log(0.1) - std::log(1e-3)) + std::log(1e-3)).exp().clamp_min(1e-4);
      p.copy_(dt + at::log(-at::expm1(-dt)));
    } else if (ends_with("conv1d.weight")) {
      double bound = 1.0 / std::sqrt(static_cast<double>(p.size(2)));
      p.uniform_(-bound, bound);
    } else if (ends_with("norm.weight") || ends_with("layernorm.weight")) {
      p.fill_(1.0);
    } else if (ends_with("o_proj.weight") || ends_with("down_proj.weight")) {
      trunc_normal(p, out_std);
    } else {
      trunc_normal(p, std);
    }
  }
}

}  // namespace hybrid
