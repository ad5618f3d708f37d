// Multiple-choice scores of a model on a task (data/choice_task.h), by log-likelihood as
// lm-evaluation-harness and OLMo's in-loop evaluators score them: each choice's summed
// log-probability after the context. The trainer's in-loop evaluation and `hybrid-eval --task`
// both score here, so a checkpoint's numbers can be recomputed afterwards.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

#include "hybrid/data/choice_task.h"
#include "hybrid/model/hybrid_lm.h"

namespace hybrid {

// Totals over the items i with i % world == rank. A context that fits max_len tokens beside its
// longest choice goes through the model once, the choices from its decoding state; a longer one is
// cut from the left to fit beside each choice, a row of context + choice a choice. Forwards take at
// most token_budget tokens (rows padded to the batch's longest), on `device`, under bf16 autocast
// on CUDA when `bf16`. No gradients; the model's train/eval mode is left as it was found.
data::ChoiceTotals score_choice_task(HybridLM& model, const data::ChoiceTask& task, int64_t max_len, int64_t token_budget,
                               c10::Device device, bool bf16, int rank = 0, int world = 1);

}  // namespace hybrid
