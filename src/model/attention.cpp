#include "hybrid/model/attention.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

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
  q_proj = register_module("q_proj", Projection(d, q_width));
  k_proj = register_module("k_proj", Projection(d, kv_width));
  v_proj = register_module("v_proj", Projection(d, kv_width));
  o_proj = register_module("o_proj", Projection(q_width, d));
  if (qk_norm_ == "full") {
    q_norm = register_module("q_norm", RMSNorm(q_width, cfg.norm_eps));
    k_norm = register_module("k_norm", RMSNorm(kv_width, cfg.norm_eps));
  } else if (qk_norm_ == "per_head") {
    q_norm = register_module("q_norm", RMSNorm(head_dim_, cfg.norm_eps));
    k_norm = register_module("k_norm", RMSNorm(head_dim_, cfg.norm_eps));
  }
}

namespace {

// Document masking where FlashAttention's variable-length kernel takes the inputs (CUDA, bf16 or
// fp16, head dims up to 256 in multiples of 8): the documents as sequences of their own, O(T)
// memory. Elsewhere a [B, 1, T, T] boolean mask goes to SDPA, which then cannot use its flash
// kernels.
bool varlen_flash_takes(const at::Tensor& q) {
  const int64_t D = q.size(-1);
  return q.is_cuda() && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) && D % 8 == 0 && D <= 256;
}

// q, k, v [B, T, H, D] (k and v with their own head count) -> o [B, T, H, D].
at::Tensor varlen_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Packing& packing,
                        double scale) {
  const int64_t B = q.size(0), T = q.size(1);
  auto tokens = [&](const at::Tensor& t) { return t.reshape({B * T, t.size(2), t.size(3)}); };
  const at::Tensor& cu = packing.cu_seqlens_device;
  auto out = at::_flash_attention_forward(tokens(q), tokens(k), tokens(v), cu, cu, packing.max_doc_len,
                                          packing.max_doc_len, 0.0, /*is_causal=*/true, /*return_debug_mask=*/false,
                                          scale);
  return std::get<0>(out).view(q.sizes());
}

// Writes x [B, T, ...] after the first `held` tokens of cache [B, capacity, ...], growing the
// cache (to at least twice its capacity) where x does not fit.
void append_to_cache(at::Tensor& cache, int64_t held, const at::Tensor& x) {
  const int64_t need = held + x.size(1);
  if (!cache.defined() || cache.size(1) < need) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes[1] = std::max(need, cache.defined() ? 2 * cache.size(1) : need);
    at::Tensor grown = at::empty(sizes, x.options());
    if (held > 0) grown.narrow(1, 0, held).copy_(cache.narrow(1, 0, held));
    cache = grown;
  }
  cache.narrow(1, held, x.size(1)).copy_(x);
}

// While in scope, SDPA does not take cuDNN's attention, which builds (and keeps) an execution
// graph for each shape it meets, a step of tens to hundreds of milliseconds: decoding meets a new
// key length every token. Flash attention (bf16, half) and the memory-efficient kernel (float32)
// take any length as it comes. The switch is the process's (ATen's global context): decoding
// runs on the thread that drives the model, with no training beside it.
class WithoutCudnnAttention {
 public:
  WithoutCudnnAttention() : was_(at::globalContext().userEnabledCuDNNSDP()) {
    at::globalContext().setSDPUseCuDNN(false);
  }
  ~WithoutCudnnAttention() { at::globalContext().setSDPUseCuDNN(was_); }
  WithoutCudnnAttention(const WithoutCudnnAttention&) = delete;
  WithoutCudnnAttention& operator=(const WithoutCudnnAttention&) = delete;

 private:
  bool was_;
};

}  // namespace

