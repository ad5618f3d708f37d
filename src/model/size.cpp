#include "hybrid/model/size.h"

#include <fmt/format.h>

#include <algorithm>

#include "hybrid/ops/delta_rule_memory.h"

namespace hybrid {
namespace {

constexpr int64_t kChunk = 64;  // the delta-rule chunk length the FLOP count assumes

int64_t count_type(const std::string& types, char t) {
  return std::count(types.begin(), types.end(), t);
}

// The projections' widths: attention's query and key/value, GDN's key and value.
struct Widths {
  int64_t q, kv, key, value;
};
Widths widths_of(const ModelConfig& m) {
  const int64_t hd = m.attention_head_dim();
  return {m.attention.n_heads * hd, m.attention.n_kv_heads * hd, m.gdn.n_k_heads * m.gdn.head_k_dim,
          m.gdn.n_v_heads * m.gdn.head_v_dim};
}

}  // namespace

ParameterCount count_parameters(const ModelConfig& m) {
  const int64_t d = m.d_model;
  const std::string types = m.layer_types();
  const int64_t n_attn = count_type(types, 'A'), n_gdn = count_type(types, 'G');
  const int64_t mlp = 3 * d * m.mlp_hidden;
  const int64_t block_norms = 2 * d;

  const Widths w = widths_of(m);
  const int64_t attn_proj = d * w.q + 2 * d * w.kv + w.q * d;
  const std::string& qk_norm_kind = m.attention.qk_norm;
  const int64_t qk_norm = qk_norm_kind == "full" ? w.q + w.kv : qk_norm_kind == "per_head" ? 2 * m.attention_head_dim() : 0;

  const auto& g = m.gdn;
  const int64_t gdn_proj = 2 * d * w.key + 3 * d * w.value;  // q, k, v, g(ate), o
  const int64_t gdn_small = 2 * d * g.n_v_heads                  // a, b projections
                            + (2 * w.key + w.value) * g.conv_size  // depthwise conv
                            + 2 * g.n_v_heads + g.head_v_dim;      // A_log, dt_bias, o_norm

  ParameterCount c;
  const int64_t embed = m.vocab_size * d;
  c.parts = {
      {"embedding", embed},
      {"attention projections", n_attn * attn_proj},
      {"attention qk-norm", n_attn * qk_norm},
      {"gdn projections (q,k,v,gate,o)", n_gdn * gdn_proj},
      {"gdn a/b proj, conv, A_log, dt_bias, o_norm", n_gdn * gdn_small},
      {"mlp", (n_attn + n_gdn) * mlp},
      {"block norms", (n_attn + n_gdn) * block_norms},
      {"final norm", d},
      {"lm head", m.tie_embeddings ? 0 : embed},
  };
  for (const auto& [name, n] : c.parts) c.total += n;
  for (const auto& [rows, cols] : block_matrix_shapes(m)) c.block_matrices += rows * cols;
  c.matmul = c.block_matrices + embed;  // the LM head's product (tied or not)
  return c;
}

std::vector<std::pair<int64_t, int64_t>> block_matrix_shapes(const ModelConfig& m) {
  const int64_t d = m.d_model, v_heads = m.gdn.n_v_heads;
  const Widths w = widths_of(m);
  std::vector<std::pair<int64_t, int64_t>> shapes;  // [out, in], as the weights are stored
  for (const char type : m.layer_types()) {
    if (type == 'A') shapes.insert(shapes.end(), {{w.q, d}, {w.kv, d}, {w.kv, d}, {d, w.q}});
    else  // q, k, v, a, b, g(ate), o
      shapes.insert(shapes.end(), {{w.key, d}, {w.key, d}, {w.value, d}, {v_heads, d}, {v_heads, d}, {w.value, d}, {d, w.value}});
    shapes.insert(shapes.end(), {{m.mlp_hidden, d}, {m.mlp_hidden, d}, {d, m.mlp_hidden}});
  }
  return shapes;
}

double muon_flops_per_step(const Config& cfg) {
  double flops = 0;
  for (const auto& [rows, cols] : block_matrix_shapes(cfg.model)) {
    const double s = static_cast<double>(std::min(rows, cols)), l = static_cast<double>(std::max(rows, cols));
    flops += 4 * s * s * l + 2 * s * s * s;  // X X^T, A A, B X on the short side
  }
  return static_cast<double>(cfg.optimizer.muon.ns_steps) * flops;
}

double optimizer_state_floats(const Config& cfg) {
  const ParameterCount c = count_parameters(cfg.model);
  return 2.0 * static_cast<double>(c.total) - (cfg.optimizer.type == "muon" ? static_cast<double>(c.block_matrices) : 0.0);
}

FlopsPerToken training_flops_per_token(const ModelConfig& m, int64_t seq_len) {
  const std::string types = m.layer_types();
  const double n_attn = count_type(types, 'A'), n_gdn = count_type(types, 'G');
  FlopsPerToken f;
  // Forward 2 FLOPs per multiply-add, backward twice the forward.
  f.matmul = 6.0 * count_parameters(m).matmul;
  // Causal attention: token t attends to (t+1) keys; QK^T and PV each 2 * keys * width.
  const double avg_keys = (seq_len + 1) / 2.0;
  const double q_width = m.attention.n_heads * m.attention_head_dim();
  f.attention = n_attn * 3.0 * (2 * 2 * avg_keys * q_width);
  // Chunked delta rule per value head and token (chunk C): state terms Q S, K S, K^T V' (6 K V),
  // intra-chunk Q K^T, K K^T, A (beta K) (6 C K), A (beta V) and the masked P V' (4 C V);
  // the depthwise conv 2 * conv_size per channel.
  const auto& g = m.gdn;
  const double K = g.head_k_dim, V = g.head_v_dim, C = std::min<int64_t>(kChunk, seq_len);
  const double per_head = 6 * K * V + 6 * C * K + 4 * C * V;
  const double conv = 2.0 * g.conv_size * (2 * g.n_k_heads * K + g.n_v_heads * V);
  f.gdn = n_gdn * 3.0 * (g.n_v_heads * per_head + conv);
  return f;
}

MemoryEstimate estimate_memory(const Config& cfg, int64_t world_size) {
  const ModelConfig& m = cfg.model;
  const double n = static_cast<double>(count_parameters(m).total);
  const double w = static_cast<double>(std::max<int64_t>(world_size, 1));
  const int zero = static_cast<int>(cfg.distributed.zero_stage);
  const bool cuda = cfg.trainer.device != "cpu";
  const bool bf16 = cfg.trainer.precision == "bf16" || (cfg.trainer.precision == "auto" && cuda);
  const double act_bytes = bf16 ? 2 : 4;

  MemoryEstimate e;
  e.parts.emplace_back("fp32 master weights", 4 * n);
  // ZeRO-2 reduces every micro batch: a rank keeps its own gradients plus a few buckets'
  // (GradSync: the one filling and kInFlight = 2 travelling).
  const double bucket = static_cast<double>(cfg.distributed.bucket_bytes());
  const double gradients = zero >= 2 && w > 1 ? 4 * n / w + 3 * bucket : 4 * n;
  e.parts.emplace_back("fp32 gradients", gradients);
  e.parts.emplace_back(cfg.optimizer.type == "muon" ? "AdamW moments, Muon momentum (fp32)" : "AdamW moments (fp32)",
                       4 * optimizer_state_floats(cfg) / (zero >= 1 ? w : 1));
  if (bf16 && cfg.trainer.cache_weight_casts)
    e.parts.emplace_back("bf16 weight casts (trainer.cache_weight_casts)", 2.0 * count_parameters(m).matmul);

  // Bytes a token that a block keeps for its backward, by block type: the residual stream (block
  // inputs, h) in float32 whatever the precision, the rest in the activation dtype (bf16 under
  // autocast). Counted for the norm placements of 7b.yaml (GDN pre-norm, attention post-norm; the
  // other placement keeps about as much). 1b.yaml GGGA at 4 x 4096 tokens without checkpointing
  // (forty-fourth session, docs/benchmarks.md): estimated 62.0 GiB against 59.6 allocated.
  const double d = m.d_model, ffn = m.mlp_hidden, stream = 4;
  const auto& g = m.gdn;
  const double key_dim = g.n_k_heads * g.head_k_dim, value_dim = g.n_v_heads * g.head_v_dim;
  // MLP: gate_up (SwiGLU's input) and its output (down_proj's input).
  const double mlp_bytes = act_bytes * 3 * ffn;
  // GDN: x and h; both norms' outputs (the projections' inputs); the fused projection's output
  // (the conv reads q, k, v and the gated norm the gate as windows of it, so all of it stays);
  // the conv's output (q and k for the op); the keys by value head that the state pass takes; o
  // and the gated norm's output.
  const double gdn_bytes = stream * 2 * d + mlp_bytes +
                           act_bytes * (2 * d + (2 * key_dim + 2 * value_dim) + (2 * key_dim + value_dim) +
                                        g.n_v_heads * g.head_k_dim + 2 * value_dim);
  // Attention: its projection's and the MLP's inputs, each branch's output (the post-norms'
  // inputs), q, k, v as projected (the QK norms' inputs), q and k as normed and rotated, and the
  // attention output (o_proj's input).
  const double q_width = m.attention.n_heads * m.attention_head_dim();
  const double kv_width = m.attention.n_kv_heads * m.attention_head_dim();
  const double attn_bytes = mlp_bytes + act_bytes * (4 * d + (q_width + 2 * kv_width) + (q_width + kv_width) + q_width);
  const double tokens = static_cast<double>(cfg.trainer.micro_batch_size) * cfg.data.seq_len;
  // The delta rule's intermediates a token (states entering each chunk, W, V', diag(gamma) Q, four
  // C x C terms, three gates; the first three in bf16 where the CUDA kernels keep them so): kept
  // by every GDN layer (trainer.delta_rule.keep_intermediates), or recomputed by one layer at a
  // time in the backward.
  const double delta_bytes =
      g.n_v_heads * ops::delta_rule_kept_bytes(g.head_k_dim, g.head_v_dim, cuda && bf16, cfg.trainer.delta_rule.tf32_products);
  // Checkpointed blocks (the first trainer.checkpointed_layers) keep only their input and are
  // recomputed one at a time in the backward; the others keep everything.
  const std::string types = m.layer_types();
  const int64_t n_layers = static_cast<int64_t>(types.size());
  const int64_t limit = cfg.trainer.checkpointed_layers;
  const int64_t checkpointed = cfg.trainer.activation_checkpointing ? (limit < 0 ? n_layers : limit) : 0;
  double largest_recomputed = 0, largest_block = 0, kept_per_token = 0, kept_gdn = 0;
  for (int64_t i = 0; i < n_layers; ++i) {
    const bool gdn = types[i] == 'G';
    const double block = gdn ? gdn_bytes : attn_bytes;
    largest_block = std::max(largest_block, block + (gdn ? delta_bytes : 0.0));
    if (i < checkpointed)
      largest_recomputed = std::max(largest_recomputed, block + (gdn ? delta_bytes : 0.0));
    else
      kept_per_token += block, kept_gdn += gdn;
  }
  const double kept_activations = tokens * kept_per_token;
  const double kept_delta =
      tokens * delta_bytes * (cfg.trainer.delta_rule.keep_intermediates ? kept_gdn : std::min(kept_gdn, 1.0));
  // The logits at activation precision, their gradient written over them (train/loss.h); on CPU
  // the loss adds about three float32 blocks of 1024 positions, on CUDA its kernels none.
  const double logits = (act_bytes * tokens + (cuda ? 0 : 3 * 4 * 1024)) * m.vocab_size;
  double activations = 0;  // the parts below, alive at the loss (or in the backward, where larger)
  auto add_activations = [&](const char* name, double bytes) {
    e.parts.emplace_back(name, bytes);
    activations += bytes;
  };
  if (checkpointed == n_layers) {
    // At the loss no block is being recomputed; in the backward one is, once the logits and their
    // gradient are gone: it counts only for what it holds beyond them.
    add_activations("activations (checkpointed block inputs)", tokens * stream * checkpointed * d);
    const double beyond_logits = tokens * largest_recomputed - logits;
    if (beyond_logits > 0) add_activations("activations (a recomputed block, beyond the logits)", beyond_logits);
  } else if (checkpointed == 0) {
    add_activations("activations", kept_activations);
    add_activations("delta-rule intermediates", kept_delta);
  } else {
    // The backward is done with the kept blocks (the later ones) before it recomputes the
    // first: the peak holds either the kept activations or one recomputed block.
    add_activations("activations (checkpointed block inputs)", tokens * stream * checkpointed * d);
    add_activations("activations (kept blocks, or one recomputed)",
                    std::max(kept_activations + kept_delta, tokens * largest_recomputed));
  }
  e.parts.emplace_back("logits (their gradient written over them), loss blocks", logits);
  // With one micro batch a rank a step the gradients (none after every step) are written during
  // the backward, after the loss: the peak is then the larger of the loss's (activations,
  // logits) and the backward's end (gradients, about one block's activations), not their sum.
  // With accumulation the earlier micro batches' gradients are there throughout. (1b.yaml at one
  // micro batch, forty-fourth session: 28.7 GiB allocated against 28.7 estimated with
  // checkpointing, 59.6 against 62.0 without.)
  const double micro_batches = static_cast<double>(cfg.trainer.global_batch_size) /
                               static_cast<double>(std::max<int64_t>(cfg.trainer.micro_batch_size, 1) * w);
  if (micro_batches <= 1) {
    const double loss_phase = activations + logits;
    const double end_phase = gradients + tokens * largest_block;
    e.parts.emplace_back("not alive together (one micro batch a step)",
                         std::max(loss_phase, end_phase) - loss_phase - gradients);
  }
  for (const auto& [name, b] : e.parts) e.total += b;
  return e;
}

std::string muon_cost(const Config& cfg, int64_t world_size) {
  const bool split = cfg.distributed.zero_stage > 0;
  const double rank_ns = muon_flops_per_step(cfg) / (split ? static_cast<double>(world_size) : 1.0);
  const double tokens = static_cast<double>(cfg.trainer.global_batch_size * cfg.data.seq_len);
  const double rank_training =
      tokens * training_flops_per_token(cfg.model, cfg.data.seq_len).total() / static_cast<double>(world_size);
  const std::string where = world_size == 1 ? ""
                           : split          ? fmt::format(", a rank's share of {}", world_size)
                                            : " on every rank (ZeRO stage 0; stage 1 or 2 splits them)";
  return fmt::format("muon: Newton-Schulz ({} iterations, products in {}) {:.3g} FLOPs a step{}: {:.1f}% of the rank's "
                     "training FLOPs a step",
                     cfg.optimizer.muon.ns_steps, cfg.optimizer.muon.ns_dtype, rank_ns, where, 100 * rank_ns / rank_training);
}

}  // namespace hybrid
