#include "hybrid/dist/grad_sync.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <map>

#include "hybrid/error.h"

namespace hybrid::dist {

namespace {

// Calls back into GradSync once backward has accumulated a parameter's gradient.
struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  std::function<void()> ready;
  explicit ReadyHook(std::function<void()> f) : ready(std::move(f)) {}
  void operator()(const torch::autograd::Variable&) override { ready(); }
};

}  // namespace

GradSync::GradSync(Comm* comm, std::vector<std::pair<std::string, at::Tensor>> params, int zero_stage, int64_t bucket_bytes)
    : comm_(comm), params_(std::move(params)), zero_stage_(comm ? zero_stage : 0), bucket_bytes_(bucket_bytes) {
  const int world = comm_ ? comm_->world_size() : 1;
  int64_t total = 0, before = 0;
  for (const auto& [name, p] : params_) total += p.numel();
  for (const auto& [name, p] : params_) {  // the owner of a parameter's midpoint in the run of all
    const int64_t mid = before + p.numel() / 2;
    owner_.push_back(zero_stage_ == 0 ? rank() : static_cast<int>(std::min<int64_t>(world - 1, mid * world / std::max<int64_t>(total, 1))));
    before += p.numel();
  }
  if (!comm_) return;
  bucket_of_.resize(params_.size());
  int64_t bytes = 0;
  for (size_t i = params_.size(); i-- > 0;) {
    const at::Tensor& p = params_[i].second;
    if (buckets_.empty() || bytes + p.nbytes() > bucket_bytes_ || owner_[i] != buckets_.back().owner) {
      buckets_.emplace_back().owner = owner_[i];
      bytes = 0;
    }
    buckets_.back().members.push_back(i);
    bucket_of_[i] = buckets_.size() - 1;
    bytes += p.nbytes();
    torch::autograd::impl::set_post_acc_grad_hooks(p, std::make_unique<ReadyHook>([this, i] { gradient_ready(i); }));
  }
}

GradSync::~GradSync() {
  if (comm_)
    for (auto& [name, p] : params_) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

std::vector<std::pair<std::string, at::Tensor>> GradSync::owned() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i)
    if (owns(i)) out.push_back(params_[i]);
  return out;
}

void GradSync::prepare_backward(bool last) {
  if (!comm_) return;
  finish_all();  // what the previous micro batch left in flight (ZeRO-2)
  armed_ = last || zero_stage_ == 2;
  if (!armed_) return;
  for (auto& b : buckets_) b.pending = b.members.size();
  next_ = 0;
  if (last) started_during_backward_ = 0;
}

void GradSync::gradient_ready(size_t i) {
  if (!armed_) return;
  if (--buckets_[bucket_of_[i]].pending == 0) {
    const size_t before = next_;
    start_ready_buckets();
    started_during_backward_ += static_cast<int>(next_ - before);
  }
}

void GradSync::start_ready_buckets() {
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) {
    start(buckets_[next_]);
    // Bound what travels at once: each bucket in flight holds a copy of its gradients.
    if (next_ >= kInFlight) finish(buckets_[next_ - kInFlight]);
    ++next_;
  }
}

void GradSync::start(Bucket& b) {
  std::vector<at::Tensor> flat;
  for (size_t i : b.members) {
    at::Tensor& p = params_[i].second;
    // Every rank must send the same tensors: a parameter without a gradient contributes zeros.
    flat.push_back(p.grad().defined() ? p.grad().reshape(-1) : at::zeros({p.numel()}, p.options()));
    // ZeRO-2: the flat copy is all that is kept; the owner gets the sum back.
    if (zero_stage_ == 2) p.mutable_grad().reset();
  }
  b.flat = at::cat(flat);
  b.wait = zero_stage_ < 2 ? comm_->start_all_reduce_sum(b.flat) : comm_->start_reduce_sum(b.flat, b.owner);
}

