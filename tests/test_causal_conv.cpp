// The short convolution + SiLU (ops::causal_conv_silu): the ATen path against a direct sum on
// the CPU, and the CUDA kernels against the float64 ATen path (forward and both gradients), with
// and without document boundaries, at sequence lengths around the kernel's 128-step tile; its
// decoding step against the whole sequence. The CUDA tests skip without a device.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <vector>

#include "hybrid/ops/causal_conv.h"

namespace {
using hybrid::ops::causal_conv_silu;

// [B, T] positions inside documents of the given lengths, the same documents in every row.
at::Tensor positions(int64_t B, const std::vector<int64_t>& documents, at::Device device) {
  std::vector<int64_t> pos;
  for (int64_t len : documents)
    for (int64_t i = 0; i < len; ++i) pos.push_back(i);
  return at::tensor(pos, at::kLong).unsqueeze(0).repeat({B, 1}).to(device);
}

at::Tensor direct_sum(const at::Tensor& x, const at::Tensor& w, const at::Tensor& pos) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), K = w.size(1);
  at::Tensor y = at::zeros_like(x);
  auto xa = x.accessor<double, 3>();
  auto wa = w.accessor<double, 2>();
  auto ya = y.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        double z = 0;
        for (int64_t j = 0; j < K && j <= t; ++j)
          if (!pos.defined() || j <= pos[b][t].item<int64_t>()) z += wa[c][K - 1 - j] * xa[b][t - j][c];
        ya[b][t][c] = z / (1 + std::exp(-z));
      }
  return y;
}

TEST(CausalConv, AtenPathMatchesDirectSum) {
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  for (int64_t K : {1, 2, 4}) {
    for (bool docs : {false, true}) {
      at::Tensor x = at::randn({2, 11, 5}, f64), w = at::randn({5, 1, K}, f64);
      at::Tensor pos = docs ? positions(2, {3, 1, 7}, at::kCPU) : at::Tensor();
      at::Tensor diff = (causal_conv_silu(x, w, pos) - direct_sum(x, w.squeeze(1), pos)).abs().max();
      EXPECT_LT(diff.item<double>(), 1e-12) << "K " << K << (docs ? " with documents" : "");
    }
  }
  // Shorter than the kernel: the taps before the start count as 0.
  at::Tensor x = at::randn({1, 2, 3}, f64), w = at::randn({3, 4}, f64);
  EXPECT_LT((causal_conv_silu(x, w, {}) - direct_sum(x, w, {})).abs().max().item<double>(), 1e-12);
}

// Decoding token by token (ops::causal_conv_silu_step) gives the whole sequence's outputs and keeps
// its last K - 1 inputs: x is a column slice of a wider tensor, as GDN's projection output is; the
// step's kernel on CUDA against the whole-sequence kernel there (tol: the largest difference
// relative to 1 + |y|, so that a rounding of either side apart passes at any magnitude).
void check_steps(at::Device device, at::ScalarType dtype, int64_t K, double tol) {
  const int64_t B = 2, T = 9, C = 37;
  const at::Tensor wide = at::randn({B, T, C + 5}, at::TensorOptions().dtype(at::kDouble)).to(device, dtype);
  const at::Tensor x = wide.narrow(-1, 3, C), w = at::randn({C, 1, K}, at::TensorOptions().dtype(at::kDouble)).to(device);
  const at::Tensor whole = causal_conv_silu(x, w.to(at::kFloat), {}).to(at::kDouble);
  at::Tensor kept = at::zeros({B, K - 1, C}, x.options());
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor y = hybrid::ops::causal_conv_silu_step(x.narrow(1, t, 1), kept, w.to(at::kFloat));
    const at::Tensor ref = whole.narrow(1, t, 1);
    EXPECT_LE(((y.to(at::kDouble) - ref).abs() / (ref.abs() + 1)).max().item<double>(), tol)
        << c10::toString(dtype) << " K " << K << " token " << t;
  }
  EXPECT_TRUE(at::equal(kept, x.narrow(1, T - (K - 1), K - 1))) << c10::toString(dtype) << " K " << K;
}

