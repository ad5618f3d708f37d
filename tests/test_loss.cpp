// The language-model loss against the plain formula (float64 autograd): values and
// gradients, blocks smaller than, equal to and larger than the sequence, batch rows > 1, and
// bf16 logits (float32 inside, gradient in bf16); on CUDA the kernels (skipped without a device).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <string>
#include <vector>

#include "hybrid/train/loss.h"

namespace {

std::pair<at::Tensor, at::Tensor> plain_loss(const at::Tensor& logits, const at::Tensor& tokens) {
  const int64_t T = tokens.size(1);
  at::Tensor lg = logits.narrow(1, 0, T - 1).flatten(0, 1);
  at::Tensor lse = at::logsumexp(lg, -1);
  at::Tensor ce = (lse - lg.gather(1, tokens.narrow(1, 1, T - 1).flatten().unsqueeze(1)).squeeze(1)).mean();
  return {ce, lse.pow(2).mean()};
}

// d(ce + 0.3 z)/dlogits and the two values.
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_and_grad(const at::Tensor& logits, const at::Tensor& tokens,
                                                             int64_t block_rows) {
  at::Tensor x = logits.detach().requires_grad_(true);
  auto [ce, z] = block_rows > 0 ? hybrid::lm_loss(x, tokens, block_rows) : plain_loss(x, tokens);
  at::Tensor grad = torch::autograd::grad({ce + 0.3 * z}, {x})[0];
  return {ce.detach(), z.detach(), grad};
}

TEST(LmLoss, MatchesThePlainFormulaInFloat64) {
  at::manual_seed(0);
  const at::Tensor logits = at::randn({3, 11, 37}, at::kDouble) * 4;
  const at::Tensor tokens = at::randint(0, 37, {3, 11}, at::kLong);
  auto [ce_ref, z_ref, g_ref] = loss_and_grad(logits, tokens, 0);
  for (int64_t block : {1, 3, 10, 64}) {
    auto [ce, z, g] = loss_and_grad(logits, tokens, block);
    EXPECT_NEAR(ce.item<double>(), ce_ref.item<double>(), 1e-12) << "block " << block;
    EXPECT_NEAR(z.item<double>(), z_ref.item<double>(), 1e-11) << "block " << block;
    EXPECT_LT((g - g_ref).abs().max().item<double>(), 1e-14) << "block " << block;
    EXPECT_EQ(g.select(1, 10).abs().max().item<double>(), 0.0) << "the last position predicts nothing";
  }
}

TEST(LmLoss, Bf16LogitsComputeInFloat32) {
  at::manual_seed(1);
  const at::Tensor logits = (at::randn({2, 9, 50}) * 3).to(at::kBFloat16);
  const at::Tensor tokens = at::randint(0, 50, {2, 9}, at::kLong);
  auto [ce_ref, z_ref, g_ref] = loss_and_grad(logits.to(at::kDouble), tokens, 0);
  auto [ce, z, g] = loss_and_grad(logits, tokens, 4);
  EXPECT_EQ(ce.scalar_type(), at::kFloat);
  EXPECT_EQ(g.scalar_type(), at::kBFloat16);
  EXPECT_NEAR(ce.item<double>(), ce_ref.item<double>(), 1e-5);
  EXPECT_NEAR(z.item<double>(), z_ref.item<double>(), 1e-4);
  // The gradient's only error is its rounding to bf16.
  EXPECT_LT(((g.to(at::kDouble) - g_ref).norm() / g_ref.norm()).item<double>(), 4e-3);
}

// The CUDA kernels against float64 on the same device: 16-byte vectors (V = 4104) and one
// element a thread (V = 37, fewer elements than threads), every float dtype, T = 2 (one
// prediction a row), logits around 30 (what the max subtraction is for), and the cross-entropy
// differentiated alone.
TEST(LmLossCuda, MatchesFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(2);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  struct Shape {
    int64_t B, T, V;
  };
  for (Shape s : {Shape{2, 33, 4104}, Shape{3, 7, 37}, Shape{2, 2, 4104}})
    for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
      const at::Tensor logits = (at::randn({s.B, s.T, s.V}, f64) * 4 + 30).to(dtype);
      const at::Tensor tokens = at::randint(0, s.V, {s.B, s.T}, f64.dtype(at::kLong));
      auto [ce_ref, z_ref, g_ref] = loss_and_grad(logits.to(at::kDouble), tokens, 0);
      auto [ce, z, g] = loss_and_grad(logits, tokens, 1024);
      const std::string where = std::to_string(s.V) + " " + at::toString(dtype);
      EXPECT_EQ(g.scalar_type(), dtype) << where;
      EXPECT_NEAR(ce.item<double>(), ce_ref.item<double>(), 2e-5) << where;
      EXPECT_NEAR(z.item<double>() / z_ref.item<double>(), 1.0, 2e-6) << where;
      const double tol = dtype == at::kFloat ? 1e-5 : 4e-3;  // else the gradient's rounding to dtype
      EXPECT_LT(((g.to(at::kDouble) - g_ref).norm() / g_ref.norm()).item<double>(), tol) << where;
      EXPECT_EQ(g.select(1, s.T - 1).abs().max().item<double>(), 0.0) << "the last position predicts nothing " << where;
    }
  // The cross-entropy alone: z's gradient undefined.
  const at::Tensor logits = at::randn({2, 5, 64}, f64).to(at::kFloat).requires_grad_(true);
  const at::Tensor tokens = at::randint(0, 64, {2, 5}, f64.dtype(at::kLong));
  at::Tensor g = torch::autograd::grad({hybrid::lm_loss(logits, tokens).first}, {logits})[0];
  at::Tensor x = logits.detach().to(at::kDouble).narrow(1, 0, 4).requires_grad_(true);
  at::Tensor ce_ref = at::cross_entropy_loss(x.flatten(0, 1), tokens.narrow(1, 1, 4).flatten());
  at::Tensor g_ref = torch::autograd::grad({ce_ref}, {x})[0];
  EXPECT_LT((g.narrow(1, 0, 4).to(at::kDouble) - g_ref).abs().max().item<double>(), 1e-7);
}