void GradSync::finish(Bucket& b) {
  if (!b.wait) return;
  b.wait();
  at::NoGradGuard no_grad;
  int64_t offset = 0;
  for (size_t i : b.members) {
    at::Tensor& p = params_[i].second;
    at::Tensor sum = b.flat.narrow(0, offset, p.numel()).view(p.sizes());
    offset += p.numel();
    if (zero_stage_ < 2) {
      sum.div_(comm_->world_size());
      if (p.grad().defined()) p.mutable_grad().copy_(sum);
      else p.mutable_grad() = sum.clone();  // it had none here; other ranks' count
    } else if (b.owner == rank()) {
      p.mutable_grad() = sum;  // backward adds the next micro batch's into it
    }
  }
  b.flat = at::Tensor();
  b.wait = nullptr;
}

void GradSync::finish_all() {
  for (auto& b : buckets_) b.pending = 0;  // buckets whose gradients never came are sent as zeros
  if (armed_) start_ready_buckets();
  armed_ = false;
  for (auto& b : buckets_) finish(b);
}

at::Tensor GradSync::reduce_gradients(const std::vector<int64_t>& kind_of, int64_t kinds) {
  if (comm_) {
    if (!armed_) prepare_backward(true);  // nothing started during backward
    finish_all();
    if (zero_stage_ == 2) {  // sums over ranks and micro batches
      const std::vector<at::Tensor> grads = owned_gradients();
      if (!grads.empty()) at::_foreach_mul_(grads, 1.0 / comm_->world_size());
    }
  }
  std::vector<at::Tensor> mine;
  std::vector<int64_t> kind_of_mine;
  for (size_t i : owned_with_gradients())
    mine.push_back(params_[i].second.grad()), kind_of_mine.push_back(kinds ? kind_of.at(i) : 0);
  const bool counted = zero_stage_ > 0 || rank() == 0;  // at stage 0 rank 0 speaks for all
  if (mine.empty() || !counted) return at::zeros({1 + kinds}, params_.front().second.options());
  const std::vector<at::Tensor> norms = at::_foreach_norm(mine, 2.0);
  std::vector<at::Tensor> out = {at::stack(norms).pow(2).sum()};
  for (int64_t k = 0; k < kinds; ++k) {  // from the same norms: no gradient is read twice
    std::vector<at::Tensor> of_kind;
    for (size_t j = 0; j < norms.size(); ++j)
      if (kind_of_mine[j] == k) of_kind.push_back(norms[j]);
    out.push_back(of_kind.empty() ? at::zeros({}, out[0].options()) : at::stack(of_kind).pow(2).sum());
  }
  return at::stack(out);
}

std::vector<size_t> GradSync::owned_with_gradients() const {
  std::vector<size_t> at;
  for (size_t i = 0; i < params_.size(); ++i)
    if (owns(i) && params_[i].second.grad().defined()) at.push_back(i);
  return at;
}

std::vector<at::Tensor> GradSync::owned_gradients() const {
  std::vector<at::Tensor> grads;
  for (size_t i : owned_with_gradients()) grads.push_back(params_[i].second.grad());
  return grads;
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

io::ShardedTensors GradSync::state_file(const NamedTensors& local, const BlankState& blank_state) const {
  const bool sharded = comm_ && zero_stage_ > 0;
  std::map<std::string, at::Tensor> by_name(local.begin(), local.end());
  io::ShardedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const int writer = sharded ? owner_[i] : 0;
    const at::Tensor& p = params_[i].second;
    for (auto& [name, shape_only] : blank_state(params_[i].first, at::empty(p.sizes(), p.options().device(at::kMeta)))) {
      out.writer.push_back(writer);
      if (writer != rank()) {
        out.entries.emplace_back(name, shape_only);
        continue;
      }
      auto it = by_name.find(name);
      if (it == by_name.end()) throw Error("rank " + std::to_string(rank()) + " holds no state '" + name + "' for its parameter");
      out.entries.emplace_back(name, it->second.detach());
    }
  }
  return out;
}

}  // namespace hybrid::dist
