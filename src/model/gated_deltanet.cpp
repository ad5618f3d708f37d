#include "hybrid/model/gated_deltanet.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "hybrid/ops/causal_conv.h"
#include "hybrid/ops/delta_rule.h"

namespace hybrid {

CausalConvImpl::CausalConvImpl(int64_t channels, int64_t kernel) {
  weight = register_parameter("weight", at::zeros({channels, 1, kernel}));
}

at::Tensor CausalConvImpl::forward(const at::Tensor& x, const Packing* packing) {
  return ops::causal_conv_silu(x, weight, packing ? packing->pos_in_doc : at::Tensor());
}

GatedDeltaNetImpl::GatedDeltaNetImpl(const ModelConfig& model) : cfg_(model.gdn) {
  const int64_t d = model.d_model, key_dim = cfg_.n_k_heads * cfg_.head_k_dim, value_dim = cfg_.n_v_heads * cfg_.head_v_dim;
  q_proj = register_module("q_proj", Projection(d, key_dim));
  k_proj = register_module("k_proj", Projection(d, key_dim));
  v_proj = register_module("v_proj", Projection(d, value_dim));
  a_proj = register_module("a_proj", Projection(d, cfg_.n_v_heads));
  b_proj = register_module("b_proj", Projection(d, cfg_.n_v_heads));
  g_proj = register_module("g_proj", Projection(d, value_dim));
  o_proj = register_module("o_proj", Projection(value_dim, d));
  conv1d = register_module("conv1d", CausalConv(2 * key_dim + value_dim, cfg_.conv_size));
  A_log = register_parameter("A_log", at::zeros({cfg_.n_v_heads}));
  dt_bias = register_parameter("dt_bias", at::zeros({cfg_.n_v_heads}));
  o_norm = register_module("o_norm", GatedRMSNorm(cfg_.head_v_dim, cfg_.norm_eps));
}

// The conv over x after the inputs `decoding` kept (zeros before the first token, as before a
// document's start); keeps x's last conv_size - 1, in place (the same memory at every step).
at::Tensor GatedDeltaNetImpl::conv_after(const at::Tensor& x, LayerDecodingState& decoding) {
  const int64_t kept = cfg_.conv_size - 1, T = x.size(1);
  if (!decoding.conv_inputs.defined()) decoding.conv_inputs = at::zeros({x.size(0), kept, x.size(2)}, x.options());
  if (T == 1) return ops::causal_conv_silu_step(x, decoding.conv_inputs, conv1d->weight);
  const at::Tensor window = at::cat({decoding.conv_inputs, x}, 1);
  decoding.conv_inputs.copy_(window.narrow(1, T, kept));
  return conv1d(window, nullptr).narrow(1, kept, T);
}

// Documents packed in one row (x [1, S, C], packing's offsets): each one's last conv_size - 1
// inputs, [N, conv_size - 1, C], zeros before a short document's start, as conv_after keeps them
// after that document alone.
at::Tensor GatedDeltaNetImpl::last_inputs_of_documents(const at::Tensor& x, const Packing& packing) const {
  const int64_t kept = cfg_.conv_size - 1, N = packing.cu_seqlens.size(0) - 1;
  const auto offsets = packing.cu_seqlens.accessor<int64_t, 1>();
  at::Tensor last = at::zeros({N, kept, x.size(2)}, x.options());
  for (int64_t d = 0; d < N; ++d) {
    const int64_t held = std::min(kept, offsets[d + 1] - offsets[d]);
    last[d].narrow(0, kept - held, held).copy_(x[0].narrow(0, offsets[d + 1] - held, held));
  }
  return last;
}

at::Tensor GatedDeltaNetImpl::forward(const at::Tensor& x, const Packing* packing, LayerDecodingState* decoding) {
  const int64_t B = x.size(0), T = x.size(1);
  const int64_t value_dim = cfg_.n_v_heads * cfg_.head_v_dim;
  // One matmul for all six input projections; the conv reads q, k and v side by side in place.
  auto projected = project(x, {{q_proj, k_proj, v_proj}, {g_proj}, {a_proj}, {b_proj}});
  // q, k and v stay packed into the op: their gradients come back as one tensor for the conv.
  if (decoding && packing && (decoding->state.defined() || B != 1))
    throw std::invalid_argument("GatedDeltaNet: packed documents (one row) start a decoding state");
  at::Tensor qkv = decoding && !packing ? conv_after(projected[0], *decoding) : conv1d(projected[0], packing);
  if (decoding && packing) decoding->conv_inputs = last_inputs_of_documents(projected[0], *packing);
  const ops::QkvHeads heads{cfg_.n_k_heads, cfg_.head_k_dim, cfg_.n_v_heads, cfg_.head_v_dim};

  // The op normalises q and k, and turns the raw gate and beta inputs into the log-gate
  // -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b) (x 2), all in float32; o comes back
  // in v's dtype (bf16 under autocast, as the op is benchmarked and FLA returns it): a float32 o
  // and its gradient cost four passes of 189 MB a layer at 7b.yaml's width and 8K tokens, for
  // one rounding less at the gated norm's input.
  ops::DeltaRuleArgs args;
  args.qk_l2norm = true;
  args.A_log = A_log;
  args.dt_bias = dt_bias;
  args.beta_from_logit = true;
  args.allow_neg_eigval = cfg_.allow_neg_eigval;
  args.tf32_products = delta_rule_.tf32_products;
  args.keep_intermediates = delta_rule_.keep_intermediates;
  at::Tensor o;
  if (decoding && decoding->state.defined() && T == 1) {
    o = ops::gated_delta_rule_decode_step(qkv, heads, projected[2], projected[3], decoding->state, args);
  } else if (decoding) {
    if (decoding->state.defined()) args.initial_state = decoding->state;
    if (packing) args.cu_seqlens = packing->cu_seqlens;  // a final state a document
    args.output_final_state = true;
    ops::DeltaRuleOutput out = ops::chunk_gated_delta_rule_packed(qkv, heads, projected[2], projected[3], args);
    o = out.o;
    decoding->state = out.final_state.contiguous();  // the step updates it in place
  } else {
    auto flat = [&](const at::Tensor& t) { return packing ? t.flatten(0, 1).unsqueeze(0) : t; };
    if (packing) args.cu_seqlens = packing->cu_seqlens;
    o = ops::chunk_gated_delta_rule_packed(flat(qkv), heads, flat(projected[2]), flat(projected[3]), args).o;
  }
  o = o.view({B, T, cfg_.n_v_heads, cfg_.head_v_dim});

  // The norm writes y in the gate's dtype, the projections' compute dtype, which o_proj reads
  // (no cast pass; its gradient comes back in that dtype too).
  at::Tensor gate = projected[1].view({B, T, cfg_.n_v_heads, cfg_.head_v_dim});
  return project(o_norm(o, gate, gate.scalar_type()).reshape({B, T, value_dim}), o_proj->weight);
}

}  // namespace hybrid
