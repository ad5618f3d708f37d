// Micro batches for one rank, prepared by a background thread (reading, EOS boundaries,
// pinned host memory) a few steps ahead, in the exact order the sampler defines.
#pragma once

#include <ATen/core/Tensor.h>

#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "hybrid/data/sampler.h"

namespace hybrid::data {

struct BatchLayout {
  int64_t global_batch = 1;  // instances per optimizer step, all ranks
  int64_t micro_batch = 1;   // instances per forward/backward
  int64_t world_size = 1, rank = 0;
  int64_t rank_batch() const { return global_batch / world_size; }
  int64_t micro_steps() const { return rank_batch() / micro_batch; }
};
// Throws hybrid::ConfigError unless global = world * micro * (whole number of accumulation steps),
// naming `key` (the config key the global batch comes from).
void check_layout(const BatchLayout& layout, const std::string& key = "trainer.global_batch_size");

struct MicroBatch {
  at::Tensor tokens;                     // [rows kept, seq_len] int64 (pinned when asked)
  std::optional<at::Tensor> cu_seqlens;  // document starts (after each EOS) in the flattened batch
  int64_t filtered = 0;                  // instances data.instance_filter left out
  // Rows whose loss counts: all of tokens', or 0 where the filter left out every instance (then
  // the first stays in tokens, so that the backward still runs and reduces gradients, weighted 0).
  int64_t counted = 0;
};

// Reads one micro batch: instances at global positions [first, first + rows), less those the
// instance filter leaves out.
MicroBatch read_micro_batch(const TokenDataset& dataset, const InstanceSampler& sampler, uint64_t first,
                            int64_t rows, int64_t eos_id, bool pinned, const InstanceFilterConfig& filter = {});

class Loader {
 public:
  // Starts after the first `consumed` instances of the sampler's order (a run's position, which a
  // resume with another global batch size goes on from exactly). eos_id >= 0 adds cu_seqlens for
  // intra-document masking.
  Loader(const TokenDataset& dataset, const InstanceSampler& sampler, BatchLayout layout, uint64_t consumed,
         int64_t eos_id, int64_t prefetch, bool pinned, const InstanceFilterConfig& filter = {});
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;
  MicroBatch next();  // rethrows any error of the reading thread

 private:
  void run();
  const TokenDataset& dataset_;
  const InstanceSampler& sampler_;
  BatchLayout layout_;
  uint64_t consumed_;   // where the loader started
  uint64_t step_ = 0;   // optimizer steps read since
  int64_t micro_ = 0, eos_id_, capacity_;
  bool pinned_;
  InstanceFilterConfig filter_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<MicroBatch> queue_;
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace hybrid::data
