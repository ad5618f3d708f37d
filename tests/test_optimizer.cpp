// train::AdamW against AdamW written out in float64: three steps with a clipping factor, the
// decay and no-decay groups, a parameter without a gradient (skipped, its step count unmoved), on
// CPU (ATen's fused AdamW) and on CUDA (our kernel, 16-byte and one-element accesses; skipped
// without a device); a hundred tensors of mixed sizes the same way. And the casts the optimizer
// writes into the weight-cast cache.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "hybrid/model/weight_casts.h"
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

// Takes the first decay.size() of params through steps of `opt` and of AdamW in float64 side by
// side (a fresh random gradient each a step, transposed views for 2-D parameters where
// `strided_grads`; at step t the learning rate lrs[t - 1] and clipping factor scales[t - 1];
// decay[i] the weight decay of parameter i), then checks each against its float64 twin.
void step_beside_float64(hybrid::train::AdamW& opt, std::vector<std::pair<std::string, at::Tensor>>& params,
                         const std::vector<double>& decay, const std::vector<double>& lrs,
                         const std::vector<double>& scales, const hybrid::OptimizerConfig& cfg,
                         bool strided_grads = false) {
  std::vector<Reference> ref;
  for (size_t i = 0; i < decay.size(); ++i) {
    const at::Tensor& p = params[i].second;
    ref.push_back({p.to(at::kDouble), at::zeros_like(p, at::kDouble), at::zeros_like(p, at::kDouble)});
  }
  for (size_t t = 1; t <= lrs.size(); ++t) {
    for (size_t i = 0; i < decay.size(); ++i) {
      const at::Tensor& p = params[i].second;
      at::Tensor g = strided_grads && p.dim() == 2 ? at::randn({p.size(1), p.size(0)}, p.options()).t()
                                                   : at::randn_like(p);
      params[i].second.mutable_grad() = g;
      reference_step(ref[i], g, lrs[t - 1], decay[i], scales[t - 1], static_cast<int>(t), cfg);
    }
    opt.step(lrs[t - 1], scales[t - 1]);
  }
  for (size_t i = 0; i < decay.size(); ++i) {
    const at::Tensor& p = params[i].second;
    const at::Tensor err = (p.to(at::kDouble) - ref[i].p).abs().max();
    EXPECT_LT(err.item<double>(), 2e-6) << params[i].first << " (" << p.numel() << ") on " << p.device();
  }
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
  const at::Tensor idle_before = params[2].second.clone();
  hybrid::train::AdamW opt(params, cfg);
  step_beside_float64(opt, params, {cfg.weight_decay, 0.0}, {1e-2, 3e-3, 5e-3}, {0.5, 1.0, 0.25}, cfg);
  for (const auto& [name, s] : opt.state())
    if (name.rfind("step.", 0) == 0)
      EXPECT_EQ(s.item<float>(), name == "step.idle.weight" ? 0.f : 3.f) << name << " on " << device;
  EXPECT_TRUE(params[2].second.equal(idle_before)) << "a parameter without a gradient is left alone";
}

// Cached casts of updated weights are written by the step and reused, bit for bit the casts of the
// new weights (a stacked pair with padding rows, whose second weight sits 36 bytes in: one
// element a thread on CUDA; a weight alone: 16-byte accesses); a cached weight the step did not
// update is forgotten.
void check_cached_casts(at::Device device) {
  at::manual_seed(4);
  hybrid::set_weight_cast_cache(true);
  hybrid::forget_weight_casts();
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor a = at::randn({3, 6}, options), b = at::randn({4, 6}, options), c = at::randn({4, 8}, options),
             idle = at::randn({2, 8}, options);
  const at::Tensor pair = hybrid::weights_in_compute_dtype({a, b}, at::kBFloat16, 3);
  const at::Tensor alone = hybrid::weights_in_compute_dtype({c}, at::kBFloat16, 0);
  hybrid::weights_in_compute_dtype({idle}, at::kBFloat16, 0);
  ASSERT_EQ(hybrid::weight_casts_cached(), 3u);
  hybrid::train::AdamW opt({{"a.weight", a}, {"b.weight", b}, {"c.weight", c}, {"idle.weight", idle}},
                           hybrid::OptimizerConfig{});
  for (at::Tensor* p : {&a, &b, &c}) p->mutable_grad() = at::randn(p->sizes(), options);
  opt.step(1e-2, 0.5);
  EXPECT_EQ(hybrid::weight_casts_cached(), 2u) << "idle's entry is forgotten on " << device;
  const at::Tensor pair_after = hybrid::weights_in_compute_dtype({a, b}, at::kBFloat16, 3);
  const at::Tensor alone_after = hybrid::weights_in_compute_dtype({c}, at::kBFloat16, 0);
  EXPECT_TRUE(pair_after.is_same(pair) && alone_after.is_same(alone)) << "reused, not recast, on " << device;
  const at::Tensor padding = at::zeros({3, 6}, options.dtype(at::kBFloat16));
  EXPECT_TRUE(pair_after.equal(at::cat({a.to(at::kBFloat16), b.to(at::kBFloat16), padding}))) << device;
  EXPECT_TRUE(alone_after.equal(c.to(at::kBFloat16))) << device;
  hybrid::forget_weight_casts();
}

// More tensors than one CUDA launch lists (kernels/adamw.cu: 48), of sizes that take 16-byte and
// one-element accesses and that span several blocks of 4096 elements or end inside one: each
// against its own float64 step. Besides them, on CUDA, two tensors each past what a launch waits
// for (4096 blocks) and same-shaped 2-D ones with transposed gradients: their contiguous copies
// are temporaries a list must hold until it is launched (freed early, the next copy would take
// the same memory and every tensor of the list would read the last gradient).
void check_many_tensors(at::Device device) {
  at::manual_seed(5);
  hybrid::OptimizerConfig cfg;
  cfg.weight_decay = 0.1;
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  std::vector<std::pair<std::string, at::Tensor>> params;
  for (int i = 0; i < 100; ++i)
    params.emplace_back("layers." + std::to_string(i) + ".weight", at::randn({(i % 7) * 1500 + i + 3}, options));
  if (device.is_cuda()) {
    for (int i = 0; i < 2; ++i) params.emplace_back("large." + std::to_string(i), at::randn({4096 * 4096 + 5}, options));
    for (int i = 0; i < 6; ++i) params.emplace_back("square." + std::to_string(i), at::randn({96, 64}, options));
  }
  hybrid::train::AdamW opt(params, cfg);
  step_beside_float64(opt, params, std::vector<double>(params.size(), cfg.weight_decay), {1e-2, 1e-2}, {0.5, 0.5}, cfg,
                      /*strided_grads=*/true);
}

TEST(AdamW, MatchesFloat64OnCpu) { check_against_float64(at::kCPU); }

TEST(AdamW, ManyTensorsOnCpu) { check_many_tensors(at::kCPU); }

TEST(AdamW, WritesTheCachedCastsOfWhatItUpdates) { check_cached_casts(at::kCPU); }

TEST(AdamWCuda, MatchesFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  check_against_float64(at::kCUDA);
}

TEST(AdamWCuda, ManyTensors) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  check_many_tensors(at::kCUDA);
}

TEST(AdamWCuda, WritesTheCachedCastsOfWhatItUpdates) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  check_cached_casts(at::kCUDA);
}

}  // namespace
