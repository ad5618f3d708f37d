// What a config costs before anything is built: exact parameter counts per component,
// training FLOPs per token (matmuls, causal attention and the chunked delta rule counted
// separately), and a per-GPU memory estimate. Pure arithmetic on the config; no torch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "hybrid/config/config.h"

namespace hybrid {

struct ParameterCount {
  std::vector<std::pair<std::string, int64_t>> parts;  // component -> parameters
  int64_t total = 0;
  int64_t matmul = 0;  // parameters that take part in a matmul per token (all but embeddings, norms, gates)
  int64_t block_matrices = 0;  // the blocks' 2-D weights (what Muon takes under optimizer.type: muon)
};
ParameterCount count_parameters(const ModelConfig& model);
// The float32 numbers of optimizer state: AdamW's two moments a parameter (and its step count a
// tensor, left out), one momentum for each of the blocks' matrices under optimizer.type: muon.
double optimizer_state_floats(const Config& cfg);
// The blocks' 2-D weights as [out, in], layer by layer (what Muon takes).
std::vector<std::pair<int64_t, int64_t>> block_matrix_shapes(const ModelConfig& model);
// The FLOPs of Muon's Newton-Schulz iterations in one optimizer step over all of them (muon.h: a
// step's three products on the short side s of an s x l matrix, 4 s^2 l + 2 s^3), whichever
// optimizer.type is set: split among the ranks under ZeRO, on every rank without it.
double muon_flops_per_step(const Config& cfg);

// muon_flops_per_step beside the step's training FLOPs, both on one rank, as a line
// (the dry run's; a run under optimizer.type: muon logs it at the start): ZeRO splits the matrices
// among the ranks (whole matrices a rank, balanced by bytes: about even), without it every rank
// orthogonalizes all of them.
std::string muon_cost(const Config& config, int64_t world_size);

struct FlopsPerToken {
  double matmul = 0, attention = 0, gdn = 0;  // training (forward + backward)
  double total() const { return matmul + attention + gdn; }
};
// Training FLOPs per token at sequence length seq_len. Attention counts the causal half
// of QK^T and PV; GDN counts the chunked (chunk 64) WY algorithm's matmuls.
FlopsPerToken training_flops_per_token(const ModelConfig& model, int64_t seq_len);

struct MemoryEstimate {
  std::vector<std::pair<std::string, double>> parts;  // component -> bytes per GPU
  double total = 0;
};
MemoryEstimate estimate_memory(const Config& config, int64_t world_size);

}  // namespace hybrid
