#include "hybrid/data/loader.h"

#include <ATen/ATen.h>

#include <vector>

#include "hybrid/data/instance_filter.h"
#include "hybrid/error.h"

namespace hybrid::data {

void check_layout(const BatchLayout& l, const std::string& key) {
  if (l.global_batch % (l.world_size * l.micro_batch) != 0)
    throw ConfigError(key + " " + std::to_string(l.global_batch) + " is not a multiple of world size " +
                      std::to_string(l.world_size) + " x trainer.micro_batch_size " + std::to_string(l.micro_batch));
}

MicroBatch read_micro_batch(const TokenDataset& dataset, const InstanceSampler& sampler, uint64_t first,
                            int64_t rows, int64_t eos_id, bool pinned, const InstanceFilterConfig& filter) {
  const int64_t T = dataset.seq_len();
  MicroBatch mb;
  mb.tokens = at::empty({rows, T}, at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
  int64_t* out = mb.tokens.data_ptr<int64_t>();
  int64_t kept = 0;  // an instance the filter leaves out is read over by the next
  for (int64_t r = 0; r < rows; ++r) {
    auto [source, index] = sampler.at(first + r);
    dataset.sources()[source].read_instance(index, out + kept * T);
    if (keeps_instance(filter, out + kept * T, T)) ++kept;
  }
  mb.filtered = rows - kept;
  mb.counted = kept;
  if (kept < rows) mb.tokens = mb.tokens.narrow(0, 0, std::max<int64_t>(kept, 1));
  rows = mb.tokens.size(0);
  if (eos_id >= 0) {
    std::vector<int64_t> cu = {0};
    for (int64_t i = 0; i < rows * T; ++i)
      if (out[i] == eos_id && (i + 1) % T != 0) cu.push_back(i + 1);
    cu.push_back(rows * T);
    mb.cu_seqlens = at::tensor(cu, at::kLong);
  }
  return mb;
}

Loader::Loader(const TokenDataset& dataset, const InstanceSampler& sampler, BatchLayout layout, uint64_t consumed,
               int64_t eos_id, int64_t prefetch, bool pinned, const InstanceFilterConfig& filter)
    : dataset_(dataset), sampler_(sampler), layout_(layout), consumed_(consumed), eos_id_(eos_id),
      capacity_(std::max<int64_t>(prefetch, 1)), pinned_(pinned), filter_(filter) {
  check_layout(layout_);
  thread_ = std::thread([this] { run(); });
}

Loader::~Loader() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Loader::run() {
  try {
    while (true) {
      const uint64_t first =
          consumed_ + step_ * layout_.global_batch + layout_.rank * layout_.rank_batch() + micro_ * layout_.micro_batch;
      MicroBatch mb = read_micro_batch(dataset_, sampler_, first, layout_.micro_batch, eos_id_, pinned_, filter_);
      if (++micro_ == layout_.micro_steps()) micro_ = 0, ++step_;
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || static_cast<int64_t>(queue_.size()) < capacity_; });
      if (stop_) return;
      queue_.push_back(std::move(mb));
      cv_.notify_all();
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    error_ = std::current_exception();
    cv_.notify_all();
  }
}

MicroBatch Loader::next() {
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [&] { return !queue_.empty() || error_; });
  if (queue_.empty()) std::rethrow_exception(error_);
  MicroBatch mb = std::move(queue_.front());
  queue_.pop_front();
  cv_.notify_all();
  return mb;
}

}  // namespace hybrid::data
