#include "hybrid/train/optimizer.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <map>
#include <numeric>

#include "hybrid/error.h"
#include "hybrid/model/weight_casts.h"
#include "hybrid/train/muon.h"

#ifdef HYBRID_CUDA_KERNELS
#include "adamw_cuda.h"
#endif

namespace hybrid::train {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// One group's parameters with a gradient, and their state.
struct Tensors {
  std::vector<at::Tensor> params, grads, m, v, steps;
};

struct Hyper {
  double lr, beta1, beta2, weight_decay, eps, grad_scale;
};

bool uses_kernel(const at::Tensor& param) {
#ifdef HYBRID_CUDA_KERNELS
  return param.is_cuda();
#else
  (void)param;
  return false;
#endif
}

// Our kernel (kernels/adamw.cu, the group's tensors in lists), writing the first bf16 cast the
// next forward would read; any other cached cast is copied once its parameter's list is queued.
void update_with_kernel(const Tensors& t, const Hyper& h) {
#ifdef HYBRID_CUDA_KERNELS
  const std::vector<std::vector<CachedCast>> all_casts = cached_casts_of(t.params);
  AdamWLaunches launches(h.lr, h.beta1, h.beta2, h.weight_decay, h.eps, h.grad_scale, t.params[0].device());
  std::vector<std::pair<CachedCast, at::Tensor>> other_casts;  // (cast, parameter)
  for (size_t i = 0; i < t.params.size(); ++i) {
    const std::vector<CachedCast>& casts = all_casts[i];
    auto bf16 = std::find_if(casts.begin(), casts.end(),
                             [](const CachedCast& c) { return c.stacked.scalar_type() == at::kBFloat16; });
    launches.add({t.params[i], t.grads[i].contiguous(), t.m[i], t.v[i], t.steps[i],
                  bf16 == casts.end() ? at::Tensor() : bf16->view()});
    for (auto c = casts.begin(); c != casts.end(); ++c)
      if (c != bf16) other_casts.emplace_back(*c, t.params[i]);
  }
  launches.launch();
  for (auto& [cast, param] : other_casts) cast.view().copy_(param);
#else
  (void)t, (void)h;
  throw Error("update_with_kernel: built without the CUDA kernels");
#endif
}

// The updated weights copied into their cached casts (where our AdamW kernel does not write them).
void copy_into_cached_casts(const std::vector<at::Tensor>& params) {
  const std::vector<std::vector<CachedCast>> all_casts = cached_casts_of(params);
  for (size_t i = 0; i < params.size(); ++i)
    for (const CachedCast& c : all_casts[i]) c.view().copy_(params[i]);
}

// ATen's fused AdamW (CPU) after the clipping's multiply; the cached casts copied.
void update_with_aten(const Tensors& t, const Hyper& h) {
  if (h.grad_scale != 1.0) at::_foreach_mul_(t.grads, h.grad_scale);
  at::_fused_adamw_(t.params, t.grads, t.m, t.v, {}, t.steps, h.lr, h.beta1, h.beta2, h.weight_decay, h.eps,
                    /*amsgrad=*/false, /*maximize=*/false);
  copy_into_cached_casts(t.params);
}

}  // namespace

bool Optimizer::decays(const std::string& name, const OptimizerConfig& cfg) {
  if (name.find("embed_tokens") != std::string::npos) return cfg.decay_embeddings;
  if (ends_with(name, "norm.weight")) return cfg.decay_norms;  // every RMSNorm, QK-norm, o_norm
  if (ends_with(name, "A_log") || ends_with(name, "dt_bias")) return cfg.decay_gdn_params;
  if (ends_with(name, ".bias")) return false;
  return true;
}

bool Optimizer::uses_muon(const std::string& name, const at::Tensor& param) const {
  return cfg_.type == "muon" && muon_takes(name, param);
}

std::vector<std::pair<std::string, at::Tensor>> Optimizer::blank_state(const std::string& name, const at::Tensor& p) const {
  if (uses_muon(name, p)) return {{"momentum." + name, at::zeros_like(p, at::MemoryFormat::Contiguous)}};
  return {{"exp_avg." + name, at::zeros_like(p, at::MemoryFormat::Contiguous)},
          {"exp_avg_sq." + name, at::zeros_like(p, at::MemoryFormat::Contiguous)},
          {"step." + name, at::zeros({}, p.options().dtype(at::kFloat))}};
}

Optimizer::Optimizer(std::vector<std::pair<std::string, at::Tensor>> params, const OptimizerConfig& cfg) : cfg_(cfg) {
  // AdamW's decay and no-decay groups, then Muon's.
  for (const bool muon : {false, true})
    for (const double weight_decay : {cfg.weight_decay, 0.0}) groups_.push_back({weight_decay, muon});
  for (auto& [name, p] : params) {
    Group& g = groups_[(uses_muon(name, p) ? 2 : 0) + (decays(name, cfg) ? 0 : 1)];
    auto blank = blank_state(name, p);
    g.names.push_back(name);
    g.params.push_back(p);
    g.exp_avg.push_back(blank[0].second);
    if (g.muon) continue;
    g.exp_avg_sq.push_back(blank[1].second);
    g.steps.push_back(blank[2].second);
  }
}

