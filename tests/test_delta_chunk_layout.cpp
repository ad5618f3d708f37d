// The chunk layout's CUDA kernels (to_chunks with and without the L2 norm, from_chunks, and their
// gradients) against the float64 ATen path on the same layout: rows of the batch with a padded last chunk,
// documents of cu_seqlens, inputs read in place from a column slice in low precision; o's gradient
// into the layout with the reverse pass's add; the op's own layout without float rows. Skips
// without a CUDA device.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <string>
#include <vector>

#include "../src/ops/delta_chunk_layout.h"

namespace {
using hybrid::ops::detail::chunk_layout;
#ifdef HYBRID_CUDA_KERNELS
using hybrid::ops::detail::ChunkedQkv;
using hybrid::ops::detail::qkv_into_chunks;
using hybrid::ops::detail::QkvWindows;
#endif
using hybrid::ops::detail::from_chunks;
using hybrid::ops::detail::keys_to_chunks;
using hybrid::ops::detail::output_grad_into_chunks;
using hybrid::ops::detail::Problem;
using hybrid::ops::detail::to_chunks;

double rel_rms(const at::Tensor& a, const at::Tensor& ref) {
  return ((a.cpu().to(at::kDouble) - ref).norm() / ref.norm()).item<double>();
}

// The sequences: documents' lengths summing to T (then B = 1), or the B rows when empty.
Problem problem(int64_t B, int64_t T, const std::vector<int64_t>& documents) {
  Problem p;
  p.B = B, p.T = T;
  p.offsets = {0};
  if (documents.empty()) {
    for (int64_t b = 1; b <= B; ++b) p.offsets.push_back(b * T);
  } else {
    for (int64_t len : documents) p.offsets.push_back(p.offsets.back() + len);
  }
  p.N = static_cast<int64_t>(p.offsets.size()) - 1;
  return p;
}

// documents: lengths summing to T (then B = 1), or empty for the B rows. x is a slice of D columns
// from column slice_start of a tensor 3 D wide (the middle third where slice_start is negative).
void check_against_float64(int64_t B, int64_t T, const std::vector<int64_t>& documents, int64_t H, int64_t D,
                           at::ScalarType dtype, bool l2norm, uint64_t seed, int64_t slice_start = -1) {
  at::manual_seed(seed);
  const Problem p = problem(B, T, documents);
  const bool docs = !documents.empty();
  // A slice of a wider tensor: token and head strides that are not the slice's own.
  at::Tensor wide = (at::randn({B, T, H, 3 * D}, at::kCUDA) * 2).to(dtype);
  at::Tensor x = wide.narrow(-1, slice_start < 0 ? D : slice_start, D).detach().requires_grad_(true);
  const auto lay = chunk_layout(p, docs, at::kCUDA), lay64 = chunk_layout(p, docs, at::kCPU);
  at::Tensor y = to_chunks(x, lay, at::kFloat, l2norm);
  at::Tensor dy = at::randn(y.sizes(), y.options());
  at::Tensor dx = torch::autograd::grad({y}, {x}, {dy})[0];

  at::Tensor x64 = x.detach().cpu().to(at::kDouble).requires_grad_(true);
  at::Tensor y64 = to_chunks(x64, lay64, at::kDouble, l2norm);
  at::Tensor dx64 = torch::autograd::grad({y64}, {x64}, {dy.cpu().to(at::kDouble)})[0];

  ASSERT_EQ(y.sizes(), y64.sizes());
  EXPECT_EQ(y.scalar_type(), at::kFloat);
  EXPECT_EQ(dx.scalar_type(), dtype);
  EXPECT_LT(rel_rms(y, y64), 1e-6) << "y B" << B << " T" << T << " docs " << documents.size() << " D" << D;
  EXPECT_LT(rel_rms(dx, dx64), dtype == at::kFloat ? 1e-6 : 6e-3)
      << "dx B" << B << " T" << T << " docs " << documents.size() << " D" << D;

  // keys_to_chunks: the same y, and for bf16 the raw rows exactly (bf16) with y = diag(scale) raw.
  const auto keys = keys_to_chunks(x, lay, at::kFloat, l2norm);
  EXPECT_TRUE(at::equal(keys.k, y));
  ASSERT_EQ(keys.raw.defined(), dtype == at::kBFloat16);
  if (keys.raw.defined()) {
    EXPECT_TRUE(at::equal(keys.raw.to(at::kFloat), to_chunks(x.detach(), lay, at::kFloat, false)));
    EXPECT_LT(rel_rms(keys.raw.to(at::kFloat) * keys.scale.unsqueeze(-1), y64), 1e-6);
    EXPECT_FALSE(keys.raw.requires_grad() || keys.scale.requires_grad());
  }
#ifdef HYBRID_CUDA_KERNELS
  // The op's own layout without the float rows (float_keys false, where every reader takes the raw
  // rows): the same raw rows and scales, the float rows a stand-in that holds no memory.
  if (dtype == at::kBFloat16) {
    const QkvWindows xs{x.detach(), x.detach(), x.detach()};
    const ChunkedQkv with = qkv_into_chunks(xs, lay, l2norm, false),
                     without = qkv_into_chunks(xs, lay, l2norm, false, /*float_keys=*/false);
    EXPECT_TRUE(at::equal(without.keys.raw, with.keys.raw) && at::equal(without.keys.scale, with.keys.scale));
    EXPECT_TRUE(at::equal(without.q.raw, with.q.raw) && at::equal(without.q.scale, with.q.scale));
    EXPECT_EQ(without.keys.k.sizes(), with.keys.k.sizes());
    EXPECT_TRUE(without.keys.k.stride(0) == 0 && without.q.k.stride(0) == 0) << "not a stand-in";
  }
#endif

  // from_chunks: out of the layout into tokens in dtype, and its gradient back into the layout.
  at::Tensor chunks = y.detach().requires_grad_(true), chunks64 = y.detach().cpu().to(at::kDouble).requires_grad_(true);
  at::Tensor z = from_chunks(chunks, lay, dtype), z64 = from_chunks(chunks64, lay64, at::kDouble);
  at::Tensor dz = at::randn(z.sizes(), z.options().dtype(at::kFloat)).to(dtype);
  at::Tensor dchunks = torch::autograd::grad({z}, {chunks}, {dz})[0];
  at::Tensor dchunks64 = torch::autograd::grad({z64}, {chunks64}, {dz.cpu().to(at::kDouble)})[0];
  ASSERT_EQ(z.sizes(), x.sizes());
  EXPECT_EQ(z.scalar_type(), dtype);
  EXPECT_LT(rel_rms(z, z64), dtype == at::kFloat ? 1e-7 : 6e-3) << "from_chunks B" << B << " T" << T;
  EXPECT_EQ(rel_rms(dchunks, dchunks64), 0.0) << "from_chunks' gradient B" << B << " T" << T;
}

// The layout's four index maps come in one copy to the device (here the CPU): the chunk offsets
// as the host has them, gather and scatter inverse to each other over the tokens, each chunk's run
// starting at its first token, and each map 256 bytes on from the copy's start. Rows of the
// batch copy the chunk offsets alone.
TEST(ChunkLayout, IndexMapsInOneCopy) {
  const std::vector<int64_t> lengths = {100, 0, 30, 64};
  const auto lay = chunk_layout(problem(1, 194, lengths), true, at::kCPU);
  const at::Tensor offsets = lay.offsets_on_device;
  ASSERT_TRUE(offsets.defined());
  EXPECT_EQ(std::vector<int64_t>(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + offsets.numel()),
            lay.chunk_offsets);
  for (const at::Tensor& map : {lay.gather, lay.scatter, lay.runs})  // (the copy's own start: the allocator's)
    EXPECT_EQ((static_cast<const char*>(map.data_ptr()) - static_cast<const char*>(offsets.data_ptr())) % 256, 0);
  const int64_t* gather = lay.gather.data_ptr<int64_t>();
  const int64_t* scatter = lay.scatter.data_ptr<int64_t>();
  for (int64_t t = 0; t < 194; ++t) EXPECT_EQ(gather[scatter[t]], t) << "token " << t;
  for (int64_t c = 0; c < lay.n_chunks; ++c) EXPECT_EQ(lay.runs[c][0].item<int64_t>(), gather[c * 64]) << c;
  const auto rows = chunk_layout(problem(2, 70, {}), false, at::kCPU);
  EXPECT_TRUE(at::equal(rows.offsets_on_device, at::tensor(std::vector<int64_t>{0, 2, 4}, at::kLong)));
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

// 2-byte rows the wide kernel does not take (it needs D a multiple of 8 up to 128 and 16-byte
// aligned rows) go through the one-row kernel with the same results: rows starting 8 bytes past a
// 16-byte boundary, and a D that is no multiple of 8.
TEST(ChunkLayoutCuda, RowsTheWideKernelDoesNotTake) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 40;
  for (bool l2norm : {true, false}) {
    check_against_float64(2, 100, {}, 2, 64, at::kBFloat16, l2norm, seed++, /*slice_start=*/4);
    check_against_float64(1, 90, {40, 50}, 3, 36, at::kHalf, l2norm, seed++);
    check_against_float64(2, 70, {}, 1, 20, at::kBFloat16, l2norm, seed++);
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

// o's gradient into the layout (read in place from a column slice) is to_chunks' exactly, and add =
// s QKG^T dO (QKG lower triangular, as the chunk terms make it) within TF32's or float32's error.
// Asked for dO in bf16, bf16 tokens give the same values in bf16 (their own kernel) and add
// within bf16's rounding of the float64 product, element by element (half a step, 2^-8 relative,
// and the split product's float32 sums); float32 tokens ignore the
// request (their values need not be bf16's).
TEST(ChunkLayoutCuda, OutputGradWithAdd) {
  SKIP_WITHOUT_CUDA();
  struct Shape {
    int64_t B, T;
    std::vector<int64_t> documents;
    int64_t H, V;
    at::ScalarType dtype;
  };
  const Shape shapes[] = {{2, 200, {}, 3, 192, at::kBFloat16},
                          {1, 300, {1, 63, 64, 65, 107}, 2, 128, at::kFloat},
                          {1, 70, {}, 1, 16, at::kBFloat16},
                          {2, 64, {}, 2, 256, at::kBFloat16},
                          {1, 300, {1, 63, 64, 65, 107}, 2, 96, at::kBFloat16}};
  uint64_t seed = 40;
  for (const Shape& s : shapes) {
    for (bool tf32 : {true, false}) {
      at::manual_seed(seed++);
      const auto lay = chunk_layout(problem(s.B, s.T, s.documents), !s.documents.empty(), at::kCUDA);
      const at::Tensor wide = at::randn({s.B, s.T, s.H, 3 * s.V}, at::kCUDA).to(s.dtype);
      const at::Tensor dO = wide.narrow(-1, s.V, s.V);
      const at::Tensor QKG = at::randn({s.H, lay.n_chunks, 64, 64}, at::kCUDA).tril();
      const auto got = output_grad_into_chunks(dO, QKG, lay, 0.3, tf32);
      const std::string name = "V" + std::to_string(s.V) + (tf32 ? " TF32" : "");
      ASSERT_TRUE(got.has_value()) << name;
      const at::Tensor dO_chunks = to_chunks(dO, lay, at::kFloat, false);
      EXPECT_TRUE(at::equal(got->dO, dO_chunks)) << name;
      const at::Tensor add64 = at::matmul(QKG.to(at::kDouble).mT(), dO_chunks.to(at::kDouble)) * 0.3;
      EXPECT_LT(rel_rms(got->add, add64.cpu()), tf32 ? 3e-3 : 1e-5) << name;
      const auto halves = output_grad_into_chunks(dO, QKG, lay, 0.3, tf32, /*dO_bf16=*/true);
      ASSERT_TRUE(halves.has_value()) << name;
      EXPECT_EQ(halves->dO.scalar_type(), s.dtype) << name;
      EXPECT_EQ(halves->add.scalar_type(), s.dtype) << name;
      EXPECT_TRUE(at::equal(halves->dO.to(at::kFloat), dO_chunks)) << "bf16 dO, " << name;
      if (s.dtype == at::kBFloat16) {
        const at::Tensor add16 = halves->add.to(at::kDouble).cpu(), ref = add64.cpu();
        EXPECT_LT(rel_rms(add16, ref), 3e-3) << "bf16 add, " << name;
        const at::Tensor bound = ref.abs() * std::ldexp(1.0, -8) + 1e-4 * ref.abs().max();
        EXPECT_TRUE(((add16 - ref).abs() <= bound).all().item<bool>()) << "bf16 add, " << name;
      } else {
        EXPECT_TRUE(at::equal(halves->add, got->add)) << "float32 tokens, " << name;
      }
    }
  }
  const auto lay = chunk_layout(problem(1, 64, {}), false, at::kCUDA);
  EXPECT_FALSE(output_grad_into_chunks(at::zeros({1, 64, 1, 40}, at::kCUDA), at::zeros({1, 1, 64, 64}, at::kCUDA), lay,
                                       1, true)
                   .has_value());  // V = 40: no multiple of 16
}

}  // namespace