TEST(CausalConv, StepsEqualTheWholeSequence) {
  at::manual_seed(5);
  for (int64_t K : {1, 2, 4}) check_steps(at::kCPU, at::kDouble, K, 1e-12);
  at::Tensor kept = at::zeros({1, 2, 3});  // K - 1 = 3 rows expected
  EXPECT_THROW(hybrid::ops::causal_conv_silu_step(at::randn({1, 1, 3}), kept, at::randn({3, 4})), std::invalid_argument);
  EXPECT_THROW(hybrid::ops::causal_conv_silu_step(at::randn({1, 2, 3}), kept, at::randn({3, 3})), std::invalid_argument);
}

TEST(CausalConv, BadShapesAreRejected) {
  at::Tensor x = at::randn({1, 4, 3});
  EXPECT_THROW(causal_conv_silu(x, at::randn({4, 1, 4}), {}), std::invalid_argument);
  EXPECT_THROW(causal_conv_silu(x, at::randn({3, 2, 4}), {}), std::invalid_argument);
  EXPECT_THROW(causal_conv_silu(x.squeeze(0), at::randn({3, 4}), {}), std::invalid_argument);
  EXPECT_THROW(causal_conv_silu(x, at::randn({3, 4}), at::zeros({1, 4}, at::kInt)), std::invalid_argument);
}

double rel_rms(const at::Tensor& a, const at::Tensor& ref) {
  return ((a.to(at::kDouble) - ref).norm() / ref.norm()).item<double>();
}

struct Case {
  int64_t B, T, C, K;
  std::vector<int64_t> documents;  // lengths summing to T, empty for none
  at::ScalarType dtype;
};

void check_against_float64(const Case& c, uint64_t seed) {
  at::manual_seed(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  // Inputs exactly representable in the low precision, so both sides see the same numbers.
  at::Tensor x64 = at::randn({c.B, c.T, c.C}, f64).to(c.dtype).to(at::kDouble);
  at::Tensor w64 = (at::randn({c.C, 1, c.K}, f64) * 0.5).to(at::kFloat).to(at::kDouble);
  at::Tensor dy64 = at::randn({c.B, c.T, c.C}, f64).to(c.dtype).to(at::kDouble);
  at::Tensor pos = c.documents.empty() ? at::Tensor() : positions(c.B, c.documents, at::kCUDA);

  auto run = [&](const at::Tensor& x0, const at::Tensor& w0, const at::Tensor& dy) {
    at::Tensor x = x0.detach().requires_grad_(true), w = w0.detach().requires_grad_(true);
    at::Tensor y = causal_conv_silu(x, w, pos);
    auto grads = torch::autograd::grad({y}, {x, w}, {dy.to(y.scalar_type())});
    return std::vector<at::Tensor>{y.detach(), grads[0], grads[1]};
  };
  auto ref = run(x64, w64, dy64);
  auto got = run(x64.to(c.dtype), w64.to(at::kFloat), dy64);
  const bool low = c.dtype != at::kFloat;
  const double y_tol = low ? 5e-3 : 1e-5, dw_tol = 1e-5;
  const char* names[] = {"y", "dx", "dw"};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(got[i].scalar_type(), i < 2 ? c.dtype : at::kFloat) << names[i];
    EXPECT_TRUE(got[i].isfinite().all().item<bool>()) << names[i];
    EXPECT_LT(rel_rms(got[i], ref[i]), i < 2 ? y_tol : dw_tol)
        << names[i] << " B" << c.B << " T" << c.T << " C" << c.C << " K" << c.K << " docs " << c.documents.size();
  }
  // The dw partial sums are added in a fixed order: the same inputs give the same bits.
  EXPECT_TRUE(at::equal(run(x64.to(c.dtype), w64.to(at::kFloat), dy64)[2], got[2]));
}

#define SKIP_WITHOUT_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device"

