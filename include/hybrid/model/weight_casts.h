// Projection weights in the compute dtype, kept from one forward to the next (project() reads
// them). Casting the float32 weights to bf16 is a pass over all of them (4 bytes read and 2
// written a weight: about 0.4 ms a block at 7b.yaml's width), and every forward paid it: 32
// micro batches a step a rank at 7b.yaml, each forward run twice under activation
// checkpointing. While the weights are unchanged, their cast is reused. An entry holds every
// weight's TensorImpl, memory and version counter (in-place updates bump it: the optimizer,
// parameter broadcasts, checkpoint loads) and is recast when any differs. The optimizer writes
// the casts of the weights it updates itself (cached_casts_of, keep_casts_of), where the next
// forward would read every float32 weight again to recast it. Costs a compute-dtype copy of the
// projection weights (`trainer.cache_weight_casts: false` turns it off; the dry-run estimate
// counts it).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace hybrid {

// The weights' rows stacked in `compute`, with `padding` zero rows after them (a single weight
// already in `compute` as it is): the cached copy when the cache is on and still valid for
// them, else a new cast, cached when the cache is on. Only casts are cached.
at::Tensor weights_in_compute_dtype(at::TensorList weights, at::ScalarType compute, int64_t padding);

// Where one weight's cast sits in a cached entry: rows [row, row + rows) of the entry's stacked
// copy. view() is that cast in the weight's shape, for an update to write into.
struct CachedCast {
  at::Tensor stacked;
  int64_t row, rows;
  at::Tensor view() const { return stacked.narrow(0, row, rows); }
};
// For each of `weights`, where its cast sits in each cached entry that holds it. One pass over the
// cache for all of them, and no view made: the optimizer asks for every weight before its first
// launch, and making a view a weight there (a few us of host time each) left the GPU idle before
// the first update; it makes each view beside that weight's launch.
std::vector<std::vector<CachedCast>> cached_casts_of(at::TensorList weights);
// After an update of `updated` that wrote all their cached casts: entries whose weights are all
// among them (same memory) stay, taken as current; every other entry is forgotten.
void keep_casts_of(at::TensorList updated);

void set_weight_cast_cache(bool enabled);  // process-wide; on by default
void forget_weight_casts();
size_t weight_casts_cached();  // entries held

}  // namespace hybrid
