// ops::rope: the rotate-half rotation of q and k by their positions' angles (against the formula
// written out), its argument checks, its gradient as the inverse rotation, and the CUDA kernels
// against the float64 ATen path for every float dtype, strided inputs (column windows of a
// projection) and strided output gradients (as attention returns them). CUDA tests skip without
// a device.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <stdexcept>
#include <vector>

#include "hybrid/ops/rope.h"

namespace {
using hybrid::ops::rope;

constexpr double kTheta = 500000;

TEST(Rope, RotatesEachPairByItsAngle) {
  const int64_t B = 2, T = 5, H = 3, D = 8, h = D / 2;
  const at::Tensor q = at::randn({B, T, H, D}, at::kDouble), k = at::randn({B, T, 1, D}, at::kDouble);
  const at::Tensor positions = at::randint(0, 9000, {B, T}, at::kLong);
  const auto [yq, yk] = rope(q, k, positions, kTheta);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < h; ++i) {
        // f_i and the angle in float32, as HF computes them.
        const float f = 1.0f / static_cast<float>(std::pow(kTheta, static_cast<float>(2 * i) / D));
        const double a = static_cast<float>(positions[b][t].item<int64_t>()) * f, c = std::cos(a), s = std::sin(a);
        for (int64_t j = 0; j < H; ++j) {
          const double x1 = q[b][t][j][i].item<double>(), x2 = q[b][t][j][i + h].item<double>();
          EXPECT_NEAR(yq[b][t][j][i].item<double>(), x1 * c - x2 * s, 1e-6);
          EXPECT_NEAR(yq[b][t][j][i + h].item<double>(), x2 * c + x1 * s, 1e-6);
        }
      }
  // Position 0 leaves a row as it is; every pair keeps its length.
  const auto [same, unused] = rope(q, k, at::zeros({B, T}, at::kLong), kTheta);
  EXPECT_TRUE(at::allclose(same, q, 0, 1e-15));
  auto pair_norms = [&](const at::Tensor& x) { return x.narrow(-1, 0, h).pow(2) + x.narrow(-1, h, h).pow(2); };
  EXPECT_TRUE(at::allclose(pair_norms(yk), pair_norms(k), 1e-12, 1e-12));
}

TEST(Rope, BadShapesAreRejected) {
  const at::Tensor positions = at::zeros({2, 4}, at::kLong);
  EXPECT_THROW(rope(at::randn({2, 4, 3, 7}), at::randn({2, 4, 1, 7}), positions, kTheta), std::invalid_argument);
  EXPECT_THROW(rope(at::randn({2, 4, 3, 8}), at::randn({2, 4, 1, 6}), positions, kTheta), std::invalid_argument);
  EXPECT_THROW(rope(at::randn({2, 5, 3, 8}), at::randn({2, 5, 1, 8}), positions, kTheta), std::invalid_argument);
}

// The rotation is orthogonal, so the gradient of <y, w> is w rotated back.
TEST(Rope, GradientIsTheInverseRotation) {
  const at::Tensor q = at::randn({1, 6, 2, 16}, at::kDouble).requires_grad_(true), k = at::randn({1, 6, 2, 16}, at::kDouble);
  const at::Tensor positions = at::randint(0, 100, {1, 6}, at::kLong);
  const at::Tensor w = at::randn({1, 6, 2, 16}, at::kDouble);
  const at::Tensor dq = torch::autograd::grad({(rope(q, k, positions, kTheta).first * w).sum()}, {q})[0];
  const at::Tensor back = rope(w, k, -positions, kTheta).first;  // the angles' signs flip with the positions'
  EXPECT_TRUE(at::allclose(dq, back, 1e-12, 1e-12));
}

#define SKIP_WITHOUT_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device"

double rel_rms(const at::Tensor& got, const at::Tensor& ref) {
  const at::Tensor r = ref.to(at::kDouble);
  return ((got.to(at::kDouble) - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)).item<double>();
}

// q and k as column windows of one [B, T, W] matrix (as attention's fused projection gives
// them), values exact in dtype; outputs and gradients (of strided output gradients) against the
// float64 path on the same values.
void check_against_float64(int64_t B, int64_t T, int64_t Hq, int64_t Hk, int64_t D, at::ScalarType dtype) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  const at::Tensor wide = at::randn({B, T, (Hq + Hk) * D + 8}, f64).to(dtype).to(at::kDouble);
  const at::Tensor positions = at::randint(0, 16384, {B, T}, f64.dtype(at::kLong));
  // Output gradients laid out [B, H, T, D], seen as [B, T, H, D]: transposed, as SDPA returns them.
  const at::Tensor dyq = at::randn({B, Hq, T, D}, f64).to(dtype).transpose(1, 2),
                   dyk = at::randn({B, Hk, T, D}, f64).to(dtype).transpose(1, 2);
  auto run = [&](at::ScalarType as) {
    const at::Tensor x = wide.to(as).detach().requires_grad_(true);
    const at::Tensor q = x.narrow(-1, 0, Hq * D).view({B, T, Hq, D}), k = x.narrow(-1, Hq * D, Hk * D).view({B, T, Hk, D});
    const auto [yq, yk] = rope(q, k, positions, kTheta);
    const at::Tensor dx = torch::autograd::grad({yq, yk}, {x}, {dyq.to(as), dyk.to(as)})[0];
    return std::vector<at::Tensor>{yq.detach(), yk.detach(), dx};
  };
  const auto ref = run(at::kDouble), got = run(dtype);
  const double tol = dtype == at::kFloat ? 1e-6 : 6e-3;
  const char* names[] = {"q", "k", "dx"};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(got[i].scalar_type(), dtype) << names[i];
    EXPECT_TRUE(got[i].isfinite().all().item<bool>()) << names[i];
    EXPECT_LT(rel_rms(got[i], ref[i]), tol) << names[i] << " D " << D << " " << at::toString(dtype);
  }
}

TEST(RopeCuda, MatchFloat64) {
  SKIP_WITHOUT_CUDA();
  at::manual_seed(21);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    check_against_float64(2, 33, 4, 2, 128, dtype);  // GQA
    check_against_float64(1, 70, 3, 3, 64, dtype);
    check_against_float64(3, 5, 1, 1, 2, dtype);  // one pair a row
  }
}

}  // namespace