TEST(LmLossCuda, TargetOutsideTheVocabularyIsNaN) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const auto options = at::TensorOptions().device(at::kCUDA);
  at::Tensor tokens = at::zeros({1, 4}, options.dtype(at::kLong));
  tokens[0][2] = 64;
  EXPECT_TRUE(std::isnan(hybrid::lm_loss(at::randn({1, 4, 64}, options), tokens).first.item<double>()));
}

// gradient_over_logits: the same gradient, written into the logits' memory (on CPU and, where
// there is a device, by the CUDA kernel).
TEST(LmLoss, GradientOverTheLogits) {
  at::manual_seed(5);
  std::vector<at::Device> devices = {at::kCPU};
  if (at::hasCUDA()) devices.emplace_back(at::kCUDA);
  for (at::Device device : devices) {
    const at::Tensor logits = (at::randn({2, 9, 40}) * 3).to(at::kBFloat16).to(device);
    const at::Tensor tokens = at::randint(0, 40, {2, 9}, at::kLong).to(device);
    auto [ce_ref, z_ref, g_ref] = loss_and_grad(logits, tokens, 4);
    at::Tensor x = logits.clone().requires_grad_(true);
    auto [ce, z] = hybrid::lm_loss(x, tokens, 4, /*gradient_over_logits=*/true);
    at::Tensor g = torch::autograd::grad({ce + 0.3 * z}, {x})[0];
    EXPECT_TRUE(g.equal(g_ref)) << device;
    EXPECT_TRUE(x.detach().equal(g_ref)) << "written over the logits on " << device;
    EXPECT_EQ(ce.item<double>(), ce_ref.item<double>()) << device;
  }
}

TEST(LmLoss, RejectsMismatchedShapes) {
  EXPECT_THROW(hybrid::lm_loss(at::zeros({2, 5, 7}), at::zeros({2, 4}, at::kLong)), c10::Error);
  EXPECT_THROW(hybrid::lm_loss(at::zeros({2, 1, 7}), at::zeros({2, 1}, at::kLong)), c10::Error);
}

}  // namespace
