// The chunked delta rule's inputs into its chunk layout, with the optional L2 norm of q and k
// on the way (src/ops/delta_chunk_layout.h), and the gradient back:
//   y[h, r, d] = x[tok(r), h, d] s,   s = rsqrt(sum_d x[tok(r), h, d]^2 + 1e-6)  (1 without the norm)
//   dx[tok(r), h, d] = s (dy[h, r, d] - y[h, r, d] sum_d' y[h, r, d'] dy[h, r, d'])  (dy without)
// where chunk row r of the layout holds token tok(r), or padding (y = 0, no gradient). x
// [B, T, H, D] in its dtype with any token and head strides (q and k are column slices of the
// conv's output), y and dy [H, rows, D] float32, dx [B, T, H, D] in x's dtype, contiguous or a
// column window of the gradient of the tensor x is a window of (q, k and v's gradients written
// side by side, so that nothing concatenates them):
// the layout change, the cast and the norm in one pass each way instead of about six. For the
// keys the forward can also write raw[h, r, d] = x[tok(r), h, d] in x's dtype (bf16: exact) and
// scale[h, r] = s, so that the state pass takes exact bf16 keys (y = diag(s) raw).
//
// Tiles: one warp per (head, chunk row), lane l holding elements l, l + 32, ... (D <= 256) in
// registers; the row's sums are warp shuffles. Warps of a block take consecutive chunk rows of
// one head, so the float32 side is written and read in consecutive rows. Blocks of 8 warps, grid
// (rows / 8, H). A warp moves a few hundred bytes, so its index arithmetic counts: the head
// comes from the grid, and a token's batch row and position from one 32-bit division (none for
// one batch row), not three 64-bit ones (a software routine of about a hundred instructions
// each, several times a row's real work).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "chunk_tokens.cuh"
#include "reductions.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kWarps = 8, kPerLane = 8, kChunk = 64;

struct Geometry {
  ChunkTokens tokens;
  int64_t rows;
  int64_t batch_stride, token_stride, head_stride;  // x's, in elements
  int H, D;
};

template <class x_t>
__device__ __forceinline__ const x_t* row_of(const x_t* x, const Geometry& g, Token tok, int h) {
  return x + tok.b * g.batch_stride + tok.t * g.token_stride + h * g.head_stride;
}

template <class x_t, bool kNorm>
__global__ void to_chunks_kernel(const x_t* __restrict__ x, Geometry g, float* __restrict__ y, x_t* __restrict__ raw,
                                 float* __restrict__ scale) {
  const int lane = threadIdx.x % 32, h = blockIdx.y;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= g.rows) return;
  const int64_t w = h * g.rows + r;  // the (head, row) pair's row of y
  const Token tok = token_of(g.tokens, r);
  float* yr = y ? y + w * g.D : nullptr;  // null: the raw rows and scales alone
  float xv[kPerLane];
  const float ss = warp_load_row(tok.b >= 0 ? row_of(x, g, tok, h) : nullptr, g.D, xv);
  const float s = kNorm ? rsqrtf(ss + 1e-6f) : 1.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (yr && d < g.D) yr[d] = xv[i] * s;
    if (raw && d < g.D) raw[w * g.D + d] = static_cast<x_t>(xv[i]);  // xv came from x_t: exact
  }
  if (scale && lane == 0) scale[w] = s;
}

// Element strides of dx [B, T, H, D] (its last dim contiguous).
struct OutStrides {
  int64_t batch, token, head;
};

template <class x_t, bool kNorm>
__global__ void from_chunks_grad_kernel(const x_t* __restrict__ x, Geometry g, const float* __restrict__ dy,
                                        x_t* __restrict__ dx, OutStrides out) {
  const int lane = threadIdx.x % 32, h = blockIdx.y;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= g.rows) return;
  const Token tok = token_of(g.tokens, r);
  if (tok.b < 0) return;  // padding: no token to pass a gradient to
  const float* dyr = dy + (h * g.rows + r) * g.D;
  x_t* dxr = dx + tok.b * out.batch + tok.t * out.token + h * out.head;
  float dv[kPerLane], xv[kPerLane], ss = 0.f, dot = 0.f;
  const x_t* xr = kNorm ? row_of(x, g, tok, h) : nullptr;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    dv[i] = d < g.D ? dyr[d] : 0.f;
    xv[i] = (kNorm && d < g.D) ? static_cast<float>(xr[d]) : 0.f;
    ss += xv[i] * xv[i];
    dot += xv[i] * dv[i];
  }
  float s = 1.f, ydy = 0.f;  // ydy = sum y dy = s sum x dy
  if (kNorm) s = rsqrtf(warp_sum(ss) + 1e-6f), ydy = s * warp_sum(dot);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < g.D) dxr[d] = static_cast<x_t>(kNorm ? s * (dv[i] - xv[i] * s * ydy) : dv[i]);
  }
}

