// Checks that need more than one value or a range: the "impossible values" of a config.
#include <cmath>

#include "hybrid/config/load.h"
#include "hybrid/error.h"

namespace hybrid {

std::string ModelConfig::layer_types() const {
  std::string types;
  if (!layers.empty()) {
    for (const auto& l : layers) types += l.empty() ? '?' : l[0];
    return types;
  }
  if (layer_pattern.empty()) return types;
  for (int64_t i = 0; i < n_layers; ++i) types += layer_pattern[i % layer_pattern.size()];
  return types;
}

namespace {

class Checker {
 public:
  explicit Checker(const LoadedConfig& loaded) : loaded_(loaded) {}
  // Throws "<origin>: <key>: <message>" unless ok.
  void require(bool ok, const std::string& key, const std::string& message) const {
    if (ok) return;
    auto it = loaded_.origins.find(key);
    std::string where = it != loaded_.origins.end() ? it->second : "(default value)";
    throw ConfigError(where + ": " + key + ": " + message);
  }
  void positive(int64_t v, const std::string& key) const { require(v > 0, key, "must be positive, got " + std::to_string(v)); }
  void positive(double v, const std::string& key) const { require(v > 0, key, "must be positive"); }
  void non_negative(double v, const std::string& key) const { require(v >= 0, key, "must not be negative"); }

