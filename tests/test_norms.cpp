// The norms (ops::rms_norm, ops::gated_rms_norm): their argument checks, and the CUDA kernels
// against the float64 ATen path (forward and the gradients of x, gate and weight) over row
// lengths up to the kernels' limits, mixed dtypes of x and gate, and enough rows for the
// backward's grid-stride loops. The CUDA tests skip without a device.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <vector>

#include "hybrid/ops/gated_rms_norm.h"
#include "hybrid/ops/rms_norm.h"

namespace {
using hybrid::ops::add_normed;
using hybrid::ops::add_rms_norm;
using hybrid::ops::gated_rms_norm;
using hybrid::ops::rms_norm;
using hybrid::ops::rms_norm_keeping_input;

TEST(RMSNorm, BadShapesAreRejected) {
  EXPECT_THROW(rms_norm(at::randn({3, 8}), at::ones({7}), 1e-6), std::invalid_argument);
  EXPECT_THROW(rms_norm(at::randn({3, 8}), at::ones({1, 8}), 1e-6), std::invalid_argument);
}

TEST(AddRMSNorm, BadShapesAreRejected) {
  EXPECT_THROW(add_rms_norm(at::randn({3, 8}), at::randn({3, 7}), at::ones({7}), 1e-6), std::invalid_argument);
  EXPECT_THROW(add_rms_norm(at::randn({3, 8}), at::randn({3, 8}), at::ones({7}), 1e-6), std::invalid_argument);
  EXPECT_THROW(add_normed(at::randn({3, 8}), at::randn({3, 7}), at::ones({7}), 1e-6), std::invalid_argument);
}

TEST(RMSNorm, UnitRootMeanSquare) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor y = rms_norm(at::randn({5, 64}, f64) * 7, at::ones({64}, f64), 0);
  EXPECT_LT((y.pow(2).mean(-1) - 1).abs().max().item<double>(), 1e-12);
}

// rms_norm_keeping_input: x itself and its norm (on the CPU the two ops apart; the CUDA kernel's
// gradient sum in RMSNormCuda.KeepingInputSameAsApart).
TEST(RMSNorm, KeepingInputGivesXAndItsNorm) {
  at::Tensor x = at::randn({4, 3, 32}), w = 1 + 0.1 * at::randn({32});
  auto [kept, n] = rms_norm_keeping_input(x, w, 1e-6, at::kBFloat16);
  EXPECT_TRUE(at::equal(kept, x));
  EXPECT_TRUE(at::equal(n, rms_norm(x, w, 1e-6, at::kBFloat16)));
  EXPECT_THROW(rms_norm_keeping_input(x, at::ones({31}), 1e-6), std::invalid_argument);
}

// y in an output dtype is y in x's dtype cast to it, and its gradient comes back through that
// dtype as through the cast (here the ATen path; the CUDA kernels' in RMSNormCuda below).
TEST(RMSNorm, OutputInAGivenDtype) {
  at::Tensor x0 = at::randn({4, 3, 32}), w = 1 + 0.1 * at::randn({32}), dy = at::randn({4, 3, 32});
  auto run = [&](bool given) {
    at::Tensor x = x0.clone().requires_grad_(true);
    at::Tensor y = given ? rms_norm(x, w, 1e-6, at::kBFloat16) : rms_norm(x, w, 1e-6).to(at::kBFloat16);
    return std::vector<at::Tensor>{y, torch::autograd::grad({y}, {x}, {dy.to(at::kBFloat16)})[0]};
  };
  auto given = run(true), cast = run(false);
  EXPECT_EQ(given[0].scalar_type(), at::kBFloat16);
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(at::equal(given[i], cast[i])) << i;
  auto [h, n] = add_rms_norm(x0, x0, w, 1e-6, at::kBFloat16);
  EXPECT_EQ(h.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(n, rms_norm(x0 + x0, w, 1e-6).to(at::kBFloat16)));
  // Other outputs are refused: integers, and wider than x (a bf16 x's float32 norm).
  EXPECT_THROW(rms_norm(x0, w, 1e-6, at::kLong), std::invalid_argument);
  EXPECT_THROW(add_rms_norm(x0, x0, w, 1e-6, at::kInt), std::invalid_argument);
  EXPECT_THROW(rms_norm(x0.to(at::kBFloat16), w, 1e-6, at::kFloat), std::invalid_argument);
}

