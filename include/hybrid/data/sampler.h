// The order in which instances are seen: one global permutation per epoch derived from
// (seed, epoch) alone, so it does not depend on the world size or the micro batch size.
// Position p counts instances consumed since the start of training; a global batch of G
// instances at step s covers positions [s G, (s + 1) G), sliced into ranks, then micro batches.
//
// Mixtures: an epoch holds round(w_i / sum(w) * N) instances of source i, N the total number
// of instances of all sources, taken from a per-source permutation (cycled when a source is
// upsampled). Permutations are implicit (a keyed Feistel network), so no table is stored.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "hybrid/data/dataset.h"

namespace hybrid::data {

// A keyed pseudorandom bijection of [0, n): balanced Feistel rounds on the smallest even bit
// width covering n, cycle-walking the values that fall outside.
class Permutation {
 public:
  Permutation(uint64_t n, uint64_t key);
  uint64_t operator()(uint64_t i) const;
  uint64_t size() const { return n_; }

 private:
  uint64_t n_, key_, half_bits_, mask_;
};

class InstanceSampler {
 public:
  InstanceSampler(const TokenDataset& dataset, uint64_t seed);
  uint64_t epoch_size() const { return segment_starts_.back(); }
  // The instance at global position p: (source index, instance index within the source).
  std::pair<size_t, uint64_t> at(uint64_t position) const;

 private:
  std::vector<uint64_t> source_sizes_, segment_starts_;  // segments of one epoch, per source
  uint64_t seed_;
};

}  // namespace hybrid::data
