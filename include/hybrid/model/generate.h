// Continuing token sequences with a model: the prompt in one forward, then one token a step
// through the decoding state (decoding.h: the GDN layers' decoding step, attention over kept
// keys). Each next token is the most likely one (temperature 0), or is drawn from
// softmax(logits / temperature) over the top_k most likely (0: all of them), and of those over
// the fewest most likely whose probability reaches top_p (nucleus sampling), by a CPU generator
// seeded with `seed`: the same draws on any device for the same probabilities. A row that draws
// stop_id ends there; generation ends when every row has.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "hybrid/model/hybrid_lm.h"

namespace hybrid {

struct SamplingOptions {
  int64_t new_tokens = 32;
  double temperature = 0;
  int64_t top_k = 0;
  double top_p = 1;
  uint64_t seed = 0;
  int64_t stop_id = -1;  // -1: none
  // The one-token steps with fixed shapes (decoding.h, fix_shapes), replayed as one CUDA graph on
  // CUDA; the same tokens.
  bool cuda_graph = false;
};

// Where a generate() call's time went, as the host saw it (each token's choice waits for its
// logits): the prompt's forward up to the first new token's choice, then the one-token steps.
struct GenerationTimes {
  double prompt_seconds = 0;  // the prompt's forward and the first new token's choice
  double step_seconds = 0;    // the steps after it, each one forward of one token a row
  int64_t steps = 0;
};

// prompt [B, T >= 1] int64 on the model's device -> the new tokens [B, N] there, N = new_tokens
// unless every row drew stop_id sooner (a row that ended is stop_id from there on). `times`, when
// given, receives where the time went. With prompt_lengths (one a row, 1 .. T), row b's prompt is
// its first prompt_lengths[b] tokens and the rest is padding, never read: the rows' prompts go
// through the model in one forward as packed documents (HybridLM::forward_documents), then the
// rows go on together (decoding.h, stack_rows), each as it would have alone.
at::Tensor generate(HybridLM& model, const at::Tensor& prompt, const SamplingOptions& options,
                    GenerationTimes* times = nullptr, const std::vector<int64_t>& prompt_lengths = {});

// Row b's first lengths[b] tokens of prompt [B, T] as documents packed in one row, as
// HybridLM::forward_documents takes them: {ids [1, sum of lengths] on prompt's device, their
// [B + 1] int64 offsets on the host}.
std::pair<at::Tensor, at::Tensor> pack_rows(const at::Tensor& prompt, const std::vector<int64_t>& lengths);

}  // namespace hybrid
