// Model weights by their HF names: what goes into model.safetensors, and loading it back
// with every name and shape checked (missing, unexpected or mis-shaped tensors are errors
// that name the tensor and the file).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "hybrid/io/safetensors.h"
#include "hybrid/model/hybrid_lm.h"

namespace hybrid {

std::vector<std::pair<std::string, at::Tensor>> model_weights(HybridLM& model);

// What a weight belongs to, by its name: kWeightKinds[weight_kind(name)] is "embedding", "gdn"
// (the Gated DeltaNet mixers), "attention", "mlp", "norms" (the blocks' and the final) or "lm_head".
inline constexpr const char* kWeightKinds[] = {"embedding", "gdn", "attention", "mlp", "norms", "lm_head"};
int64_t weight_kind(const std::string& name);

// Copies (converting dtype) every tensor of `file` into the model's parameters.
void load_model_weights(HybridLM& model, const io::TensorFile& file, const std::string& path);

}  // namespace hybrid

namespace hybrid {

// A model with its config (cli::load_for_inference reads them: train::read_model_files).
struct LoadedModel {
  Config config;
  HybridLM model{nullptr};
};

}  // namespace hybrid