// Muon's parameters by batches of one shape (muon_batches), their cached casts copied after. A
// batch's step holds about five float32 copies of it at once: 2^26 elements bound that to about
// 1.3 GB (7b.yaml's batches: four attention matrices, six GDN q or k, one MLP matrix; 1b.yaml's
// sixteen attention and four MLP matrices).
void Optimizer::muon_steps(const Group& g, double lr, double grad_scale, std::vector<at::Tensor>& updated) {
  constexpr int64_t max_batch_elements = int64_t{1} << 26;
  Tensors t;
  for (size_t i = 0; i < g.params.size(); ++i) {
    if (!g.params[i].grad().defined()) continue;
    t.params.push_back(g.params[i]);
    t.grads.push_back(g.params[i].grad());
    t.m.push_back(g.exp_avg[i]);
  }
  for (const std::vector<size_t>& batch : muon_batches(t.params, max_batch_elements)) {
    std::vector<at::Tensor> params, grads, momenta;
    for (const size_t i : batch) params.push_back(t.params[i]), grads.push_back(t.grads[i]), momenta.push_back(t.m[i]);
    muon_step(params, grads, momenta, lr, g.weight_decay, grad_scale, cfg_.muon);
  }
  copy_into_cached_casts(t.params);
  updated.insert(updated.end(), t.params.begin(), t.params.end());
}

void Optimizer::step(double lr, double grad_scale) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> updated;
  for (auto& g : groups_) {
    if (g.muon) {
      muon_steps(g, lr, grad_scale, updated);
      continue;
    }
    // Largest first: the first list is launched as soon as it is listed and the host lists the
    // rest while the GPU runs it; the small tensors (norm weights, biases, A_log) end up together
    // in full lists. Each element's update is the same in any order.
    std::vector<size_t> order(g.params.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return g.params[a].numel() > g.params[b].numel(); });
    Tensors t;
    for (const size_t i : order) {
      if (!g.params[i].grad().defined()) continue;
      t.params.push_back(g.params[i]);
      t.grads.push_back(g.params[i].grad());
      t.m.push_back(g.exp_avg[i]);
      t.v.push_back(g.exp_avg_sq[i]);
      t.steps.push_back(g.steps[i]);
    }
    if (t.params.empty()) continue;
    const Hyper h{lr, cfg_.betas[0], cfg_.betas[1], g.weight_decay, cfg_.eps, grad_scale};
    at::_foreach_add_(t.steps, 1);  // both updates expect the step count already advanced
    if (uses_kernel(t.params[0])) update_with_kernel(t, h);
    else update_with_aten(t, h);
    // Counted as the in-place updates they are (neither update bumps the counters itself; the
    // weight-cast cache and autograd read them).
    for (const std::vector<at::Tensor>* list : {&t.params, &t.m, &t.v})
      for (const at::Tensor& x : *list) x.unsafeGetTensorImpl()->bump_version();
    updated.insert(updated.end(), t.params.begin(), t.params.end());
  }
  keep_casts_of(updated);  // entries with a weight not updated here are recast by the next forward
}

std::vector<std::pair<const char*, at::Tensor>> Optimizer::entries(const Group& g, size_t i) {
  if (g.muon) return {{"momentum.", g.exp_avg[i]}};
  return {{"exp_avg.", g.exp_avg[i]}, {"exp_avg_sq.", g.exp_avg_sq[i]}, {"step.", g.steps[i]}};
}

std::vector<std::pair<std::string, at::Tensor>> Optimizer::state() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& g : groups_)
    for (size_t i = 0; i < g.names.size(); ++i)
      for (const auto& [prefix, tensor] : entries(g, i)) out.emplace_back(prefix + g.names[i], tensor);
  return out;
}

void Optimizer::load_state(const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& path) {
  at::NoGradGuard no_grad;
  std::map<std::string, at::Tensor> by_name(state.begin(), state.end());
  for (const auto& g : groups_)
    for (size_t i = 0; i < g.names.size(); ++i) {
      for (auto [prefix, target] : entries(g, i)) {  // handles: copy_ writes the state itself
        auto it = by_name.find(prefix + g.names[i]);
        if (it == by_name.end()) {
          const bool other_kind = by_name.count((g.muon ? "exp_avg." : "momentum.") + g.names[i]) > 0;
          throw Error(path + ": optimizer state '" + prefix + g.names[i] + "' is missing" +
                      (other_kind ? std::string(" (the checkpoint holds ") + (g.muon ? "AdamW" : "Muon") +
                                        "'s state for it: saved under another optimizer.type)"
                                  : ""));
        }
        if (it->second.sizes() != target.sizes())
          throw Error(path + ": optimizer state '" + it->first + "' has shape " + c10::str(it->second.sizes()) +
                      ", expected " + c10::str(target.sizes()));
        target.copy_(it->second);
      }
    }
}

}  // namespace hybrid::train