TEST(GatedRMSNorm, BadShapesAreRejected) {
  at::Tensor x = at::randn({3, 8});
  EXPECT_THROW(gated_rms_norm(x, at::randn({3, 7}), at::ones({8}), 1e-6), std::invalid_argument);
  EXPECT_THROW(gated_rms_norm(x, at::randn({3, 8}), at::ones({7}), 1e-6), std::invalid_argument);
  EXPECT_THROW(gated_rms_norm(x, at::randn({3, 8}), at::ones({1, 8}), 1e-6), std::invalid_argument);
  // The output dtype, when given, is x's or the gate's.
  EXPECT_THROW(gated_rms_norm(x, at::randn({3, 8}), at::ones({8}), 1e-6, at::kHalf), std::invalid_argument);
}

// y in the gate's dtype is y in x's, rounded once.
TEST(GatedRMSNorm, OutputInTheGatesDtype) {
  at::Tensor x = at::randn({4, 3, 16}), g = at::randn({4, 3, 16}).to(at::kBFloat16), w = 1 + 0.1 * at::randn({16});
  at::Tensor y = gated_rms_norm(x, g, w, 1e-6, at::kBFloat16);
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(y, gated_rms_norm(x, g, w, 1e-6).to(at::kBFloat16)));
}

TEST(GatedRMSNorm, NormalisesEachRowAndGates) {
  // Rows with one value each: the norm maps x to sign(x) (up to eps), so y = w sign(x) silu(g).
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor x = at::tensor({2.0, -3.0}, f64).view({2, 1}), g = at::tensor({0.5, -1.0}, f64).view({2, 1});
  at::Tensor y = gated_rms_norm(x, g, at::tensor({1.5}, f64), 1e-12);
  at::Tensor expected = at::tensor({1.5 * 0.5 / (1 + std::exp(-0.5)), -1.5 * -1.0 / (1 + std::exp(1.0))}, f64).view({2, 1});
  EXPECT_LT((y - expected).abs().max().item<double>(), 1e-9);
}

double rel_rms(const at::Tensor& a, const at::Tensor& ref) {
  return ((a.to(at::kDouble) - ref).norm() / ref.norm()).item<double>();
}

// y_dtype: the output dtype asked for (x's when undefined).
void check_against_float64(std::vector<int64_t> shape, at::ScalarType x_dtype, at::ScalarType gate_dtype, uint64_t seed,
                           at::ScalarType y_dtype = at::ScalarType::Undefined) {
  if (y_dtype == at::ScalarType::Undefined) y_dtype = x_dtype;
  at::manual_seed(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  const int64_t D = shape.back();
  // Inputs exactly representable in their low precision, so both sides see the same numbers.
  at::Tensor x64 = (at::randn(shape, f64) * 3).to(x_dtype).to(at::kDouble);
  at::Tensor g64 = (at::randn(shape, f64) * 2).to(gate_dtype).to(at::kDouble);
  at::Tensor w64 = (1 + 0.1 * at::randn({D}, f64)).to(at::kFloat).to(at::kDouble);
  at::Tensor dy64 = at::randn(shape, f64).to(y_dtype).to(at::kDouble);
  const double eps = 1e-6;

  auto grads_of = [&](const at::Tensor& y, const std::vector<at::Tensor>& inputs) {
    auto grads = torch::autograd::grad({y}, inputs, {dy64.to(y.scalar_type())});
    return std::vector<at::Tensor>{y.detach(), grads[0], grads[1], grads[2]};
  };
  auto run = [&](at::ScalarType xd, at::ScalarType gd, at::ScalarType wd) {
    at::Tensor x = x64.to(xd).requires_grad_(true), g = g64.to(gd).requires_grad_(true);
    at::Tensor w = w64.to(wd).requires_grad_(true);
    return grads_of(gated_rms_norm(x, g, w, eps, y_dtype), {x, g, w});
  };
  // The reference in float64 with the op's one rounding: the normalised x is rounded to x's
  // dtype before the weight and gate multiply it (as HF does); its gradient passes straight
  // through the rounding.
  at::Tensor x = x64.clone().requires_grad_(true), g = g64.clone().requires_grad_(true);
  at::Tensor w = w64.clone().requires_grad_(true);
  at::Tensor u = x * at::rsqrt(x.pow(2).mean(-1, true) + eps);
  at::Tensor n = u + (u.to(x_dtype).to(at::kDouble) - u).detach();
  auto ref = grads_of(w * n * at::silu(g), {x, g, w});
  auto got = run(x_dtype, gate_dtype, at::kFloat);
  const at::ScalarType dtypes[] = {y_dtype, x_dtype, gate_dtype, at::kFloat};
  const char* names[] = {"y", "dx", "dgate", "dw"};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(got[i].scalar_type(), dtypes[i]) << names[i];
    EXPECT_TRUE(got[i].isfinite().all().item<bool>()) << names[i];
    // float32 gradients from bf16 or half x: n is rounded to x's dtype on both sides, but an
    // element whose float32 and float64 values straddle a rounding boundary lands one ulp of
    // x's dtype apart (2^-8 for bf16), a few in a test's 21K elements (seen: 1.1e-4 for dw).
    const double float_tol = x_dtype == at::kFloat ? 2e-5 : 1e-3;
    const double tol = dtypes[i] == at::kFloat ? float_tol : 6e-3;
    EXPECT_LT(rel_rms(got[i], ref[i]), tol) << names[i] << " D " << D << " rows " << x64.numel() / D << " x "
                                             << at::toString(x_dtype) << " gate " << at::toString(gate_dtype)
                                             << " y " << at::toString(y_dtype);
  }
  // dw's block partials are added in a fixed order: the same inputs give the same bits.
  EXPECT_TRUE(at::equal(run(x_dtype, gate_dtype, at::kFloat)[3], got[3]));
}

