// The chunk layout's CUDA kernels (to_chunks with and without the L2 norm, and its gradient)
// against the float64 ATen path on the same layout: rows of the batch with a padded last chunk,
// documents of cu_seqlens, inputs read in place from a column slice in low precision. Skips
// without a CUDA device.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <vector>

#include "../src/ops/delta_chunk_layout.h"

namespace {
using hybrid::ops::detail::chunk_layout;
using hybrid::ops::detail::Problem;
using hybrid::ops::detail::to_chunks;

double rel_rms(const at::Tensor& a, const at::Tensor& ref) {
  return ((a.cpu().to(at::kDouble) - ref).norm() / ref.norm()).item<double>();
}

// documents: lengths summing to T (then B = 1), or empty for the B rows.
void check_against_float64(int64_t B, int64_t T, const std::vector<int64_t>& documents, int64_t H, int64_t D,
                           at::ScalarType dtype, bool l2norm, uint64_t seed) {
  at::manual_seed(seed);
  Problem p;
  p.B = B, p.T = T;
  p.offsets = {0};
  if (documents.empty()) {
    for (int64_t b = 1; b <= B; ++b) p.offsets.push_back(b * T);
  } else {
    for (int64_t len : documents) p.offsets.push_back(p.offsets.back() + len);
  }
  p.N = static_cast<int64_t>(p.offsets.size()) - 1;
  const bool docs = !documents.empty();
  // The middle third of a wider tensor: token and head strides that are not the slice's own.
  at::Tensor wide = (at::randn({B, T, H, 3 * D}, at::kCUDA) * 2).to(dtype);
  at::Tensor x = wide.narrow(-1, D, D).detach().requires_grad_(true);
  at::Tensor y = to_chunks(x, chunk_layout(p, docs, at::kCUDA), at::kFloat, l2norm);
  at::Tensor dy = at::randn(y.sizes(), y.options());
  at::Tensor dx = torch::autograd::grad({y}, {x}, {dy})[0];

  at::Tensor x64 = x.detach().cpu().to(at::kDouble).requires_grad_(true);
  at::Tensor y64 = to_chunks(x64, chunk_layout(p, docs, at::kCPU), at::kDouble, l2norm);
  at::Tensor dx64 = torch::autograd::grad({y64}, {x64}, {dy.cpu().to(at::kDouble)})[0];

  ASSERT_EQ(y.sizes(), y64.sizes());
  EXPECT_EQ(y.scalar_type(), at::kFloat);
  EXPECT_EQ(dx.scalar_type(), dtype);
  EXPECT_LT(rel_rms(y, y64), 1e-6) << "y B" << B << " T" << T << " docs " << documents.size() << " D" << D;
  EXPECT_LT(rel_rms(dx, dx64), dtype == at::kFloat ? 1e-6 : 6e-3)
      << "dx B" << B << " T" << T << " docs " << documents.size() << " D" << D;
}

#define SKIP_WITHOUT_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device"

TEST(ChunkLayoutCuda, RowsOfTheBatch) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 1;
  for (bool l2norm : {true, false}) {
    check_against_float64(2, 200, {}, 3, 96, at::kBFloat16, l2norm, seed++);  // last chunk padded
    check_against_float64(1, 128, {}, 2, 192, at::kFloat, l2norm, seed++);
    check_against_float64(3, 1, {}, 2, 256, at::kHalf, l2norm, seed++);
    check_against_float64(2, 64, {}, 1, 16, at::kBFloat16, l2norm, seed++);
  }
}

TEST(ChunkLayoutCuda, Documents) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 20;
  for (bool l2norm : {true, false}) {
    check_against_float64(1, 300, {1, 63, 64, 65, 107}, 3, 128, at::kBFloat16, l2norm, seed++);
    check_against_float64(1, 70, {70}, 2, 64, at::kFloat, l2norm, seed++);
  }
}

}  // namespace