// q [B, T, H, D] after the L tokens whose keys and values `decoding` holds: k and v are appended,
// and query i sees keys 0 .. L + i (SDPA's is_causal aligns the mask to the top left, right only
// for L = 0), of stacked rows (decoding.padding) only those from the row's own first slot.
at::Tensor AttentionImpl::attend_after(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       LayerDecodingState& decoding, double scale) const {
  if (decoding.next_slot.defined()) return attend_at_slot(q, k, v, decoding, scale);
  const int64_t L = decoding.cached, T = q.size(1);
  append_to_cache(decoding.keys, L, k);
  append_to_cache(decoding.values, L, v);
  decoding.cached = L + T;
  const at::Tensor qh = q.transpose(1, 2), kh = decoding.keys.narrow(1, 0, L + T).transpose(1, 2),
                   vh = decoding.values.narrow(1, 0, L + T).transpose(1, 2);
  const bool gqa = n_kv_heads_ != n_heads_;
  const WithoutCudnnAttention any_length;
  const bool padded = decoding.padding.defined();
  if (L == 0 && !padded) return at::scaled_dot_product_attention(qh, kh, vh, {}, 0.0, true, scale, gqa).transpose(1, 2);
  std::optional<at::Tensor> mask;  // none for one token of unpadded rows, which sees every key
  if (T > 1 || padded)
    mask = visible_slots(L + T, at::arange(L, L + T, q.options().dtype(at::kLong)), decoding.padding);
  return at::scaled_dot_product_attention(qh, kh, vh, mask, 0.0, false, scale, gqa).transpose(1, 2);
}

// One token a row with fixed shapes (fix_shapes): its keys and values go to slot next_slot of
// caches at full capacity, and it attends over the slots up to that one (of stacked rows, from
// the row's own first slot: decoding.visible, which the model's forward marked for this step):
// the same kernels on the same memory at every step, whatever the slot.
at::Tensor AttentionImpl::attend_at_slot(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         LayerDecodingState& decoding, double scale) const {
  const int64_t capacity = decoding.keys.size(1);
  if (q.size(1) != 1) throw std::invalid_argument("Attention: fixed-shape decoding takes one token a row");
  if (decoding.cached >= capacity)  // (next_slot's host mirror: a slot past the caches is never written)
    throw std::invalid_argument("Attention: the fixed-shape caches' " + std::to_string(capacity) + " slots are full");
  decoding.keys.index_copy_(1, decoding.next_slot, k);
  decoding.values.index_copy_(1, decoding.next_slot, v);
  decoding.cached += 1;
  const WithoutCudnnAttention any_length;
  const at::Tensor o = at::scaled_dot_product_attention(
      q.transpose(1, 2), decoding.keys.transpose(1, 2), decoding.values.transpose(1, 2),
      decoding.visible, 0.0, false, scale, n_kv_heads_ != n_heads_);
  return o.transpose(1, 2);
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& positions, const Packing* packing,
                                  LayerDecodingState* decoding) {
  const int64_t B = x.size(0), T = x.size(1);
  auto qkv = project(x, {{q_proj}, {k_proj}, {v_proj}});
  at::Tensor q = qkv[0], k = qkv[1], v = qkv[2];
  if (qk_norm_ == "full") q = q_norm(q), k = k_norm(k);
  auto heads = [&](const at::Tensor& t, int64_t h) { return t.view({B, T, h, head_dim_}); };
  q = heads(q, n_heads_), k = heads(k, n_kv_heads_), v = heads(v, n_kv_heads_);
  if (qk_norm_ == "per_head") q = q_norm(q), k = k_norm(k);
  if (rope_) std::tie(q, k) = ops::rope(q, k, positions, rope_theta_);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  at::Tensor o;  // [B, T, H, hd]
  if (decoding && packing) {  // documents' prompts packed in one row (split_documents splits them)
    if (decoding->cached != 0) throw std::invalid_argument("Attention: packed documents start a decoding state");
    decoding->keys = k, decoding->values = v, decoding->cached = T;
  }
  if (decoding && !packing) {
    o = attend_after(q, k, v, *decoding, scale);
  } else if (packing && varlen_flash_takes(q)) {
    o = varlen_flash(q, k, v, *packing, scale);
  } else {
    q = q.transpose(1, 2), k = k.transpose(1, 2), v = v.transpose(1, 2);  // [B, H, T, hd]
    const bool gqa = n_kv_heads_ != n_heads_;
    if (packing) {
      // Causal and same-document: [B, 1, T, T] boolean mask (true = may attend).
      at::Tensor same_doc = packing->doc_ids.unsqueeze(-1) == packing->doc_ids.unsqueeze(-2);
      at::Tensor causal = at::ones({T, T}, x.options().dtype(at::kBool)).tril();
      at::Tensor mask = (same_doc & causal).unsqueeze(1);
      o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale, gqa);
    } else {
      o = at::scaled_dot_product_attention(q, k, v, {}, 0.0, true, scale, gqa);
    }
    o = o.transpose(1, 2);
  }
  return project(o.reshape({B, T, n_heads_ * head_dim_}), o_proj->weight);
}

}  // namespace hybrid