#define SKIP_WITHOUT_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device"

void check_rms_norm_against_float64(std::vector<int64_t> shape, at::ScalarType dtype, uint64_t seed) {
  at::manual_seed(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  const int64_t D = shape.back();
  at::Tensor x64 = (at::randn(shape, f64) * 3).to(dtype).to(at::kDouble);
  at::Tensor w64 = (1 + 0.1 * at::randn({D}, f64)).to(at::kFloat).to(at::kDouble);
  at::Tensor dy64 = at::randn(shape, f64).to(dtype).to(at::kDouble);
  auto run = [&](at::ScalarType xd, at::ScalarType wd) {
    at::Tensor x = x64.to(xd).requires_grad_(true), w = w64.to(wd).requires_grad_(true);
    at::Tensor y = rms_norm(x, w, 1e-6);
    auto grads = torch::autograd::grad({y}, {x, w}, {dy64.to(y.scalar_type())});
    return std::vector<at::Tensor>{y.detach(), grads[0], grads[1]};
  };
  auto ref = run(at::kDouble, at::kDouble);
  auto got = run(dtype, at::kFloat);
  const at::ScalarType dtypes[] = {dtype, dtype, at::kFloat};
  const char* names[] = {"y", "dx", "dw"};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(got[i].scalar_type(), dtypes[i]) << names[i];
    EXPECT_TRUE(got[i].isfinite().all().item<bool>()) << names[i];
    EXPECT_LT(rel_rms(got[i], ref[i]), dtypes[i] == at::kFloat ? 2e-5 : 6e-3)
        << names[i] << " D " << D << " rows " << x64.numel() / D << " " << at::toString(dtype);
  }
  EXPECT_TRUE(at::equal(run(dtype, at::kFloat)[2], got[2]));  // dw partials added in a fixed order
}

TEST(RMSNormCuda, SmallShapes) {
  SKIP_WITHOUT_CUDA();
  check_rms_norm_against_float64({1, 16}, at::kFloat, 1);
  check_rms_norm_against_float64({3, 300}, at::kBFloat16, 2);
  EXPECT_THROW(rms_norm(at::randn({2, 8}, at::kCUDA), at::ones({8}), 1e-6), std::invalid_argument);  // weight on the CPU
}

TEST(RMSNormCuda, MatchFloat64) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 10;
  for (int64_t D : {32, 128, 257, 2048, 3840, 4096})
    for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) check_rms_norm_against_float64({2, 9, D}, dtype, seed++);
  // More rows than the backward's blocks (as many as fit on the GPU at once), each walking several.
  check_rms_norm_against_float64({2, 1500, 768}, at::kFloat, seed++);
}

