// Typed configuration. YAML (with `base:` inheritance and --set overrides) is read once,
// at the edge, into these structs; nothing downstream looks values up by string.
//
// Each struct lists its fields once, in visit(): the same list drives reading (with
// unknown-key and type errors), writing the resolved YAML, and --print-config.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace hybrid {

struct AttentionConfig {
  int64_t n_heads = 4;
  int64_t n_kv_heads = 4;  // GQA when fewer than n_heads; head_dim = d_model / n_heads
  std::string qk_norm = "full";  // full (RMSNorm over the projected width, OLMo) | per_head | none
  bool rope = true;              // false = NoPE
  double rope_theta = 500000.0;
  template <class V> void visit(V& v) {
    v("n_heads", n_heads); v("n_kv_heads", n_kv_heads);
    v("qk_norm", qk_norm, {"full", "per_head", "none"}); v("rope", rope); v("rope_theta", rope_theta);
  }
};

struct GDNConfig {
  int64_t n_k_heads = 4;
  int64_t n_v_heads = 4;  // GVA when a multiple (>1) of n_k_heads
  int64_t head_k_dim = 24;
  int64_t head_v_dim = 48;
  int64_t conv_size = 4;
  bool allow_neg_eigval = true;  // beta = 2 * sigmoid(b), eigenvalues of (I - beta k k^T) in (-1, 1]
  double norm_eps = 1e-5;        // per-head gated RMSNorm
  template <class V> void visit(V& v) {
    v("n_k_heads", n_k_heads); v("n_v_heads", n_v_heads); v("head_k_dim", head_k_dim);
    v("head_v_dim", head_v_dim); v("conv_size", conv_size); v("allow_neg_eigval", allow_neg_eigval);
    v("norm_eps", norm_eps);
  }
};

struct ModelConfig {
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t vocab_size = 512;
  // A string of G (Gated DeltaNet) and A (attention) repeated to n_layers, e.g. "GGGA";
  // or, when `layers` is non-empty, one letter per layer given explicitly.
  std::string layer_pattern = "GGGA";
  std::vector<std::string> layers;
  int64_t mlp_hidden = 352;
  double norm_eps = 1e-6;
  bool tie_embeddings = false;
  // Norm placement per layer type: pre (x + f(norm(x))) or post (x + norm(f(x)), OLMo's reordered).
  std::string gdn_norm = "pre";
  std::string attention_norm = "post";
  double init_std = 0.02;
  int64_t max_seq_len = 8192;
  AttentionConfig attention;
  GDNConfig gdn;
  template <class V> void visit(V& v) {
    v("d_model", d_model); v("n_layers", n_layers); v("vocab_size", vocab_size);
    v("layer_pattern", layer_pattern); v("layers", layers); v("mlp_hidden", mlp_hidden);
    v("norm_eps", norm_eps); v("tie_embeddings", tie_embeddings);
    v("gdn_norm", gdn_norm, {"pre", "post"}); v("attention_norm", attention_norm, {"pre", "post"});
    v("init_std", init_std); v("max_seq_len", max_seq_len);
    v("attention", attention); v("gdn", gdn);
  }
  // The resolved per-layer types, 'G' or 'A', n_layers long.
  std::string layer_types() const;
  int64_t attention_head_dim() const { return d_model / attention.n_heads; }
};

struct DataSourceConfig {
  std::string name;                // a validation set's label in metrics.jsonl
  std::vector<std::string> paths;  // files or globs
  std::string format = "auto";     // auto | raw | npy | megatron
  std::string dtype = "auto";      // raw files: uint16 | uint32 (auto: from metadata.json or vocab size)
  double weight = 1.0;             // relative share in a mixture
  template <class V> void visit(V& v) {
    v("name", name); v("paths", paths); v("format", format, {"auto", "raw", "npy", "megatron"});
    v("dtype", dtype, {"auto", "uint16", "uint32"}); v("weight", weight);
  }
};

// A multiple-choice task (scripts/prepare_task.py) scored at every evaluation.
struct ChoiceTaskConfig {
  std::string name;   // in metrics.jsonl and the sweep summary
  std::string path;   // the task file
  int64_t limit = 0;  // its first N items (0: all)
  template <class V> void visit(V& v) { v("name", name); v("path", path); v("limit", limit); }
};

// OLMo's instance filter: an instance holding a run of max_count or more repeats of some
// min_period..max_period tokens (degenerate text: logs, tables, "aaaa...") is left out of the loss,
// which OLMo 2 found to prevent loss spikes.
struct InstanceFilterConfig {
  bool enabled = false;
  int64_t min_period = 1, max_period = 13, max_count = 32;
  template <class V> void visit(V& v) {
    v("enabled", enabled); v("min_period", min_period); v("max_period", max_period); v("max_count", max_count);
  }
};