// x's sizes [B, T, H, D] and strides (only read with the norm, or by to_chunks).
Geometry geometry(at::IntArrayRef sizes, at::IntArrayRef strides, const at::Tensor& gather, int64_t rows) {
  const int64_t B = sizes[0], T = sizes[1];
  return Geometry{{gather.defined() ? gather.data_ptr<int64_t>() : nullptr, B, T, B > 0 ? rows / kChunk / B : 0},
                  rows,
                  strides[0],
                  strides[1],
                  strides[2],
                  static_cast<int>(sizes[2]),
                  static_cast<int>(sizes[3])};
}
Geometry geometry(const at::Tensor& x, const at::Tensor& gather, int64_t rows) {
  return geometry(x.sizes(), x.strides(), gather, rows);
}

dim3 blocks_for(const Geometry& g) {
  TORCH_CHECK(g.tokens.B * g.tokens.T < (int64_t{1} << 32) && g.H < 65536, "chunk layout: B * T must be below 2^32, H below 2^16");
  return dim3(static_cast<unsigned>((g.rows + kWarps - 1) / kWarps), static_cast<unsigned>(g.H));
}

// y, raw and scale (each where defined) from x through to_chunks_kernel.
void launch_to_chunks(const at::Tensor& x, const Geometry& g, bool l2norm, at::Tensor& y, at::Tensor& raw,
                      at::Tensor& scale) {
  if (g.rows * g.H * g.D == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "to_chunks_cuda", [&] {
    scalar_t* raw_ptr = raw.defined() ? raw.data_ptr<scalar_t>() : nullptr;
    float* scale_ptr = scale.defined() ? scale.data_ptr<float>() : nullptr;
    float* y_ptr = y.defined() ? y.data_ptr<float>() : nullptr;
    auto kernel = l2norm ? to_chunks_kernel<scalar_t, true> : to_chunks_kernel<scalar_t, false>;
    kernel<<<blocks_for(g), kWarps * 32, 0, stream>>>(x.data_ptr<scalar_t>(), g, y_ptr, raw_ptr, scale_ptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// x [B, T, H, D] with x.stride(3) == 1 and D <= 256; gather [rows] int64 or undefined (then
// rows = B * chunks a row * 64). Returns [H, rows, D] float32.
at::Tensor to_chunks_cuda(const at::Tensor& x, const at::Tensor& gather, int64_t rows, bool l2norm) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry(x, gather, rows);
  at::Tensor y = at::empty({g.H, rows, g.D}, x.options().dtype(at::kFloat)), none;
  launch_to_chunks(x, g, l2norm, y, none, none);
  return y;
}

// The same for the keys, with their raw values [H, rows, D] in x's dtype and the factor s each
// row was scaled by [H, rows] (1 without the norm): {y, raw, scale}; without floats y is not
// written (undefined), where every reader takes the raw rows.
std::vector<at::Tensor> keys_to_chunks_cuda(const at::Tensor& x, const at::Tensor& gather, int64_t rows, bool l2norm,
                                            bool floats) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry(x, gather, rows);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = floats ? at::empty({g.H, rows, g.D}, f32) : at::Tensor();
  at::Tensor raw = at::empty({g.H, rows, g.D}, x.options()), scale = at::empty({g.H, rows}, f32);
  launch_to_chunks(x, g, l2norm, y, raw, scale);
  return {y, raw, scale};
}

// The gradient of to_chunks_cuda: dy [H, rows, D] float32 contiguous out of the chunk layout into
// dx [B, T, H, D] (x's sizes and dtype; dx.stride(3) == 1, other strides any: contiguous, or a
// column window of a wider gradient), every token's row written (each sits in exactly one chunk
// row). With l2norm, the gradient of the norm on the way (x read for it); without, x is not read
// (it may be undefined).
void to_chunks_backward_cuda(const at::Tensor& x, const at::Tensor& gather, const at::Tensor& dy, bool l2norm,
                             at::Tensor& dx) {
  const c10::cuda::CUDAGuard guard(dy.device());
  TORCH_CHECK(dx.dim() == 4 && dx.stride(3) == 1 && dy.is_contiguous(),
              "to_chunks_backward_cuda: dx [B, T, H, D] with unit stride in D");
  const Geometry g = l2norm ? geometry(x, gather, dy.size(1)) : geometry(dx, gather, dy.size(1));
  if (dy.numel() == 0) return;
  const OutStrides out{dx.stride(0), dx.stride(1), dx.stride(2)};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "to_chunks_backward_cuda", [&] {
    const scalar_t* xp = l2norm ? x.data_ptr<scalar_t>() : nullptr;
    auto kernel = l2norm ? from_chunks_grad_kernel<scalar_t, true> : from_chunks_grad_kernel<scalar_t, false>;
    kernel<<<blocks_for(g), kWarps * 32, 0, stream>>>(xp, g, dy.data_ptr<float>(), dx.data_ptr<scalar_t>(), out);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y [H, rows, D] float32 contiguous -> [B, T, H, D] contiguous in dtype (from_chunks).
at::Tensor from_chunks_cuda(const at::Tensor& y, const at::Tensor& gather, int64_t B, int64_t T, at::ScalarType dtype) {
  at::Tensor out = at::empty({B, T, y.size(0), y.size(2)}, y.options().dtype(dtype));
  to_chunks_backward_cuda(at::Tensor(), gather, y, false, out);
  return out;
}

}  // namespace hybrid::ops::detail