 private:
  const LoadedConfig& loaded_;
};

void check_model(const ModelConfig& m, const Checker& c) {
  c.positive(m.d_model, "model.d_model");
  c.positive(m.n_layers, "model.n_layers");
  c.positive(m.vocab_size, "model.vocab_size");
  c.positive(m.mlp_hidden, "model.mlp_hidden");
  c.positive(m.norm_eps, "model.norm_eps");
  c.positive(m.init_std, "model.init_std");
  c.positive(m.max_seq_len, "model.max_seq_len");
  if (m.layers.empty()) {
    c.require(!m.layer_pattern.empty(), "model.layer_pattern", "must not be empty");
    c.require(m.layer_pattern.find_first_not_of("GA") == std::string::npos, "model.layer_pattern",
              "'" + m.layer_pattern + "' may hold only the letters G (Gated DeltaNet) and A (attention)");
  } else {
    c.require(static_cast<int64_t>(m.layers.size()) == m.n_layers, "model.layers",
              "lists " + std::to_string(m.layers.size()) + " layers but model.n_layers is " + std::to_string(m.n_layers));
    for (size_t i = 0; i < m.layers.size(); ++i)
      c.require(m.layers[i] == "G" || m.layers[i] == "A", "model.layers",
                "entry " + std::to_string(i) + " is '" + m.layers[i] + "'; expected G or A");
  }
  const std::string types = m.layer_types();
  if (types.find('A') != std::string::npos) {
    const auto& a = m.attention;
    c.positive(a.n_heads, "model.attention.n_heads");
    c.positive(a.n_kv_heads, "model.attention.n_kv_heads");
    c.require(m.d_model % a.n_heads == 0, "model.attention.n_heads",
              std::to_string(a.n_heads) + " heads do not divide d_model " + std::to_string(m.d_model));
    c.require(a.n_heads % a.n_kv_heads == 0, "model.attention.n_kv_heads",
              std::to_string(a.n_kv_heads) + " KV heads do not divide n_heads " + std::to_string(a.n_heads));
    c.require(!a.rope || m.attention_head_dim() % 2 == 0, "model.attention.n_heads",
              "RoPE needs an even head dim, d_model / n_heads is " + std::to_string(m.attention_head_dim()));
    c.positive(a.rope_theta, "model.attention.rope_theta");
  }
  if (types.find('G') != std::string::npos) {
    const auto& g = m.gdn;
    c.positive(g.n_k_heads, "model.gdn.n_k_heads");
    c.positive(g.n_v_heads, "model.gdn.n_v_heads");
    c.positive(g.head_k_dim, "model.gdn.head_k_dim");
    c.positive(g.head_v_dim, "model.gdn.head_v_dim");
    c.positive(g.conv_size, "model.gdn.conv_size");
    c.positive(g.norm_eps, "model.gdn.norm_eps");
    c.require(g.n_v_heads % g.n_k_heads == 0, "model.gdn.n_v_heads",
              "must be a multiple of n_k_heads " + std::to_string(g.n_k_heads) + " (grouped value attention)");
  }
}

void check_source(const DataSourceConfig& s, const std::string& key, const Checker& c) {
  c.require(s.weight > 0, key + ".weight", "mixture weights must be positive");
  for (size_t i = 0; i < s.paths.size(); ++i)
    c.require(!s.paths[i].empty(), key + ".paths", "entry " + std::to_string(i) + " is empty");
}

// A name in metrics.jsonl, a sweep summary's columns and log lines: present, plain, and not
// another entry's of the same list.
template <class Named>
void check_label(const std::vector<Named>& list, size_t i, const std::string& key, const Checker& c) {
  const std::string& name = list[i].name;
  c.require(!name.empty(), key, "needs a name");
  c.require(name.find_first_of(" ,/|\"") == std::string::npos, key + ".name", "'" + name + "' has a space, comma, '/', '|' or quote");
  for (size_t j = 0; j < i; ++j) c.require(list[j].name != name, key + ".name", "'" + name + "' twice");
}

}  // namespace

void validate_config(const LoadedConfig& loaded) {
  const Config& cfg = loaded.config;
  Checker c(loaded);
  c.require(!cfg.name.empty() && cfg.name.find('/') == std::string::npos, "name",
            "must be a non-empty name without '/'");
  check_model(cfg.model, c);

  const auto& d = cfg.data;
  for (size_t i = 0; i < d.sources.size(); ++i)
    check_source(d.sources[i], "data.sources[" + std::to_string(i) + "]", c);
  for (size_t i = 0; i < d.validation.size(); ++i) {
    const std::string key = "data.validation[" + std::to_string(i) + "]";
    check_source(d.validation[i], key, c);
    if (d.validation.size() > 1 || !d.validation[i].name.empty()) check_label(d.validation, i, key, c);  // one alone may go unnamed
  }
  for (size_t i = 0; i < d.tasks.size(); ++i) {
    const std::string key = "data.tasks[" + std::to_string(i) + "]";
    check_label(d.tasks, i, key, c);
    c.require(!d.tasks[i].path.empty(), key, "needs a path: a task file (scripts/prepare_task.py writes them)");
    c.require(d.tasks[i].limit >= 0, key + ".limit", "must not be negative (0: every item)");
  }
  c.positive(d.seq_len, "data.seq_len");
  c.require(d.seq_len <= cfg.model.max_seq_len, "data.seq_len",
            "exceeds model.max_seq_len " + std::to_string(cfg.model.max_seq_len));
  c.require(d.eos_id >= -1 && d.eos_id < cfg.model.vocab_size, "data.eos_id",
            "must be -1 (from metadata) or a token id below model.vocab_size");
  c.require(d.prefetch >= 0, "data.prefetch", "must not be negative");
  const auto& f = d.instance_filter;
  c.require(f.min_period >= 1 && f.min_period <= f.max_period, "data.instance_filter.min_period",
            "must lie in [1, data.instance_filter.max_period]");
  c.require(f.max_count >= 2, "data.instance_filter.max_count", "must be at least 2");

  const auto& o = cfg.optimizer;
  c.positive(o.lr, "optimizer.lr");
  c.require(o.betas.size() == 2 && o.betas[0] >= 0 && o.betas[0] < 1 && o.betas[1] >= 0 && o.betas[1] < 1,
            "optimizer.betas", "expected two values in [0, 1)");
  c.positive(o.eps, "optimizer.eps");
  c.non_negative(o.weight_decay, "optimizer.weight_decay");
  c.require(o.muon.momentum >= 0 && o.muon.momentum < 1, "optimizer.muon.momentum", "must lie in [0, 1)");
  c.positive(o.muon.ns_steps, "optimizer.muon.ns_steps");

  const auto& s = cfg.schedule;
  const auto& t = cfg.trainer;
  c.require(s.warmup_steps >= 0, "schedule.warmup_steps", "must not be negative");
  c.require(s.final_lr_ratio >= 0 && s.final_lr_ratio <= 1, "schedule.final_lr_ratio", "must lie in [0, 1]");
  c.require(s.decay_steps >= 0 && s.decay_steps <= t.max_steps, "schedule.decay_steps",
            "must lie in [0, trainer.max_steps]");
  c.require(s.type != "wsd" || s.decay_steps > 0, "schedule.decay_steps", "wsd needs a positive decay phase");

  c.positive(t.max_steps, "trainer.max_steps");
  c.positive(t.global_batch_size, "trainer.global_batch_size");
  c.positive(t.micro_batch_size, "trainer.micro_batch_size");
  // A global batch (the run's, or a warmup phase's) is a whole number of micro batches.
  auto whole_micro_batches = [&](int64_t batch, const std::string& key) {
    c.require(batch % t.micro_batch_size == 0, key,
              std::to_string(batch) + " is not a multiple of trainer.micro_batch_size " + std::to_string(t.micro_batch_size));
  };
  whole_micro_batches(t.global_batch_size, "trainer.global_batch_size");
  for (size_t i = 0; i < t.batch_size_warmup.size(); ++i) {
    const auto& phase = t.batch_size_warmup[i];
    const std::string key = "trainer.batch_size_warmup[" + std::to_string(i) + "]";
    const int64_t previous = i == 0 ? 0 : t.batch_size_warmup[i - 1].until_step;
    c.require(phase.until_step > previous, key + ".until_step",
              i == 0 ? std::string("must be positive") : "must be after the phase before's (" + std::to_string(previous) + ")");
    c.positive(phase.global_batch_size, key + ".global_batch_size");
    whole_micro_batches(phase.global_batch_size, key + ".global_batch_size");
  }
  c.non_negative(t.grad_clip, "trainer.grad_clip");
  c.non_negative(t.z_loss, "trainer.z_loss");
  c.positive(t.log_interval, "trainer.log_interval");
  c.require(t.eval_interval >= 0, "trainer.eval_interval", "must not be negative (0: never)");
  c.positive(t.eval_batches, "trainer.eval_batches");
  c.require(t.checkpointed_layers >= -1 && t.checkpointed_layers <= cfg.model.n_layers, "trainer.checkpointed_layers",
            "must be -1 (all blocks) or a count up to model.n_layers " + std::to_string(cfg.model.n_layers));
  c.require(t.checkpointed_layers == -1 || t.activation_checkpointing, "trainer.checkpointed_layers",
            "needs trainer.activation_checkpointing: true");
  c.require(t.spike_skip.window >= 20, "trainer.spike_skip.window",
            "must be at least 20 (the guard judges a step once 20 are known), got " + std::to_string(t.spike_skip.window));
  c.positive(t.spike_skip.sigmas, "trainer.spike_skip.sigmas");

  const auto& k = cfg.checkpoint;
  c.require(k.interval >= 0, "checkpoint.interval", "must not be negative (0: only at the end)");
  c.positive(k.keep_last, "checkpoint.keep_last");
  c.require(k.permanent_interval >= 0, "checkpoint.permanent_interval", "must not be negative");

  const auto& dist = cfg.distributed;
  c.require(dist.zero_stage >= 0 && dist.zero_stage <= 2, "distributed.zero_stage", "must be 0, 1 or 2");
  c.positive(dist.bucket_mb, "distributed.bucket_mb");
  c.positive(dist.timeout_s, "distributed.timeout_s");
}

}  // namespace hybrid