struct DataConfig {
  std::vector<DataSourceConfig> sources;
  // Validation sets (one map is a list of one), each scored at every evaluation; the first is the
  // run's val_loss. A set without paths is skipped.
  std::vector<DataSourceConfig> validation;
  std::vector<ChoiceTaskConfig> tasks;
  int64_t seq_len = 256;
  int64_t eos_id = -1;  // -1: from metadata.json
  bool document_masking = false;
  int64_t seed = 1234;
  int64_t prefetch = 4;
  InstanceFilterConfig instance_filter;
  template <class V> void visit(V& v) {
    v("sources", sources); v("validation", validation); v("tasks", tasks); v("seq_len", seq_len); v("eos_id", eos_id);
    v("document_masking", document_masking); v("seed", seed); v("prefetch", prefetch); v("instance_filter", instance_filter);
  }
};

// Muon (optimizer.type: muon) for the blocks' matrices: momentum, then the update orthogonalized
// by Newton-Schulz iterations, scaled to AdamW's update RMS (0.2 sqrt(max(rows, cols))) so that
// one optimizer.lr serves both; AdamW for the rest. The iterations' products in bfloat16 (tensor
// cores, as Muon's reference implementations run them) or float32 (CUDA cores on GPUs: no TF32).
struct MuonConfig {
  double momentum = 0.95;
  bool nesterov = true;
  int64_t ns_steps = 5;
  std::string ns_dtype = "bfloat16";  // bfloat16 | float32
  template <class V> void visit(V& v) {
    v("momentum", momentum); v("nesterov", nesterov); v("ns_steps", ns_steps);
    v("ns_dtype", ns_dtype, {"bfloat16", "float32"});
  }
};

struct OptimizerConfig {
  std::string type = "adamw";  // adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
  MuonConfig muon;
  double lr = 3e-4;
  std::vector<double> betas = {0.9, 0.95};
  double eps = 1e-8;
  double weight_decay = 0.1;
  bool decay_embeddings = false;
  bool decay_norms = false;
  bool decay_gdn_params = false;  // A_log, dt_bias
  template <class V> void visit(V& v) {
    v("type", type, {"adamw", "muon"}); v("muon", muon);
    v("lr", lr); v("betas", betas); v("eps", eps); v("weight_decay", weight_decay);
    v("decay_embeddings", decay_embeddings); v("decay_norms", decay_norms);
    v("decay_gdn_params", decay_gdn_params);
  }
};

struct ScheduleConfig {
  std::string type = "cosine";  // constant | linear | cosine | wsd
  int64_t warmup_steps = 100;
  double final_lr_ratio = 0.1;
  int64_t decay_steps = 0;  // wsd: length of the final decay phase
  template <class V> void visit(V& v) {
    v("type", type, {"constant", "linear", "cosine", "wsd"}); v("warmup_steps", warmup_steps);
    v("final_lr_ratio", final_lr_ratio); v("decay_steps", decay_steps);
  }
};

struct SpikeSkipConfig {
  bool enabled = true;
  int64_t window = 128;
  double sigmas = 6.0;
  template <class V> void visit(V& v) { v("enabled", enabled); v("window", window); v("sigmas", sigmas); }
};

// How the Gated DeltaNet layers run the chunked delta rule (DeltaRuleArgs); the model's math is
// the same either way.
struct DeltaRuleConfig {
  bool tf32_products = true;       // batched products around the state pass on TF32 tensor cores
  bool keep_intermediates = true;  // keep the forward's intermediates for the backward
  template <class V> void visit(V& v) { v("tf32_products", tf32_products); v("keep_intermediates", keep_intermediates); }
};

// A phase of batch-size warmup: the steps before until_step (from the phase before's) take
// global_batch_size instances each.
struct BatchPhaseConfig {
  int64_t until_step = 0;
  int64_t global_batch_size = 0;
  template <class V> void visit(V& v) { v("until_step", until_step); v("global_batch_size", global_batch_size); }
};

