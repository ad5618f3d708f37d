// train::AdamW against AdamW written out in float64: three steps with a clipping factor, the
// decay and no-decay groups, a parameter without a gradient (skipped, its step count unmoved), on
// CPU (ATen's fused AdamW) and on CUDA (our kernel, 16-byte and one-element accesses; skipped
// without a device); a hundred tensors of mixed sizes the same way. And the casts the optimizer
// writes into the weight-cast cache. Muon (optimizer.type: muon) the same way: its
// orthogonalization against the SVD's factor, its steps beside float64 ones (AdamW's parameters
// in the same optimizer beside theirs), its state by name and its casts.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "hybrid/error.h"
#include "hybrid/model/hybrid_lm.h"
#include "hybrid/model/size.h"
#include "hybrid/model/weight_casts.h"
#include "hybrid/model/weights.h"
#include "hybrid/train/muon.h"
#include "hybrid/train/optimizer.h"
#include "small_model.h"

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
void step_beside_float64(hybrid::train::Optimizer& opt, std::vector<std::pair<std::string, at::Tensor>>& params,
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
  hybrid::train::Optimizer opt(params, cfg);
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
  hybrid::train::Optimizer opt({{"a.weight", a}, {"b.weight", b}, {"c.weight", c}, {"idle.weight", idle}},
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
  hybrid::train::Optimizer opt(params, cfg);
  step_beside_float64(opt, params, std::vector<double>(params.size(), cfg.weight_decay), {1e-2, 1e-2}, {0.5, 0.5}, cfg,
                      /*strided_grads=*/true);
}

// Newton-Schulz in float64, as muon.h writes it.
at::Tensor orthogonalize_float64(at::Tensor x, int64_t steps) {
  const bool tall = x.size(0) > x.size(1);
  if (tall) x = x.t();
  x = x / (x.norm() + 1e-7);
  for (int64_t i = 0; i < steps; ++i) {
    const at::Tensor A = at::mm(x, x.t());
    x = 3.4445 * x + at::mm(-4.7750 * A + 2.0315 * at::mm(A, A), x);
  }
  return tall ? x.t() : x;
}

// One float64 Muon step of `r` (m: the momentum).
void reference_muon_step(Reference& r, const at::Tensor& grad, double lr, double wd, double scale,
                         const hybrid::MuonConfig& cfg) {
  const at::Tensor g = grad.to(at::kDouble) * scale;
  r.m = cfg.momentum * r.m + g;
  const at::Tensor o = orthogonalize_float64(cfg.nesterov ? g + cfg.momentum * r.m : r.m, cfg.ns_steps);
  r.p = r.p * (1 - lr * wd) - lr * 0.2 * std::sqrt(static_cast<double>(std::max(r.p.size(0), r.p.size(1)))) * o;
}

// In float32 Newton-Schulz follows float64 to float32's rounding; in bfloat16 to about 1%, with the
// same singular vectors and values in the same band.
TEST(Muon, OrthogonalizesTowardsTheSvdFactor) {
  at::manual_seed(6);
  for (const auto& shape : {std::vector<int64_t>{24, 40}, std::vector<int64_t>{40, 24}, std::vector<int64_t>{32, 32}}) {
    const at::Tensor u = at::randn(shape, at::kDouble);
    const auto [U, S, Vh] = at::linalg_svd(u, /*full_matrices=*/false);
    const at::Tensor factor = at::mm(U, Vh), exact = orthogonalize_float64(u, 5);
    for (const auto& [dtype, tolerance] : {std::pair{at::kFloat, 1e-5}, std::pair{at::kBFloat16, 2e-2}}) {
      const at::Tensor o = hybrid::train::orthogonalize(u.to(at::kFloat), 5, dtype);
      ASSERT_EQ(o.sizes(), u.sizes());
      ASSERT_EQ(o.scalar_type(), at::kFloat);
      const at::Tensor o64 = o.to(at::kDouble);
      EXPECT_LT(((o64 - exact).norm() / exact.norm()).item<double>(), tolerance) << shape << " " << dtype;
      // Its singular values near 1, its singular vectors u's: O = U diag(s) V^T.
      const at::Tensor s = at::mm(at::mm(U.t(), o64), Vh.t());
      EXPECT_LT((s - at::diag(at::diagonal(s))).abs().max().item<double>(), tolerance) << shape << " " << dtype;
      EXPECT_GT(at::diagonal(s).min().item<double>(), 0.6) << shape << " " << dtype;
      EXPECT_LT(at::diagonal(s).max().item<double>(), 1.25) << shape << " " << dtype;
      EXPECT_LT(((o64 - factor).norm() / factor.norm()).item<double>(), 0.3) << shape << " " << dtype;
    }
  }
}

// A stack of matrices is orthogonalized each on its own (by its own norm), as one at a time would.
TEST(Muon, OrthogonalizesAStackMatrixByMatrix) {
  at::manual_seed(9);
  for (const bool tall : {false, true}) {
    const at::Tensor u = at::randn({3, tall ? 40 : 24, tall ? 24 : 40}) * at::tensor({1.0f, 10.0f, 0.1f}).view({3, 1, 1});
    const at::Tensor o = hybrid::train::orthogonalize(u, 5, at::kFloat);
    ASSERT_EQ(o.sizes(), u.sizes());
    for (int64_t i = 0; i < 3; ++i)
      EXPECT_LT((o[i] - hybrid::train::orthogonalize(u[i], 5, at::kFloat)).abs().max().item<double>(), 1e-5)
          << "matrix " << i << (tall ? " (tall)" : "");
  }
}

// Batches hold one shape, in the order of their first matrix, and end at the element bound (a
// matrix larger than it alone).
TEST(Muon, BatchesMatricesOfOneShape) {
  const std::vector<at::Tensor> params = {at::empty({4, 8}), at::empty({8, 4}), at::empty({4, 8}), at::empty({4, 8}),
                                          at::empty({16, 16}), at::empty({8, 4})};
  using Batches = std::vector<std::vector<size_t>>;
  EXPECT_EQ(hybrid::train::muon_batches(params, 1000), (Batches{{0, 2, 3}, {1, 5}, {4}}));
  EXPECT_EQ(hybrid::train::muon_batches(params, 64), (Batches{{0, 2}, {1, 5}, {3}, {4}}));
}

// Three steps of an optimizer with optimizer.type: muon beside float64: the blocks' matrices (wide
// and tall, two of one shape in one batch, with and without Nesterov) by Muon, a norm and the embedding by AdamW; then its state
// by name, and the error of loading an AdamW checkpoint's state into it. Newton-Schulz in float32
// (to float32's rounding), then in bfloat16 (the matrices to within a few percent of an update).
void check_muon_against_float64(at::Device device) {
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  for (const auto& [ns_dtype, matrix_tolerance] : {std::pair{"float32", 2e-6}, std::pair{"bfloat16", 2e-4}})
  for (const bool nesterov : {true, false}) {
    at::manual_seed(7);
    hybrid::OptimizerConfig cfg;
    cfg.type = "muon";
    cfg.weight_decay = 0.1;
    cfg.muon.nesterov = nesterov;
    cfg.muon.ns_dtype = ns_dtype;
    std::vector<std::pair<std::string, at::Tensor>> params = {{"model.layers.0.mlp.up_proj.weight", at::randn({12, 20}, options)},
                                                              {"model.layers.0.mlp.down_proj.weight", at::randn({20, 12}, options)},
                                                              {"model.layers.1.mlp.up_proj.weight", at::randn({12, 20}, options)},
                                                              {"model.layers.0.input_layernorm.weight", at::randn({20}, options)},
                                                              {"model.embed_tokens.weight", at::randn({30, 20}, options)}};
    hybrid::train::Optimizer opt(params, cfg);
    std::vector<Reference> ref;
    for (const auto& [name, p] : params) ref.push_back({p.to(at::kDouble), at::zeros_like(p, at::kDouble), at::zeros_like(p, at::kDouble)});
    const std::vector<double> lrs = {1e-2, 3e-3, 5e-3}, scales = {0.5, 1.0, 0.25};
    for (size_t t = 1; t <= lrs.size(); ++t) {
      for (size_t i = 0; i < params.size(); ++i) {
        const at::Tensor g = at::randn_like(params[i].second);
        params[i].second.mutable_grad() = g;
        if (i < 3) reference_muon_step(ref[i], g, lrs[t - 1], cfg.weight_decay, scales[t - 1], cfg.muon);
        else reference_step(ref[i], g, lrs[t - 1], 0.0, scales[t - 1], static_cast<int>(t), cfg);
      }
      opt.step(lrs[t - 1], scales[t - 1]);
    }
    for (size_t i = 0; i < params.size(); ++i)
      EXPECT_LT((params[i].second.to(at::kDouble) - ref[i].p).abs().max().item<double>(), i < 3 ? matrix_tolerance : 2e-6)
          << params[i].first << (nesterov ? " (Nesterov)" : "") << " on " << device << ", Newton-Schulz in " << ns_dtype;
    std::vector<std::string> names;
    for (const auto& [name, s] : opt.state()) names.push_back(name);
    const std::vector<std::string> expected = {"exp_avg.model.layers.0.input_layernorm.weight",
                                               "exp_avg_sq.model.layers.0.input_layernorm.weight",
                                               "step.model.layers.0.input_layernorm.weight",
                                               "exp_avg.model.embed_tokens.weight",
                                               "exp_avg_sq.model.embed_tokens.weight",
                                               "step.model.embed_tokens.weight",
                                               "momentum.model.layers.0.mlp.up_proj.weight",
                                               "momentum.model.layers.0.mlp.down_proj.weight",
                                               "momentum.model.layers.1.mlp.up_proj.weight"};
    EXPECT_EQ(names, expected);
    const auto blank = opt.blank_state(params[0].first, params[0].second);
    ASSERT_EQ(blank.size(), 1u);
    EXPECT_EQ(blank[0].first, "momentum.model.layers.0.mlp.up_proj.weight");
    for (const size_t i : {0, 2})
      EXPECT_LT((ref[i].m - opt.state()[6 + i].second.to(at::kDouble)).abs().max().item<double>(), 1e-5);
  }
}

TEST(Muon, MatchesFloat64OnCpu) {
  check_muon_against_float64(at::kCPU);
  hybrid::OptimizerConfig adamw;
  const std::vector<std::pair<std::string, at::Tensor>> weights = {{"model.layers.0.mlp.up_proj.weight", at::randn({12, 20})}};
  hybrid::OptimizerConfig muon = adamw;
  muon.type = "muon";
  hybrid::train::Optimizer opt(weights, muon);
  try {
    opt.load_state(hybrid::train::Optimizer(weights, adamw).state(), "ckpt/optim.safetensors");
    ADD_FAILURE() << "loaded AdamW's state into Muon";
  } catch (const hybrid::Error& e) {
    EXPECT_EQ(std::string(e.what()), "ckpt/optim.safetensors: optimizer state 'momentum.model.layers.0.mlp.up_proj.weight' is "
                                     "missing (the checkpoint holds AdamW's state for it: saved under another optimizer.type)");
  }
}

TEST(MuonCuda, MatchesFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  check_muon_against_float64(at::kCUDA);
}

// Muon writes the cached casts of the weights it updates, as AdamW does (a stacked pair of a
// Muon and an AdamW weight stays cached: every weight of it was updated).
TEST(Muon, WritesTheCachedCastsOfWhatItUpdates) {
  at::manual_seed(8);
  hybrid::set_weight_cast_cache(true);
  hybrid::forget_weight_casts();
  at::Tensor a = at::randn({6, 8}), b = at::randn({4, 8});
  const at::Tensor pair = hybrid::weights_in_compute_dtype({a, b}, at::kBFloat16, 0);
  hybrid::OptimizerConfig cfg;
  cfg.type = "muon";
  hybrid::train::Optimizer opt({{"model.layers.0.mlp.up_proj.weight", a}, {"lm_head.weight", b}}, cfg);
  for (at::Tensor* p : {&a, &b}) p->mutable_grad() = at::randn(p->sizes());
  opt.step(1e-2, 1.0);
  EXPECT_EQ(hybrid::weight_casts_cached(), 1u);
  const at::Tensor after = hybrid::weights_in_compute_dtype({a, b}, at::kBFloat16, 0);
  EXPECT_TRUE(after.is_same(pair)) << "reused, not recast";
  EXPECT_TRUE(after.equal(at::cat({a, b}).to(at::kBFloat16)));
  EXPECT_EQ(opt.state().back().first, "momentum.model.layers.0.mlp.up_proj.weight");
  hybrid::forget_weight_casts();
}

// The dry run's matrices (block_matrix_shapes, and the Newton-Schulz FLOPs from them) are the
// weights Muon takes in a built model, at both layer kinds.
TEST(Muon, DryRunCountsTheMatricesItTakes) {
  for (const std::string pattern : {"GGGA", "AG"}) {
    hybrid::Config cfg;
    cfg.model = small_model_config(pattern);
    hybrid::HybridLM model(cfg.model);
    std::vector<std::pair<int64_t, int64_t>> taken;
    double flops = 0;  // a step's products: X X^T (s x l by l x s), A A (s x s), B X (s x s by s x l)
    for (const auto& [name, p] : hybrid::model_weights(model)) {
      if (!hybrid::train::muon_takes(name, p)) continue;
      taken.emplace_back(p.size(0), p.size(1));
      const double s = static_cast<double>(std::min(p.size(0), p.size(1))), l = static_cast<double>(p.numel()) / s;
      flops += 2 * s * l * s + 2 * s * s * s + 2 * s * s * l;
    }
    auto shapes = hybrid::block_matrix_shapes(cfg.model);
    std::sort(taken.begin(), taken.end()), std::sort(shapes.begin(), shapes.end());
    EXPECT_EQ(shapes, taken) << pattern;
    EXPECT_DOUBLE_EQ(hybrid::muon_flops_per_step(cfg), cfg.optimizer.muon.ns_steps * flops) << pattern;
  }
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
