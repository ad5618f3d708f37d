// Float32 rows split into two bf16 planes each (bf16_split.cuh: hi, then lo), for the state
// pass's tensor-core operands: the keys (float32 inputs) and M, once before the pass rather than
// in shared memory every chunk step (that took a fifth of a step, kernel notes step 7).
#include "split_rows.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

#include "bf16_split.cuh"
#include "vector_access.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kC = 64;  // chunk length: the C x C matrices split transposed

// Rows of `cols` float32 (cols even) as split rows: row r's hi in bf16 0 .. cols - 1, its lo in
// cols .. 2 cols - 1, each word at swizzled_word(r, word) with `swizzle` (C x C matrices); a
// thread per pair of columns, rows_per_block rows a block.
__global__ void split_rows_kernel(const float* x, uint32_t* out, int64_t rows, int cols, int rows_per_block,
                                  bool swizzle) {
  const int half = cols / 2;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int n = static_cast<int>(min(static_cast<int64_t>(rows_per_block), rows - first)) * half;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t row = first + i / half;
    const int pair = i % half, r = swizzle ? static_cast<int>(row % kC) : 0;
    const float2 v = ld2(x + row * cols + 2 * pair);
    const SplitPair s = split_pair(v.x, v.y);
    out[row * cols + swizzled_word(r, pair)] = s.hi, out[row * cols + swizzled_word(r, half + pair)] = s.lo;
  }
}

// The C x C matrices of x, each transposed as it is split (the backward's M = T^T, from T
// without a transposed copy): a block a matrix, read into shared memory in rows, written out in
// split rows of the transpose (swizzled with `swizzle`).
__global__ void split_transposed_kernel(const float* x, uint32_t* out, bool swizzle) {
  __shared__ float tile[kC][kC + 1];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kC * kC;
  for (int i = threadIdx.x; i < kC * kC; i += blockDim.x) tile[i / kC][i % kC] = x[base + i];
  __syncthreads();
  constexpr int half = kC / 2;
  for (int i = threadIdx.x; i < kC * half; i += blockDim.x) {
    // Of the transpose: its (row, 2 pair) is x's (2 pair, row).
    const int row = i / half, pair = i % half, r = swizzle ? row : 0;
    const SplitPair s = split_pair(tile[2 * pair][row], tile[2 * pair + 1][row]);
    out[base + row * kC + swizzled_word(r, pair)] = s.hi, out[base + row * kC + swizzled_word(r, half + pair)] = s.lo;
  }
}

at::Tensor split_rows_as(const at::Tensor& x, bool swizzle) {
  const int cols = static_cast<int>(x.size(-1));
  const bool transposed = x.dim() >= 2 && x.size(-1) == kC && x.size(-2) == kC && x.stride(-1) == kC &&
                          x.stride(-2) == 1 && x.mT().is_contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kInt));
  const int64_t rows = x.numel() / std::max(cols, 1);
  if (rows == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto* split = reinterpret_cast<uint32_t*>(out.data_ptr<int>());
  if (transposed) {
    split_transposed_kernel<<<static_cast<unsigned>(rows / kC), 256, 0, stream>>>(x.data_ptr<float>(), split, swizzle);
  } else {
    const at::Tensor dense = x.contiguous();
    const int rows_per_block = std::max(1, 512 / cols);  // about 256 pairs: one for each of 256 threads
    split_rows_kernel<<<static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block), 256, 0, stream>>>(
        dense.data_ptr<float>(), split, rows, cols, rows_per_block, swizzle);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor split_rows(const at::Tensor& x) { return split_rows_as(x, false); }

at::Tensor split_chunk_matrices(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) == kC && x.size(-2) == kC, "split_chunk_matrices: needs [..., 64, 64]");
  return split_rows_as(x, true);
}

}  // namespace hybrid::ops::detail
