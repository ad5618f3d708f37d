// The order in which the reverse state pass on the registers kernel finishes its chunks, for a
// kernel beside it that takes each chunk as it is done (wy_backward: kernels/chunk_ready.cuh).
// The pass's grid is (chains, H, sequences), one block an SM, so pair p = h + H n (head h of
// sequence n) has its chains at blocks chains p ... chains p + chains - 1 in dispatch order. Where
// the blocks outnumber the SMs (7b.yaml's micro batch: 180 blocks on 132 SMs), the pairs whose
// chains all run in the waves before the last are done by the time the last wave's blocks have all
// started, and the last wave leaves the most SMs idle: the reader takes those pairs' chunks first,
// then the last wave's, each group a step of every pair at a time from each sequence's last chunk.
// Plain C++ on the host (its test and the op's choice), also compiled for the device.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace hybrid::ops::detail {

struct ReversePassOrder {
  int H = 0, NC = 0, sequences = 1;  // NC / sequences chunks a sequence
  int early_pairs = 0;               // the pairs done before the last wave (early_pairs below)
};

// The pairs whose chains all run before the pass's last wave, for `pairs` pairs of `chains` chains
// on `sms` SMs (0 where the blocks fit in one wave).
HYBRID_HOST_DEVICE int early_pairs(int64_t pairs, int64_t chains, int64_t sms) {
  const int64_t blocks = pairs * chains, before_last = blocks > 0 ? (blocks - 1) / sms * sms : 0;
  return static_cast<int>(before_last / chains);
}

// The blocks of the pass's last wave: the SMs idle through it are sms minus these.
HYBRID_HOST_DEVICE int64_t last_wave_blocks(int64_t pairs, int64_t chains, int64_t sms) {
  const int64_t blocks = pairs * chains;
  return blocks > 0 ? blocks - (blocks - 1) / sms * sms : 0;
}

// The chunk index h NC + c that a reader beside the pass takes as its i-th (i below H NC).
HYBRID_HOST_DEVICE int64_t reverse_pass_chunk(const ReversePassOrder& o, int64_t i) {
  const int64_t chunks = o.NC / o.sequences, pairs = static_cast<int64_t>(o.H) * o.sequences;
  int64_t first = 0, count = o.early_pairs;
  if (i >= count * chunks) i -= count * chunks, first = count, count = pairs - count;
  const int64_t p = first + i % count, step = i / count, n = p / o.H, h = p % o.H;
  return h * o.NC + n * chunks + chunks - 1 - step;
}

}  // namespace hybrid::ops::detail
