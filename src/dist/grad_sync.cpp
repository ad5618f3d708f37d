#include "hybrid/dist/grad_sync.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <map>

namespace hybrid::dist {

GradSync::GradSync(Comm* comm, std::vector<std::pair<std::string, at::Tensor>> params, int zero_stage, int64_t bucket_mb)
    : comm_(comm), params_(std::move(params)), zero_stage_(comm ? zero_stage : 0), bucket_bytes_(bucket_mb << 20) {
  const int world = comm_ ? comm_->world_size() : 1;
  std::vector<int64_t> load(world, 0);
  for (const auto& [name, p] : params_) {
    const int owner = zero_stage_ == 0 ? rank() : static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    load[owner] += p.numel();
    owner_.push_back(owner);
  }
}

std::vector<std::pair<std::string, at::Tensor>> GradSync::owned() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i)
    if (owns(i)) out.push_back(params_[i]);
  return out;
}

std::vector<at::Tensor> GradSync::grads_of_owner(int owner) {
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].second;
    if (owner_[i] != owner && owner >= 0) continue;
    // Every rank must send the same tensors: a parameter without a gradient contributes zeros.
    if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
    grads.push_back(p.grad());
  }
  return grads;
}

double GradSync::reduce_gradients() {
  if (comm_) {
    if (zero_stage_ < 2) {
      comm_->all_reduce_mean(grads_of_owner(-1), bucket_bytes_);
    } else {
      for (int owner = 0; owner < comm_->world_size(); ++owner)
        comm_->reduce_mean(grads_of_owner(owner), owner, bucket_bytes_);
      for (size_t i = 0; i < params_.size(); ++i)
        if (!owns(i)) params_[i].second.mutable_grad().reset();
    }
  }
  // Each rank sums the squares of the gradients it owns; the sum over ranks is the global norm.
  std::vector<at::Tensor> mine;
  for (size_t i = 0; i < params_.size(); ++i)
    if (owns(i) && params_[i].second.grad().defined()) mine.push_back(params_[i].second.grad());
  double sq = 0;
  if (!mine.empty()) sq = at::stack(at::_foreach_norm(mine, 2.0)).pow(2).sum().item<double>();
  if (comm_ && zero_stage_ > 0) sq = comm_->all_reduce_sum(sq);
  return std::sqrt(sq);
}

void GradSync::scale_owned_gradients(double factor) {
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < params_.size(); ++i)
    if (owns(i) && params_[i].second.grad().defined()) grads.push_back(params_[i].second.grad());
  if (!grads.empty()) at::_foreach_mul_(grads, factor);
}

void GradSync::broadcast_parameters() {
  if (!comm_ || zero_stage_ == 0) return;
  at::NoGradGuard no_grad;
  for (int owner = 0; owner < comm_->world_size(); ++owner) {
    std::vector<at::Tensor> tensors;
    for (size_t i = 0; i < params_.size(); ++i)
      if (owner_[i] == owner) tensors.push_back(params_[i].second);
    comm_->broadcast(tensors, owner, bucket_bytes_);
  }
}

std::vector<std::pair<std::string, at::Tensor>> GradSync::gather_owned_state(
    const std::vector<std::pair<std::string, at::Tensor>>& local, const BlankState& blank_state) {
  if (!comm_ || zero_stage_ == 0) return local;
  std::map<std::string, at::Tensor> by_name(local.begin(), local.end());
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (int owner = 0; owner < comm_->world_size(); ++owner) {
    std::vector<at::Tensor> tensors;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (owner_[i] != owner) continue;
      for (auto& [name, blank] : blank_state(params_[i].first, params_[i].second)) {
        auto it = by_name.find(name);
        out.emplace_back(name, it != by_name.end() ? it->second.clone() : blank);
        tensors.push_back(out.back().second);
      }
    }
    comm_->broadcast(tensors, owner, bucket_bytes_);
  }
  return out;
}

}  // namespace hybrid::dist
