#include "hybrid/data/sampler.h"

#include <algorithm>
#include <cmath>

namespace hybrid::data {
namespace {

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t key_of(std::initializer_list<uint64_t> parts) {
  uint64_t k = 0x5eed;
  for (uint64_t p : parts) k = splitmix(k ^ p);
  return k;
}

}  // namespace

Permutation::Permutation(uint64_t n, uint64_t key) : n_(n), key_(key) {
  uint64_t bits = 2;
  while (bits < 64 && (uint64_t{1} << bits) < n) bits += 2;
  half_bits_ = bits / 2;
  mask_ = (uint64_t{1} << half_bits_) - 1;
}

uint64_t Permutation::operator()(uint64_t i) const {
  uint64_t x = i;
  do {  // cycle-walk: the Feistel network permutes [0, 4^half_bits); repeat until inside [0, n)
    uint64_t left = x >> half_bits_, right = x & mask_;
    for (uint64_t round = 0; round < 4; ++round) {
      uint64_t f = splitmix(key_ ^ splitmix(right + (round << 56))) & mask_;
      uint64_t next = left ^ f;
      left = right;
      right = next;
    }
    x = (left << half_bits_) | right;
  } while (x >= n_);
  return x;
}

InstanceSampler::InstanceSampler(const TokenDataset& dataset, uint64_t seed) : seed_(seed) {
  double total_weight = 0;
  uint64_t total = 0;
  for (const auto& s : dataset.sources()) total_weight += s.weight(), total += s.num_instances();
  segment_starts_.push_back(0);
  for (const auto& s : dataset.sources()) {
    const uint64_t share = dataset.sources().size() == 1
                               ? s.num_instances()
                               : std::max<uint64_t>(1, std::llround(s.weight() / total_weight * total));
    source_sizes_.push_back(s.num_instances());
    segment_starts_.push_back(segment_starts_.back() + share);
  }
}

std::pair<size_t, uint64_t> InstanceSampler::at(uint64_t position) const {
  const uint64_t epoch = position / epoch_size(), j = position % epoch_size();
  const uint64_t q = Permutation(epoch_size(), key_of({seed_, epoch}))(j);
  const size_t source = std::upper_bound(segment_starts_.begin(), segment_starts_.end(), q) - segment_starts_.begin() - 1;
  const uint64_t r = q - segment_starts_[source], n = source_sizes_[source];
  const uint64_t cycle = r / n;  // > 0 only when the source is upsampled past its size
  return {source, Permutation(n, key_of({seed_, epoch, source, cycle}))(r % n)};
}

}  // namespace hybrid::data
