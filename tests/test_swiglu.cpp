// ops::swiglu: h = silu(g) u on [g | u], its argument check, and the CUDA kernels against the
// float64 ATen path (h and the one-tensor gradient) over the vectorised and the scalar widths,
// every float dtype, saturating gates and a non-contiguous input. CUDA tests skip without a device.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <vector>

#include "hybrid/ops/swiglu.h"

namespace {
using hybrid::ops::swiglu;

TEST(SwiGLU, OddLastDimIsRejected) { EXPECT_THROW(swiglu(at::randn({3, 7})), std::invalid_argument); }

TEST(SwiGLU, SiluOfTheFirstHalfTimesTheSecond) {
  const at::Tensor x = at::randn({4, 2, 10}, at::kDouble);
  const at::Tensor g = x.narrow(-1, 0, 5), u = x.narrow(-1, 5, 5);
  EXPECT_LT((swiglu(x) - g / (1 + at::exp(-g)) * u).abs().max().item<double>(), 1e-15);
}

double rel_rms(const at::Tensor& got, const at::Tensor& ref) {
  const at::Tensor r = ref.to(at::kDouble);
  return ((got.to(at::kDouble) - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)).item<double>();
}

// gate_up64 holds values exact in dtype; h and d(gate_up) from dtype against float64.
void check_against_float64(const at::Tensor& gate_up64, at::ScalarType dtype) {
  const at::Tensor dh64 = at::randn(swiglu(gate_up64).sizes(), gate_up64.options()).to(dtype).to(at::kDouble);
  auto run = [&](const at::Tensor& input) {
    at::Tensor x = input.detach().requires_grad_(true);
    at::Tensor h = swiglu(x);
    auto grads = torch::autograd::grad({h}, {x}, {dh64.to(h.scalar_type())});
    return std::vector<at::Tensor>{h.detach(), grads[0]};
  };
  const auto ref = run(gate_up64), got = run(gate_up64.to(dtype));
  const double tol = dtype == at::kFloat ? 1e-6 : 6e-3;
  const char* names[] = {"h", "d(gate_up)"};
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(got[i].scalar_type(), dtype) << names[i];
    EXPECT_TRUE(got[i].isfinite().all().item<bool>()) << names[i];
    EXPECT_LT(rel_rms(got[i], ref[i]), tol) << names[i] << " " << gate_up64.sizes() << " " << at::toString(dtype);
  }
}

#define SKIP_WITHOUT_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device"

TEST(SwiGLUCuda, MatchFloat64) {
  SKIP_WITHOUT_CUDA();
  at::manual_seed(11);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  // H = 4096 + 8 (16-byte vectors, a partial last block), 13 (one element a thread), 1.
  for (std::vector<int64_t> shape : {std::vector<int64_t>{2, 33, 2 * 4104}, {5, 2 * 13}, {3, 1, 2}})
    for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat})
      check_against_float64((at::randn(shape, f64) * 3).to(dtype).to(at::kDouble), dtype);
}

// Gates far into both tails: the sigmoid saturates to 0 and 1 without NaN.
TEST(SwiGLUCuda, SaturatedGates) {
  SKIP_WITHOUT_CUDA();
  at::manual_seed(12);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  at::Tensor x = at::randn({64, 2 * 64}, f64);
  x.narrow(-1, 0, 64).mul_(80);
  check_against_float64(x.to(at::kBFloat16).to(at::kDouble), at::kBFloat16);
}

TEST(SwiGLUCuda, NonContiguousInput) {
  SKIP_WITHOUT_CUDA();
  at::manual_seed(13);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  check_against_float64(at::randn({2 * 48, 9}, f64).to(at::kFloat).to(at::kDouble).t(), at::kFloat);
}

}  // namespace
