#include "hybrid/cli/dry_run.h"

#include <fmt/format.h>

#include "hybrid/model/size.h"

namespace hybrid {
namespace {

std::string with_commas(int64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0 && digits[i - 1] != '-') out += ',';
    out += digits[i];
  }
  return out;
}

// 6.00T, 419.4B, 1.2M: a count in the unit that leaves it above 1.
std::string in_units(double n) {
  const char* units[] = {"", "K", "M", "B", "T"};
  int u = 0;
  while (u < 4 && n >= 1000) n /= 1000, ++u;
  return fmt::format("{:.{}f}{}", n, n < 10 ? 2 : n < 100 ? 1 : 0, units[u]);
}

// "steps 1-1000 at 128 instances, 1001-3000 at 256, then 512" (trainer.batch_size_warmup).
std::string warmup_phases(const TrainerConfig& t) {
  std::string s;
  int64_t from = 1;
  for (const auto& phase : t.batch_size_warmup) {
    s += s.empty() ? fmt::format("steps {}-{} at {} instances", from, phase.until_step, phase.global_batch_size)
                   : fmt::format(", {}-{} at {}", from, phase.until_step, phase.global_batch_size);
    from = phase.until_step + 1;
  }
  return s + fmt::format(", then {}", t.global_batch_size);
}

}  // namespace

std::string dry_run_report(const Config& cfg, int64_t world_size) {
  const ModelConfig& m = cfg.model;
  std::string out;
  auto line = [&](const std::string& s) { out += s + "\n"; };

  line(fmt::format("model: {} layers ({}), d_model {}, vocab {}", m.n_layers, m.layer_types(), m.d_model, m.vocab_size));
  const ParameterCount params = count_parameters(m);
  line("parameters:");
  for (const auto& [name, n] : params.parts)
    if (n) line(fmt::format("  {:<44} {:>16}", name, with_commas(n)));
  line(fmt::format("  {:<44} {:>16}  ({:.3f} B)", "total", with_commas(params.total), params.total / 1e9));
  const int64_t embeddings = params.parts.front().second + params.parts.back().second;
  line(fmt::format("  {:<44} {:>16}", "non-embedding", with_commas(params.total - embeddings)));

  const int64_t T = cfg.data.seq_len;
  const FlopsPerToken f = training_flops_per_token(m, T);
  line(fmt::format("training FLOPs per token at seq_len {} (forward + backward):", T));
  line(fmt::format("  {:<44} {:>16.4g}", "matmuls (6 x matmul parameters)", f.matmul));
  line(fmt::format("  {:<44} {:>16.4g}", "causal attention (QK^T, PV)", f.attention));
  line(fmt::format("  {:<44} {:>16.4g}", "gated delta rule (chunked) + conv", f.gdn));
  line(fmt::format("  {:<44} {:>16.4g}", "total", f.total()));
  const TrainerConfig& t = cfg.trainer;
  const double tokens = static_cast<double>(t.instances_between(0, t.max_steps)) * static_cast<double>(T);
  line(fmt::format("run: {} steps{}: {} tokens, {:.3g} training FLOPs", with_commas(t.max_steps),
                   t.batch_size_warmup.empty() ? fmt::format(" of {} x {} tokens", t.global_batch_size, T)
                                               : " (batch-size warmup: " + warmup_phases(t) + ")",
                   in_units(tokens), tokens * f.total()));
  if (cfg.optimizer.type == "muon") line(muon_cost(cfg, world_size));

  const MemoryEstimate mem = estimate_memory(cfg, world_size);
  std::string checkpointing;
  if (cfg.trainer.activation_checkpointing)
    checkpointing = cfg.trainer.checkpointed_layers < 0
                        ? ", activation checkpointing"
                        : fmt::format(", activation checkpointing of the first {} of {} blocks",
                                      cfg.trainer.checkpointed_layers, m.n_layers);
  line(fmt::format("memory per GPU, estimated (world size {}, ZeRO stage {}, micro batch {} x {} tokens{}):",
                   world_size, cfg.distributed.zero_stage, cfg.trainer.micro_batch_size, T, checkpointing));
  for (const auto& [name, bytes] : mem.parts) line(fmt::format("  {:<52} {:>9.2f} GiB", name, bytes / (1 << 30)));
  line(fmt::format("  {:<52} {:>9.2f} GiB", "total (before allocator overhead)", mem.total / (1 << 30)));
  // What trainer.checkpointed_layers trades: each checkpointed block recomputes its forward in
  // the backward (about a third more of its compute), each other one keeps its activations.
  line("  the same total with the first N blocks checkpointed (trainer.checkpointed_layers):");
  std::vector<int64_t> counts;
  for (int64_t quarter = 0; quarter <= 4; ++quarter) {
    const int64_t n = m.n_layers * quarter / 4;
    if (counts.empty() || counts.back() != n) counts.push_back(n);
  }
  for (const int64_t n : counts) {
    Config c = cfg;
    c.trainer.activation_checkpointing = n > 0, c.trainer.checkpointed_layers = n > 0 ? n : -1;
    line(fmt::format("  {:<52} {:>9.2f} GiB", fmt::format("  {} of {}", n, m.n_layers),
                     estimate_memory(c, world_size).total / (1 << 30)));
  }
  // A checkpoint: the float32 weights and the optimizer state (optimizer_state_floats).
  const double model_gib = 4.0 * params.total / (1 << 30), optim_gib = 4.0 * optimizer_state_floats(cfg) / (1 << 30);
  // Each rank writes its ZeRO share of the optimizer state and a run of the weights that evens out
  // the bytes (checkpoint.h); at stage 0 rank 0 writes the whole state and the others the weights.
  // A save goes a tensor at a time from the device; an asynchronous one first copies a rank's
  // whole share to host memory.
  const double total_gib = model_gib + optim_gib;
  const bool sharded = cfg.distributed.zero_stage > 0;
  const double rank0_gib = world_size == 1 ? total_gib : sharded ? total_gib / world_size : optim_gib;
  const double other_gib = sharded ? rank0_gib : model_gib / std::max<int64_t>(world_size - 1, 1);
  const std::string by_rank = world_size == 1 ? ""
                              : sharded       ? fmt::format(", about {:.2f} GiB written by each rank", rank0_gib)
                                              : fmt::format(", the optimizer state written by rank 0, the weights by the other {} "
                                                            "(about {:.2f} GiB each)", world_size - 1, other_gib);
  line(fmt::format("checkpoint: {:.2f} GiB a save (weights {:.2f}, optimizer state {:.2f}){}", total_gib, model_gib, optim_gib,
                   by_rank));
  if (cfg.checkpoint.async)
    line(fmt::format("  checkpoint.async: host memory until written: {}", world_size == 1 || sharded
                                                                            ? fmt::format("about {:.2f} GiB a rank", rank0_gib)
                                                                            : fmt::format("rank 0 {:.2f} GiB, the others about {:.2f} GiB", rank0_gib, other_gib)));
  return out;
}

}  // namespace hybrid
