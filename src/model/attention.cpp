#include "hybrid/model/attention.h"

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "hybrid/ops/rope.h"

namespace hybrid {

AttentionImpl::AttentionImpl(const ModelConfig& cfg)
    : n_heads_(cfg.attention.n_heads),
      n_kv_heads_(cfg.attention.n_kv_heads),
      head_dim_(cfg.attention_head_dim()),
      qk_norm_(cfg.attention.qk_norm),
      rope_(cfg.attention.rope),
      rope_theta_(cfg.attention.rope_theta) {
  const int64_t d = cfg.d_model, q_width = n_heads_ * head_dim_, kv_width = n_kv_heads_ * head_dim_;
  q_proj = register_module("q_proj", linear_no_bias(d, q_width));
  k_proj = register_module("k_proj", linear_no_bias(d, kv_width));
  v_proj = register_module("v_proj", linear_no_bias(d, kv_width));
  o_proj = register_module("o_proj", linear_no_bias(q_width, d));
  if (qk_norm_ == "full") {
    q_norm = register_module("q_norm", RMSNorm(q_width, cfg.norm_eps));
    k_norm = register_module("k_norm", RMSNorm(kv_width, cfg.norm_eps));
  } else if (qk_norm_ == "per_head") {
    q_norm = register_module("q_norm", RMSNorm(head_dim_, cfg.norm_eps));
    k_norm = register_module("k_norm", RMSNorm(head_dim_, cfg.norm_eps));
  }
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& positions, const Packing* packing) {
  const int64_t B = x.size(0), T = x.size(1);
  auto qkv = project(x, {{q_proj}, {k_proj}, {v_proj}});
  at::Tensor q = qkv[0], k = qkv[1], v = qkv[2];
  if (qk_norm_ == "full") q = q_norm(q), k = k_norm(k);
  auto heads = [&](const at::Tensor& t, int64_t h) { return t.view({B, T, h, head_dim_}); };
  q = heads(q, n_heads_), k = heads(k, n_kv_heads_), v = heads(v, n_kv_heads_);
  if (qk_norm_ == "per_head") q = q_norm(q), k = k_norm(k);
  if (rope_) std::tie(q, k) = ops::rope(q, k, positions, rope_theta_);
  q = q.transpose(1, 2), k = k.transpose(1, 2), v = v.transpose(1, 2);  // [B, H, T, hd]
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  at::Tensor o;
  if (packing) {
    // Causal and same-document: [B, 1, T, T] boolean mask (true = may attend).
    at::Tensor same_doc = packing->doc_ids.unsqueeze(-1) == packing->doc_ids.unsqueeze(-2);
    at::Tensor causal = at::ones({T, T}, x.options().dtype(at::kBool)).tril();
    at::Tensor mask = (same_doc & causal).unsqueeze(1);
    o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale, n_kv_heads_ != n_heads_);
  } else {
    o = at::scaled_dot_product_attention(q, k, v, {}, 0.0, true, scale, n_kv_heads_ != n_heads_);
  }
  return project(o.transpose(1, 2).reshape({B, T, n_heads_ * head_dim_}), o_proj->weight);
}

}  // namespace hybrid