// A column slice of a wider tensor (a projection's q in the fused q, k, v output) is read in
// place: the same values and gradients as from a contiguous copy.
TEST(RMSNormCuda, ColumnSliceReadInPlace) {
  SKIP_WITHOUT_CUDA();
  at::Tensor wide = at::randn({2, 50, 3 * 96}, at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA));
  at::Tensor w = (1 + 0.1 * at::randn({96}, at::kCUDA)).requires_grad_(true);
  at::Tensor dy = at::randn({2, 50, 96}, wide.options());
  auto run = [&](const at::Tensor& x0) {
    at::Tensor x = x0.detach().requires_grad_(true);
    at::Tensor y = rms_norm(x, w, 1e-6);
    auto grads = torch::autograd::grad({y}, {x, w}, {dy});
    return std::vector<at::Tensor>{y, grads[0], grads[1]};
  };
  auto sliced = run(wide.narrow(-1, 96, 96)), copied = run(wide.narrow(-1, 96, 96).contiguous());
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(at::equal(sliced[i], copied[i])) << i;
}

// A float32 x's norm written in bf16 or half (a pre-norm block's, in its projections' compute
// dtype) is the float32 norm cast, bit for bit, and so are x's and the weight's gradients from a
// gradient in that dtype; rows more than the backward's blocks, D up to 7b.yaml's 3840.
TEST(RMSNormCuda, OutputInTheProjectionsDtype) {
  SKIP_WITHOUT_CUDA();
  for (at::ScalarType output : {at::kBFloat16, at::kHalf})
    for (std::vector<int64_t> shape : {std::vector<int64_t>{3, 40}, {2, 1500, 768}, {1, 64, 3840}}) {
      at::Tensor x0 = at::randn(shape, at::kCUDA) * 3, w0 = 1 + 0.1 * at::randn({shape.back()}, at::kCUDA);
      at::Tensor dy = at::randn(shape, at::kCUDA).to(output);
      auto run = [&](bool given) {
        at::Tensor x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
        at::Tensor y = given ? rms_norm(x, w, 1e-6, output) : rms_norm(x, w, 1e-6).to(output);
        auto grads = torch::autograd::grad({y}, {x, w}, {dy});
        return std::vector<at::Tensor>{y, grads[0], grads[1]};
      };
      auto given = run(true), cast = run(false);
      EXPECT_EQ(given[0].scalar_type(), output);
      for (int i = 0; i < 3; ++i)
        EXPECT_TRUE(at::equal(given[i], cast[i])) << i << " " << at::toString(output) << " D " << shape.back();
    }
}

// A fused residual op against the same ops apart: `outputs(fused, residual, x, w)` returns the
// op's outputs; each output's gradient is random, or none for the first output where
// `first_used` is false. Every output and the gradients of the residual, the branch x (bf16 as the
// projections write it under autocast, or float32) and the weight must match bit for bit.
template <class Outputs>
void expect_fused_same_as_apart(Outputs outputs, const char* op) {
  for (at::ScalarType branch : {at::kBFloat16, at::kFloat})
    for (std::vector<int64_t> shape : {std::vector<int64_t>{2, 50, 384}, {2, 1500, 768}, {1, 64, 3840}})
      for (bool first_used : {true, false}) {
        const int64_t D = shape.back();
        at::Tensor residual0 = at::randn(shape, at::kCUDA), x0 = at::randn(shape, at::kCUDA).to(branch);
        at::Tensor w0 = 1 + 0.1 * at::randn({D}, at::kCUDA);
        std::vector<at::Tensor> dys;
        auto run = [&](bool fused) {
          at::Tensor residual = residual0.clone().requires_grad_(true), x = x0.clone().requires_grad_(true),
                     w = w0.clone().requires_grad_(true);
          std::vector<at::Tensor> out = outputs(fused, residual, x, w);
          while (dys.size() < out.size()) dys.push_back(at::randn(shape, at::kCUDA));
          std::vector<at::Tensor> ys = out, gys = dys;
          if (!first_used && ys.size() > 1) ys.erase(ys.begin()), gys.erase(gys.begin());
          for (const at::Tensor& g : torch::autograd::grad(ys, {residual, x, w}, gys)) out.push_back(g);
          return out;
        };
        auto fused = run(true), apart = run(false);
        ASSERT_EQ(fused.size(), apart.size());
        for (size_t i = 0; i < fused.size(); ++i)
          EXPECT_TRUE(at::equal(fused[i], apart[i])) << op << " output " << i << " " << at::toString(branch)
                                                     << " D " << D << (first_used ? "" : ", the first unused");
      }
}

