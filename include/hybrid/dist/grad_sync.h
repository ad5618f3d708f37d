// Data parallelism for the trainer: gradients are averaged over ranks in buckets while the last
// micro batch's backward is still running, and with ZeRO the optimizer state is sharded.
//   stage 0: all-reduce every gradient; every rank steps every parameter.
//   stage 1: all-reduce; each rank steps (and keeps optimizer state for) only the parameters it
//            owns, then owners broadcast them.
//   stage 2: gradients are reduced to their owner only (others drop theirs), then as stage 1.
// Buckets hold parameters in reverse order (the order backward finishes their gradients), of
// one owner each; a bucket's reduction starts from a post-accumulate-grad hook as soon as its
// last gradient is in, and buckets start in the same order on every rank (a ready bucket waits
// for the ones before it). At most kInFlight buckets travel at once, so the copies in flight
// stay small. Stages 0 and 1 send nothing on micro batches that only accumulate; stage 2
// reduces every micro batch, so that a rank holds the full gradients of at most a few buckets
// at a time and otherwise only its own (the owner's gradient carries the sum of the micro
// batches so far; the others drop theirs). Ownership gives each rank a contiguous run of
// parameters (in name order) of about equal size, the same on every rank. With one process
// everything is local and nothing is sent.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "hybrid/dist/comm.h"
#include "hybrid/io/safetensors.h"

namespace hybrid::dist {

class GradSync {
 public:
  GradSync(Comm* comm, std::vector<std::pair<std::string, at::Tensor>> params, int zero_stage, int64_t bucket_bytes);
  ~GradSync();
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  bool owns(size_t i) const { return owner_[i] == rank(); }
  // The parameters this rank's optimizer steps.
  std::vector<std::pair<std::string, at::Tensor>> owned() const;
  // Before each micro batch's backward; `last` marks the step's final one.
  void prepare_backward(bool last);
  // Finishes the reductions (starting any whose gradients never came: those count as zeros);
  // returns this rank's share of the squared global gradient norm, then of each of `kinds`
  // groups' (kind_of[i]: parameter i's group; none without kinds): [1 + kinds] of the gradients'
  // dtype and device, the sums of squares of the gradients it owns under ZeRO, else (every rank
  // holding every gradient) the whole on rank 0 and zero elsewhere. Summed over ranks they are the
  // squared norms at any stage: the trainer sums them with the loss in one all-reduce and one read.
  at::Tensor reduce_gradients(const std::vector<int64_t>& kind_of = {}, int64_t kinds = 0);
  void broadcast_parameters();  // owners -> everyone (no-op at stage 0 or one rank)
  // Per-parameter state (the optimizer's, `local` on each parameter's owner) laid out as one
  // checkpoint file that every owner writes its share of (io::write_safetensors_share): for each
  // parameter in order, blank_state's entries, this rank's own tensors where it is the writer and
  // meta stand-ins elsewhere. Nothing travels between ranks (gathering the state on rank 0 put
  // 59 GB of 7b.yaml's AdamW state in its host memory). At stage 0 every rank holds the whole
  // state and rank 0 writes it. blank_state(name, param) names one parameter's entries with their
  // shapes; it is called on meta tensors, so it allocates nothing.
  using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
  using BlankState = std::function<NamedTensors(const std::string&, const at::Tensor&)>;
  io::ShardedTensors state_file(const NamedTensors& local, const BlankState& blank_state) const;

  int bucket_count() const { return static_cast<int>(buckets_.size()); }
  // Buckets of the last step whose reduction started during backward rather than after it.
  int started_during_backward() const { return started_during_backward_; }

 private:
  struct Bucket {
    std::vector<size_t> members;  // parameter indices
    int owner = -1;               // where stage 2 reduces to
    size_t pending = 0;           // gradients not yet accumulated in this backward
    at::Tensor flat;              // the gradients, flattened, while they travel
    Comm::Wait wait;
  };
  static constexpr size_t kInFlight = 2;  // buckets reducing at once
  void gradient_ready(size_t i);          // the post-accumulate-grad hook
  void start_ready_buckets();
  void start(Bucket& b);
  void finish(Bucket& b);  // wait for its reduction and put the result in place
  std::vector<size_t> owned_with_gradients() const;  // the parameters this rank owns that have gradients
  std::vector<at::Tensor> owned_gradients() const;     // their gradients: what this rank's optimizer reads
  void finish_all();
  int rank() const { return comm_ ? comm_->rank() : 0; }

  Comm* comm_;
  std::vector<std::pair<std::string, at::Tensor>> params_;
  std::vector<int> owner_;
  int zero_stage_;
  int64_t bucket_bytes_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;
  bool armed_ = false;
  size_t next_ = 0;  // the first bucket not started
  int started_during_backward_ = 0;
};

}  // namespace hybrid::dist
