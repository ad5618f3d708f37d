// Validation loss: the mean next-token cross-entropy of a model over the first batches of a
// source's instances, in file order (the same every time). The trainer's validation and
// `hybrid-eval --data` both compute it here, so a checkpoint's val_loss can be recomputed
// afterwards, or taken on other data.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

#include "hybrid/data/dataset.h"
#include "hybrid/model/hybrid_lm.h"

namespace hybrid {

struct ValidationLoss {
  double sum = 0;       // of the batches' mean losses (so that ranks' shares add up)
  int64_t batches = 0;  // whole batches taken
  double loss() const;  // their mean (NaN when no batch fit)
};

// Batches of `batch_size` instances, at most `max_batches` of them (-1: every whole batch), of
// which this rank takes batches rank, rank + world, ...; on `device`, under bf16 autocast on CUDA
// when `bf16`. No gradients; the model's train/eval mode is left as it was found.
ValidationLoss validation_loss(HybridLM& model, const data::Source& source, int64_t batch_size, int64_t max_batches,
                               c10::Device device, bool bf16, int rank = 0, int world = 1);

}  // namespace hybrid
