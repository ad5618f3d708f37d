#include "hybrid/train/optimizer.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <map>

#include "hybrid/error.h"

namespace hybrid::train {

#ifdef HYBRID_CUDA_KERNELS
void adamw_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& step, double lr, double beta1, double beta2,
                     double weight_decay, double eps, double grad_scale);
#endif

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

bool AdamW::decays(const std::string& name, const OptimizerConfig& cfg) {
  if (name.find("embed_tokens") != std::string::npos) return cfg.decay_embeddings;
  if (ends_with(name, "norm.weight")) return cfg.decay_norms;  // every RMSNorm, QK-norm, o_norm
  if (ends_with(name, "A_log") || ends_with(name, "dt_bias")) return cfg.decay_gdn_params;
  if (ends_with(name, ".bias")) return false;
  return true;
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::blank_state(const std::string& name, const at::Tensor& p) {
  return {{"exp_avg." + name, at::zeros_like(p, at::MemoryFormat::Contiguous)},
          {"exp_avg_sq." + name, at::zeros_like(p, at::MemoryFormat::Contiguous)},
          {"step." + name, at::zeros({}, p.options().dtype(at::kFloat))}};
}

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, const OptimizerConfig& cfg) : cfg_(cfg) {
  groups_.resize(2);
  groups_[0].weight_decay = cfg.weight_decay;
  groups_[1].weight_decay = 0;
  for (auto& [name, p] : params) {
    Group& g = groups_[decays(name, cfg) ? 0 : 1];
    auto blank = blank_state(name, p);
    g.names.push_back(name);
    g.params.push_back(p);
    g.exp_avg.push_back(blank[0].second);
    g.exp_avg_sq.push_back(blank[1].second);
    g.steps.push_back(blank[2].second);
  }
}

void AdamW::step(double lr, double grad_scale) {
  at::NoGradGuard no_grad;
  for (auto& g : groups_) {
    std::vector<at::Tensor> params, grads, m, v, steps;
    for (size_t i = 0; i < g.params.size(); ++i) {
      if (!g.params[i].grad().defined()) continue;
      params.push_back(g.params[i]);
      grads.push_back(g.params[i].grad());
      m.push_back(g.exp_avg[i]);
      v.push_back(g.exp_avg_sq[i]);
      steps.push_back(g.steps[i]);
    }
    if (params.empty()) continue;
    at::_foreach_add_(steps, 1);  // both updates expect the step count already advanced
#ifdef HYBRID_CUDA_KERNELS
    if (params[0].is_cuda()) {
      for (size_t i = 0; i < params.size(); ++i) {
        adamw_step_cuda(params[i], grads[i].contiguous(), m[i], v[i], steps[i], lr, cfg_.betas[0], cfg_.betas[1],
                        g.weight_decay, cfg_.eps, grad_scale);
        // Counted as the in-place updates they are (the weight-cast cache and autograd read the
        // counters; ATen's fused AdamW, the CPU path, bumps none: the trainer forgets the casts).
        for (at::Tensor* t : {&params[i], &m[i], &v[i]}) t->unsafeGetTensorImpl()->bump_version();
      }
      continue;
    }
#endif
    if (grad_scale != 1.0) at::_foreach_mul_(grads, grad_scale);
    at::_fused_adamw_(params, grads, m, v, {}, steps, lr, cfg_.betas[0], cfg_.betas[1], g.weight_decay, cfg_.eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  }
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& g : groups_)
    for (size_t i = 0; i < g.names.size(); ++i) {
      out.emplace_back("exp_avg." + g.names[i], g.exp_avg[i]);
      out.emplace_back("exp_avg_sq." + g.names[i], g.exp_avg_sq[i]);
      out.emplace_back("step." + g.names[i], g.steps[i]);
    }
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& path) {
  at::NoGradGuard no_grad;
  std::map<std::string, at::Tensor> by_name(state.begin(), state.end());
  for (auto& g : groups_)
    for (size_t i = 0; i < g.names.size(); ++i)
      for (auto [prefix, target] : {std::pair{"exp_avg.", &g.exp_avg[i]}, std::pair{"exp_avg_sq.", &g.exp_avg_sq[i]},
                                    std::pair{"step.", &g.steps[i]}}) {
        auto it = by_name.find(prefix + g.names[i]);
        if (it == by_name.end()) throw Error(path + ": optimizer state '" + prefix + g.names[i] + "' is missing");
        if (it->second.sizes() != target->sizes())
          throw Error(path + ": optimizer state '" + it->first + "' has shape " + c10::str(it->second.sizes()) +
                      ", expected " + c10::str(target->sizes()));
        target->copy_(it->second);
      }
}

}  // namespace hybrid::train
