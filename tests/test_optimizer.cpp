// train::AdamW against AdamW written out in float64: three steps with a clipping factor, the
// decay and no-decay groups, a parameter without a gradient (skipped, its step count unmoved), on
// CPU (ATen's fused AdamW) and on CUDA (our kernel, 16-byte and one-element accesses; skipped
// without a device).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "hybrid/train/optimizer.h"

namespace {

struct Reference {
  at::Tensor p, m, v;
};

// One float64 AdamW step of `r` at step count t.
void reference_step(Reference& r, const at::Tensor& grad, double lr, double wd, double scale, int t,
                    const hybrid::OptimizerConfig& cfg) {
  const double b1 = cfg.betas[0], b2 = cfg.betas[1];
  const at::Tensor g = grad.to(at::kDouble) * scale;
  r.p = r.p * (1 - lr * wd);
  r.m = b1 * r.m + (1 - b1) * g;
  r.v = b2 * r.v + (1 - b2) * g * g;
  r.p = r.p - lr / (1 - std::pow(b1, t)) * r.m / (r.v.sqrt() / std::sqrt(1 - std::pow(b2, t)) + cfg.eps);
}

void check_against_float64(at::Device device) {
  at::manual_seed(3);
  hybrid::OptimizerConfig cfg;
  cfg.weight_decay = 0.1;
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  // Names pick the groups: "*.norm.weight" does not decay. 4104 elements take 16-byte accesses,
  // 37 one element; "idle" never gets a gradient.
  std::vector<std::pair<std::string, at::Tensor>> params = {{"layers.0.mlp.weight", at::randn({4, 1026}, options)},
                                                            {"layers.0.norm.weight", at::randn({37}, options)},
                                                            {"idle.weight", at::randn({8}, options)}};
  std::vector<Reference> ref;
  for (auto& [name, p] : params)
    ref.push_back({p.to(at::kDouble), at::zeros_like(p, at::kDouble), at::zeros_like(p, at::kDouble)});
  const at::Tensor idle_before = params[2].second.clone();
  hybrid::train::AdamW opt(params, cfg);
  const double lrs[] = {1e-2, 3e-3, 5e-3}, scales[] = {0.5, 1.0, 0.25};
  for (int t = 1; t <= 3; ++t) {
    for (int i = 0; i < 2; ++i) {
      at::Tensor g = at::randn(params[i].second.sizes(), options);
      params[i].second.mutable_grad() = g;
      reference_step(ref[i], g, lrs[t - 1], i == 0 ? cfg.weight_decay : 0.0, scales[t - 1], t, cfg);
    }
    opt.step(lrs[t - 1], scales[t - 1]);
  }
  for (int i = 0; i < 2; ++i) {
    const at::Tensor err = (params[i].second.to(at::kDouble) - ref[i].p).abs().max();
    EXPECT_LT(err.item<double>(), 2e-6) << params[i].first << " on " << device;
  }
  for (const auto& [name, s] : opt.state())
    if (name.rfind("step.", 0) == 0)
      EXPECT_EQ(s.item<float>(), name == "step.idle.weight" ? 0.f : 3.f) << name << " on " << device;
  EXPECT_TRUE(params[2].second.equal(idle_before)) << "a parameter without a gradient is left alone";
}

TEST(AdamW, MatchesFloat64OnCpu) { check_against_float64(at::kCPU); }

TEST(AdamWCuda, MatchesFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  check_against_float64(at::kCUDA);
}

}  // namespace
