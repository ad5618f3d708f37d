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
// (rows / 8, H); bf16 and half rows of D up to 128 take a wider form (to_chunks_wide_kernel: a
// half-warp a row, four rows a warp in flight). A warp moves a few hundred bytes, so its index
// arithmetic counts: the head comes from the grid, and a token's batch row and position from one
// 32-bit division (none for one batch row), not three 64-bit ones (a software routine of about a
// hundred instructions each, several times a row's real work).
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

// to_chunks_kernel's form for 2-byte x (bf16, half) with D a multiple of 8 up to 128 and 16-byte
// aligned rows (launch_to_chunks checks): a half-warp a row, lane p of it holding elements
// 8p .. 8p + 7 (one 16-byte load, one 16-byte store of raw), the row's sum of squares over the
// half-warp by four xor shuffles. A warp takes rows 2w, 2w + 1 of each of four groups of 16 rows
// and issues all four loads before it reduces any: the one-row form kept 192 bytes a warp in
// flight, so that its reads waited on DRAM latency (62 us for q or k at the OLMo shape, the same
// with and without its float32 writes, twenty-ninth session). A block of 8 warps is one chunk
// (64 rows) of one head: grid (rows / 64, H).
constexpr int kWideGroups = 4, kWideRowsABlock = kWarps * 2 * kWideGroups;
static_assert(kWideRowsABlock == kChunk, "a block of the wide form is one chunk");

template <class x_t, bool kNorm>
__global__ void to_chunks_wide_kernel(const x_t* __restrict__ x, Geometry g, float* __restrict__ y,
                                      x_t* __restrict__ raw, float* __restrict__ scale) {
  static_assert(sizeof(x_t) == 2, "8 elements a 16-byte piece");
  const int lane = threadIdx.x % 32, piece = lane % 16, h = blockIdx.y;
  const bool holds = piece * 8 < g.D;  // lanes past the row's D / 8 pieces load nothing
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWideRowsABlock + (threadIdx.x / 32) * 2 + lane / 16;
  uint4 v[kWideGroups];
#pragma unroll
  for (int j = 0; j < kWideGroups; ++j) {
    const int64_t r = first + 16 * j;
    const Token tok = r < g.rows ? token_of(g.tokens, r) : Token{-1, 0};
    const bool loads = holds && tok.b >= 0;  // padding rows and lanes past D: zeros
    v[j] = loads ? *reinterpret_cast<const uint4*>(row_of(x, g, tok, h) + 8 * piece) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int j = 0; j < kWideGroups; ++j) {
    const int64_t r = first + 16 * j;
    const x_t* e = reinterpret_cast<const x_t*>(&v[j]);
    float xv[8], ss = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) xv[i] = static_cast<float>(e[i]), ss += xv[i] * xv[i];
#pragma unroll
    for (int o = 8; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);  // within the half-warp
    const float s = kNorm ? rsqrtf(ss + 1e-6f) : 1.f;
    if (r >= g.rows) continue;
    const int64_t w = h * g.rows + r;  // the (head, row) pair's row of y
    if (holds && raw) *reinterpret_cast<uint4*>(raw + w * g.D + 8 * piece) = v[j];  // v came from x_t: exact
    if (holds && y) {
      float4* yr = reinterpret_cast<float4*>(y + w * g.D + 8 * piece);
      yr[0] = make_float4(xv[0] * s, xv[1] * s, xv[2] * s, xv[3] * s);
      yr[1] = make_float4(xv[4] * s, xv[5] * s, xv[6] * s, xv[7] * s);
    }
    if (scale && piece == 0) scale[w] = s;
  }
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

// to_chunks_wide_kernel where it applies (a 2-byte x, D a multiple of 8 up to 128, every row's
// start 16-byte aligned; the outputs are fresh and contiguous, so their rows are aligned too);
// false where it does not.
template <class x_t>
bool launched_wide_form(const x_t* x, const Geometry& g, bool l2norm, float* y, x_t* raw, float* scale,
                        cudaStream_t stream) {
  if constexpr (sizeof(x_t) != 2) {
    return false;
  } else {
    if (g.D % 8 != 0 || g.D > 128 || reinterpret_cast<uintptr_t>(x) % 16 != 0 || g.batch_stride % 8 != 0 ||
        g.token_stride % 8 != 0 || g.head_stride % 8 != 0)
      return false;
    auto kernel = l2norm ? to_chunks_wide_kernel<x_t, true> : to_chunks_wide_kernel<x_t, false>;
    const dim3 blocks(static_cast<unsigned>((g.rows + kWideRowsABlock - 1) / kWideRowsABlock), blocks_for(g).y);
    kernel<<<blocks, kWarps * 32, 0, stream>>>(x, g, y, raw, scale);
    return true;
  }
}

// y, raw and scale (each where defined) from x through to_chunks_wide_kernel or to_chunks_kernel.
void launch_to_chunks(const at::Tensor& x, const Geometry& g, bool l2norm, at::Tensor& y, at::Tensor& raw,
                      at::Tensor& scale) {
  if (g.rows * g.H * g.D == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "to_chunks_cuda", [&] {
    scalar_t* raw_ptr = raw.defined() ? raw.data_ptr<scalar_t>() : nullptr;
    float* scale_ptr = scale.defined() ? scale.data_ptr<float>() : nullptr;
    float* y_ptr = y.defined() ? y.data_ptr<float>() : nullptr;
    if (launched_wide_form(x.data_ptr<scalar_t>(), g, l2norm, y_ptr, raw_ptr, scale_ptr, stream)) return;
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