// add_rms_norm: {h, norm(h)} for h = residual + x (pre-norm blocks).
TEST(AddRMSNormCuda, SameAsAddThenNorm) {
  SKIP_WITHOUT_CUDA();
  expect_fused_same_as_apart(
      [](bool fused, const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w) {
        if (fused) {
          auto [h, n] = add_rms_norm(residual, x, w, 1e-6);
          return std::vector<at::Tensor>{h, n};
        }
        at::Tensor h = residual + x;
        return std::vector<at::Tensor>{h, rms_norm(h, w, 1e-6)};
      },
      "add_rms_norm");
}

// rms_norm_keeping_input (a pre-norm block's input, its norm in bf16 or float32): x's gradient is
// the kept copy's plus the norm's, summed in the norm's backward: bit for bit x and rms_norm(x)
// apart, with both used and with the kept copy unused.
TEST(RMSNormCuda, KeepingInputSameAsApart) {
  SKIP_WITHOUT_CUDA();
  for (at::ScalarType output : {at::kBFloat16, at::kFloat})
    for (std::vector<int64_t> shape : {std::vector<int64_t>{3, 40}, {2, 1500, 768}, {1, 64, 3840}})
      for (bool kept_used : {true, false}) {
        at::Tensor x0 = at::randn(shape, at::kCUDA) * 3, w0 = 1 + 0.1 * at::randn({shape.back()}, at::kCUDA);
        at::Tensor dkept = at::randn(shape, at::kCUDA), dn = at::randn(shape, at::kCUDA).to(output);
        auto run = [&](bool fused) {
          at::Tensor x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
          auto [kept, n] = fused ? rms_norm_keeping_input(x, w, 1e-6, output)
                                 : std::pair<at::Tensor, at::Tensor>{x, rms_norm(x, w, 1e-6, output)};
          std::vector<at::Tensor> ys = {n}, gys = {dn};
          if (kept_used) ys.push_back(kept * 1), gys.push_back(dkept);
          auto grads = torch::autograd::grad(ys, {x, w}, gys);
          return std::vector<at::Tensor>{kept, n, grads[0], grads[1]};
        };
        auto fused = run(true), apart = run(false);
        for (int i = 0; i < 4; ++i)
          EXPECT_TRUE(at::equal(fused[i], apart[i])) << i << " " << at::toString(output) << " D " << shape.back()
                                                     << (kept_used ? "" : ", kept unused");
      }
}

// add_rms_norm with the norm written in bf16 (a pre-norm block under autocast): the add, then the
// norm cast.
TEST(AddRMSNormCuda, NormInBf16SameAsAddThenNormCast) {
  SKIP_WITHOUT_CUDA();
  expect_fused_same_as_apart(
      [](bool fused, const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w) {
        if (fused) {
          auto [h, n] = add_rms_norm(residual, x, w, 1e-6, at::kBFloat16);
          return std::vector<at::Tensor>{h, n};
        }
        at::Tensor h = residual + x;
        return std::vector<at::Tensor>{h, rms_norm(h, w, 1e-6).to(at::kBFloat16)};
      },
      "add_rms_norm into bf16");
}

// add_normed: residual + norm(x) (post-norm blocks), the norm in x's dtype.
TEST(AddNormedCuda, SameAsNormThenAdd) {
  SKIP_WITHOUT_CUDA();
  expect_fused_same_as_apart(
      [](bool fused, const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w) {
        return std::vector<at::Tensor>{fused ? add_normed(residual, x, w, 1e-6) : residual + rms_norm(x, w, 1e-6)};
      },
      "add_normed");
}

TEST(RMSNormCuda, WideRowsFallBackToAten) {
  SKIP_WITHOUT_CUDA();
  check_rms_norm_against_float64({3, 5000}, at::kFloat, 99);
}

TEST(GatedRMSNormCuda, SmallShapes) {
  SKIP_WITHOUT_CUDA();
  check_against_float64({1, 16}, at::kFloat, at::kBFloat16, 1);
  check_against_float64({3, 5, 100}, at::kBFloat16, at::kBFloat16, 2);
  check_against_float64({9, 256}, at::kFloat, at::kFloat, 3);
  at::Tensor x = at::randn({2, 8}, at::kCUDA);
  EXPECT_THROW(gated_rms_norm(x, at::randn({2, 8}), at::ones({8}, at::kCUDA), 1e-6), std::invalid_argument);  // gate on the CPU
}

