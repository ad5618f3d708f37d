// Processes and their process group: the rank/world environment as torchrun, Slurm or our own
// --nproc-per-node launcher set it, a TCPStore rendezvous, and NCCL (CUDA) or Gloo (CPU)
// collectives, with a timeout so a dead rank stops the others with an error instead of a hang.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/intrusive_ptr.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace c10d {
class Backend;
class Store;
}

namespace hybrid::dist {

struct DistEnv {
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  // torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), else Slurm (SLURM_PROCID,
  // SLURM_NTASKS, SLURM_LOCALID with MASTER_ADDR/MASTER_PORT), else a single process.
  static DistEnv from_environment();
};

class Comm {
 public:
  Comm(const DistEnv& env, bool cuda, std::chrono::seconds timeout);
  ~Comm();
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }

  // In place on a list of tensors on one device, flattened into buckets of at most
  // bucket_bytes so few large messages travel instead of many small ones.
  void broadcast(const std::vector<at::Tensor>& tensors, int root, int64_t bucket_bytes);
  void barrier();

  // Short messages between ranks through the rendezvous's key-value store, from any thread (a
  // background save's) and beside any collective: post leaves `value` under `key`; take waits up
  // to `timeout` for it (looking every 20 ms), removes it and returns it (nothing at the timeout).
  void post(const std::string& key, const std::string& value);
  std::optional<std::string> take(const std::string& key, std::chrono::milliseconds timeout);

  // Start a sum over ranks of one tensor, in place (on `root` only for the reduce), and return
  // a function that waits for it. Every rank must start collectives in the same order.
  // Element-wise sums over ranks of a few numbers: one all-reduce on `device` (NCCL's), read back.
  std::vector<double> sum_over_ranks(const std::vector<double>& values, at::Device device);
  using Wait = std::function<void()>;
  Wait start_all_reduce_sum(const at::Tensor& t);
  Wait start_reduce_sum(const at::Tensor& t, int root);

 private:
  template <class Op>
  void bucketed(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes, Op op);
  // [begin, end) runs of tensors of one dtype and at most bucket_bytes each (a larger tensor alone).
  static std::vector<std::pair<size_t, size_t>> buckets(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes);
  int rank_, world_size_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::shared_ptr<c10d::Backend> backend_;
};

}  // namespace hybrid::dist
