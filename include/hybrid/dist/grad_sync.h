// Data parallelism for the trainer: after the last micro batch's backward, gradients are
// averaged over ranks in buckets; with ZeRO the optimizer state is sharded by parameter.
//   stage 0: all-reduce every gradient; every rank steps every parameter.
//   stage 1: all-reduce; each rank steps (and keeps AdamW state for) only the parameters it
//            owns, then owners broadcast them.
//   stage 2: gradients are reduced to their owner only (others drop theirs), then as stage 1.
// Ownership balances parameter counts greedily in name order, so it is the same on every rank.
// With one process everything is local and nothing is sent.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "hybrid/dist/comm.h"

namespace hybrid::dist {

class GradSync {
 public:
  GradSync(Comm* comm, std::vector<std::pair<std::string, at::Tensor>> params, int zero_stage, int64_t bucket_mb);
  bool owns(size_t i) const { return owner_[i] == rank(); }
  // The parameters this rank's optimizer steps.
  std::vector<std::pair<std::string, at::Tensor>> owned() const;
  // Averages gradients over ranks; returns the global gradient norm (the same on every rank).
  double reduce_gradients();
  void scale_owned_gradients(double factor);
  void broadcast_parameters();  // owners -> everyone (no-op at stage 0 or one rank)
  // Gathers per-parameter state (the optimizer's, held by each parameter's owner) onto every
  // rank. blank_state(name, param) gives the state entries of one parameter as zeros of the
  // right shapes: what a rank that does not own it receives into.
  using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
  using BlankState = std::function<NamedTensors(const std::string&, const at::Tensor&)>;
  NamedTensors gather_owned_state(const NamedTensors& local, const BlankState& blank_state);

 private:
  int rank() const { return comm_ ? comm_->rank() : 0; }
  // Gradients of the parameters `owner` owns (all for -1); missing ones become zeros.
  std::vector<at::Tensor> grads_of_owner(int owner);
  Comm* comm_;
  std::vector<std::pair<std::string, at::Tensor>> params_;
  std::vector<int> owner_;
  int zero_stage_;
  int64_t bucket_bytes_;
};

}  // namespace hybrid::dist