// The gate is read where it is: a column slice of a wider matrix (GDN's gate in the fused
// projection's output, its gradient written as the same slice of a buffer as wide) and a layout
// that needs a copy (heads not adjacent) give the values and gradients of a contiguous gate; with float32 x (the one-row kernels) and bf16 x (all three
// dtypes 2 bytes: the wide form, the slice's rows 16-byte aligned).
class GatedRMSNormGateSlices : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(GatedRMSNormGateSlices, ReadInPlace) {
  SKIP_WITHOUT_CUDA();
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  at::Tensor wide = at::randn({2, 50, 400}, bf16);
  at::Tensor x0 = at::randn({2, 50, 3, 96}, at::kCUDA).to(GetParam()), dy = at::randn({2, 50, 3, 96}, at::kCUDA);
  at::Tensor w = (1 + 0.1 * at::randn({96}, at::kCUDA)).requires_grad_(true);
  auto run = [&](const at::Tensor& gate0) {
    at::Tensor x = x0.clone().requires_grad_(true), gate = gate0.detach().requires_grad_(true);
    at::Tensor y = gated_rms_norm(x, gate, w, 1e-6);
    auto grads = torch::autograd::grad({y}, {x, gate, w}, {dy});
    return std::vector<at::Tensor>{y, grads[0], grads[1], grads[2]};
  };
  at::Tensor slice = wide.narrow(-1, 40, 3 * 96).view({2, 50, 3, 96});
  at::Tensor scattered = at::randn({2, 3, 50, 96}, bf16).transpose(1, 2);
  auto contiguous = run(slice.contiguous()), sliced = run(slice);
  auto scattered_copy = run(scattered.contiguous()), scattered_read = run(scattered);
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(at::equal(sliced[i], contiguous[i])) << i;
    EXPECT_TRUE(at::equal(scattered_read[i], scattered_copy[i])) << i;
  }
  // The slice's gradient is laid out as the slice (the fused projection's backward takes it in
  // place: util/column_window.h), in memory of its own; the copied layout's comes contiguous.
  EXPECT_EQ(sliced[2].strides(), slice.strides());
  EXPECT_EQ(sliced[2].storage_offset(), 40);
  EXPECT_NE(sliced[2].data_ptr(), slice.data_ptr());
  EXPECT_TRUE(scattered_read[2].is_contiguous());
}

INSTANTIATE_TEST_SUITE_P(GatedRMSNormCuda, GatedRMSNormGateSlices, ::testing::Values(at::kFloat, at::kBFloat16),
                         [](const auto& info) { return std::string(at::toString(info.param)); });

TEST(GatedRMSNormCuda, MatchFloat64) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 10;
  for (int64_t D : {16, 64, 96, 100, 192, 256})
    for (auto [xd, gd] : {std::pair{at::kFloat, at::kBFloat16}, std::pair{at::kBFloat16, at::kBFloat16},
                          std::pair{at::kFloat, at::kFloat}, std::pair{at::kHalf, at::kFloat}})
      check_against_float64({2, 37, 3, D}, xd, gd, seed++);
  // y in the gate's dtype (GDN's: float32 x, bf16 gate and y).
  for (int64_t D : {96, 192}) check_against_float64({2, 37, 3, D}, at::kFloat, at::kBFloat16, seed++, at::kBFloat16);
  // More rows than the backward's blocks (as many as fit on the GPU at once) cover at once.
  check_against_float64({1, 8192, 3, 192}, at::kFloat, at::kBFloat16, seed++);
  check_against_float64({1, 8192, 3, 192}, at::kFloat, at::kBFloat16, seed++, at::kBFloat16);
  check_against_float64({1, 8192, 3, 192}, at::kBFloat16, at::kBFloat16, seed++);  // the wide form's (GDN's dtypes)
}

TEST(GatedRMSNormCuda, WideRowsFallBackToAten) {
  SKIP_WITHOUT_CUDA();
  check_against_float64({5, 320}, at::kFloat, at::kBFloat16, 99);
}

}  // namespace