TEST(CausalConvCuda, SmallShapes) {
  SKIP_WITHOUT_CUDA();
  check_against_float64({1, 1, 7, 4, {}, at::kBFloat16}, 1);
  check_against_float64({2, 5, 33, 4, {}, at::kFloat}, 2);
  check_against_float64({1, 20, 300, 4, {3, 1, 16}, at::kBFloat16}, 3);
  check_against_float64({2, 9, 40, 2, {}, at::kBFloat16}, 4);
  // A tensor on another device is an error, not a read of a host pointer in a kernel.
  at::Tensor x = at::randn({1, 8, 4}, at::kCUDA);
  EXPECT_THROW(causal_conv_silu(x, at::randn({4, 4}), {}), std::invalid_argument);
  EXPECT_THROW(causal_conv_silu(x, at::randn({4, 4}, at::kCUDA), at::zeros({1, 8}, at::kLong)), std::invalid_argument);
}

TEST(CausalConvCuda, MatchFloat64) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 10;
  for (int64_t K : {1, 2, 3, 4})
    for (auto dtype : {at::kBFloat16, at::kFloat, at::kHalf}) check_against_float64({2, 300, 100, K, {}, dtype}, seed++);
  for (int64_t T : {127, 128, 129, 257, 4096}) check_against_float64({1, T, 520, 4, {}, at::kBFloat16}, seed++);
  check_against_float64({2, 1000, 96, 4, {1, 2, 3, 130, 4, 600, 260}, at::kBFloat16}, seed++);
  check_against_float64({1, 384, 64, 3, std::vector<int64_t>(128, 3), at::kFloat}, seed++);
}

// A column slice of a wider tensor (q, k and v in the fused projection output) is read in
// place: the same values and gradients as from a contiguous copy.
TEST(CausalConvCuda, ColumnSliceReadInPlace) {
  SKIP_WITHOUT_CUDA();
  at::Tensor wide = at::randn({2, 300, 3 * 40}, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
  at::Tensor w = (0.5 * at::randn({80, 4}, at::kCUDA)).requires_grad_(true);
  at::Tensor dy = at::randn({2, 300, 80}, wide.options());
  at::Tensor pos = positions(2, {100, 7, 193}, at::kCUDA);
  auto run = [&](const at::Tensor& x0) {
    at::Tensor x = x0.detach().requires_grad_(true);
    at::Tensor y = causal_conv_silu(x, w, pos);
    auto grads = torch::autograd::grad({y}, {x, w}, {dy});
    return std::vector<at::Tensor>{y, grads[0], grads[1]};
  };
  // Offset 40 keeps the slice aligned for several channels a thread; 39 does not (one a thread).
  for (int64_t offset : {40, 39}) {
    auto sliced = run(wide.narrow(-1, offset, 80)), copied = run(wide.narrow(-1, offset, 80).contiguous());
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(at::equal(sliced[i], copied[i])) << "offset " << offset << " output " << i;
  }
}

// The step's kernel (one launch: the window's taps, SiLU, the shift in place) against the
// whole-sequence kernel; with gradients asked for, the differentiable path instead.
TEST(CausalConvCuda, StepsEqualTheWholeSequence) {
  SKIP_WITHOUT_CUDA();
  at::manual_seed(6);
  for (int64_t K : {1, 2, 3, 4}) {
    check_steps(at::kCUDA, at::kFloat, K, 1e-6);
    check_steps(at::kCUDA, at::kBFloat16, K, 1e-2);  // a bf16 rounding apart (2^-8 relative) passes
  }
  at::Tensor kept = at::zeros({1, 3, 8}, at::kCUDA), w = at::randn({8, 4}, at::kCUDA).requires_grad_(true);
  EXPECT_TRUE(hybrid::ops::causal_conv_silu_step(at::randn({1, 1, 8}, at::kCUDA), kept, w).requires_grad());
}

TEST(CausalConvCuda, FifthTapFallsBackToAten) {
  SKIP_WITHOUT_CUDA();
  check_against_float64({1, 70, 16, 5, {30, 40}, at::kFloat}, 99);
}

}  // namespace