struct TrainerConfig {
  int64_t max_steps = 1000;
  int64_t global_batch_size = 32;  // instances of data.seq_len tokens per optimizer step
  // Smaller batches first (e.g. [{until_step: 1000, global_batch_size: 128}]), then
  // global_batch_size from the last phase's until_step on; the schedule counts steps.
  std::vector<BatchPhaseConfig> batch_size_warmup;
  int64_t micro_batch_size = 8;    // instances per forward/backward on one rank
  double grad_clip = 1.0;
  double z_loss = 1e-5;
  std::string precision = "auto";  // auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
  std::string device = "auto";     // auto | cpu | cuda
  bool activation_checkpointing = false;
  // With activation_checkpointing: how many blocks, from the first, recompute their activations
  // in the backward; the rest keep them (faster, more memory). -1: all blocks.
  int64_t checkpointed_layers = -1;
  // Keep the projection weights' bf16 casts from one forward to the next until the weights
  // change (model/weight_casts.h): a copy of them in memory, one cast a step instead of one a
  // forward.
  bool cache_weight_casts = true;
  int64_t seed = 42;
  int64_t log_interval = 1;
  int64_t eval_interval = 100;
  int64_t eval_batches = 8;
  SpikeSkipConfig spike_skip;
  DeltaRuleConfig delta_rule;
  template <class V> void visit(V& v) {
    v("max_steps", max_steps); v("global_batch_size", global_batch_size); v("batch_size_warmup", batch_size_warmup);
    v("micro_batch_size", micro_batch_size); v("grad_clip", grad_clip); v("z_loss", z_loss);
    v("precision", precision, {"auto", "fp32", "bf16"}); v("device", device, {"auto", "cpu", "cuda"});
    v("activation_checkpointing", activation_checkpointing); v("checkpointed_layers", checkpointed_layers);
    v("cache_weight_casts", cache_weight_casts); v("seed", seed);
    v("log_interval", log_interval); v("eval_interval", eval_interval); v("eval_batches", eval_batches);
    v("spike_skip", spike_skip); v("delta_rule", delta_rule);
  }
  // The global batch size of the step after `step` completed ones.
  int64_t global_batch_at(int64_t step) const {
    for (const auto& phase : batch_size_warmup)
      if (step < phase.until_step) return phase.global_batch_size;
    return global_batch_size;
  }
  // The instances the steps after `from` completed ones up to `to` completed take.
  int64_t instances_between(int64_t from, int64_t to) const {
    int64_t instances = 0, start = 0;
    for (const auto& phase : batch_size_warmup) {
      const int64_t lo = std::max(from, start), hi = std::min(to, phase.until_step);
      if (hi > lo) instances += (hi - lo) * phase.global_batch_size;
      start = phase.until_step;
    }
    const int64_t lo = std::max(from, start);
    return instances + (to > lo ? (to - lo) * global_batch_size : 0);
  }
};

struct CheckpointConfig {
  int64_t interval = 500;            // steps between saves (0: only at the end)
  int64_t keep_last = 3;
  int64_t permanent_interval = 0;    // also keep every M-th step forever (0: none)
  bool allow_architecture_change = false;
  bool save_final = true;            // false: no checkpoint at the end (benchmarks)
  bool async = false;                // write in a background thread; the run pauses only to copy to host memory
  template <class V> void visit(V& v) {
    v("interval", interval); v("keep_last", keep_last); v("permanent_interval", permanent_interval);
    v("allow_architecture_change", allow_architecture_change); v("save_final", save_final); v("async", async);
  }
};

struct DistributedConfig {
  int64_t zero_stage = 0;  // 0: replicated, 1: optimizer state sharded, 2: + gradients reduce-scattered
  double bucket_mb = 25;  // gradient bucket size, MiB (fractions allowed: tiny models in tests)
  int64_t timeout_s = 600;
  int64_t bucket_bytes() const { return static_cast<int64_t>(bucket_mb * (1 << 20)); }
  template <class V> void visit(V& v) { v("zero_stage", zero_stage); v("bucket_mb", bucket_mb); v("timeout_s", timeout_s); }
};

struct LoggingConfig {
  std::string level = "info";  // trace | debug | info | warn | error
  bool plot = true;
  template <class V> void visit(V& v) {
    v("level", level, {"trace", "debug", "info", "warn", "error"}); v("plot", plot);
  }
};

struct Config {
  std::string name = "run";
  ModelConfig model;
  DataConfig data;
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
  TrainerConfig trainer;
  CheckpointConfig checkpoint;
  DistributedConfig distributed;
  LoggingConfig logging;
  template <class V> void visit(V& v) {
    v("name", name); v("model", model); v("data", data); v("optimizer", optimizer);
    v("schedule", schedule); v("trainer", trainer); v("checkpoint", checkpoint);
    v("distributed", distributed); v("logging", logging);
  }
};

}  // namespace hybrid
