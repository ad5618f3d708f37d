// Gated RMSNorm per row of D elements (Gated DeltaNet's output norm), forward and backward:
//   r = rsqrt(mean_d x_d^2 + eps),  u = x r,  n = u rounded to x's dtype,  s = sigmoid(g),
//   y = (w n) (g s)
//   dn = dy w g s,   dg = dy w n s (1 + g (1 - s)),   dw = sum over rows of dy n g s,
//   dx = r (dn - u mean_d(dn u))
// x [rows, D] in its dtype, gate [rows, D] in its own (read in place from a wider matrix: GDN's
// gate is a column slice of the fused projection; its gradient is written as the same slice of
// the buffer the projection's other gradients go to, util/column_window.h), w [D] float32;
// arithmetic in float32. y (and dy) in x's dtype or the gate's: GDN's y feeds a bf16 matmul, so
// it is written in bf16 at once rather than in float32 and cast in a pass of its own.
//
// Tiles: one warp per row, lane l holding elements l, l + 32, ... (up to 8 a lane, so D <= 256)
// in registers; the row's sums are warp shuffles. Blocks of 8 warps. A row's loads (x, gate, dy)
// are all issued before its sum is reduced. The backward launches as many blocks as fit on the
// GPU at once (a second, partial wave would leave SMs idle), its warps walk rows with a grid
// stride and keep their dw sums in registers; each block writes one partial [D] (warps added in
// shared memory in a fixed order), summed afterwards, so the gradient is deterministic. Loads and
// stores: consecutive lanes, consecutive elements.
// Backward's wide form (x, gate and dy all 2-byte, D a multiple of 8 up to 256, rows 16-byte
// aligned: GDN's bf16 norm): lane l holds elements 8l .. 8l + 7, each row read and written in
// 16-byte pieces, and a warp loads kWideRows rows before it reduces any, so that more bytes are in
// flight than the one-row form's few hundred a warp: 186 -> 151 us at the 7b width, 8K tokens
// (thirtieth session). The forward in the same form measured no faster (103 -> 105 us), so it
// keeps the one-row form.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "fast_math.cuh"
#include "hybrid/util/column_window.h"
#include "reductions.cuh"
#include "resident_blocks.cuh"
#include "vector_access.cuh"

namespace hybrid::ops {
namespace {

constexpr int kWarps = 8, kPerLane = 8;

using detail::fast_sigmoid;
using detail::store;
using detail::warp_sum;

// Where the gate's rows are: row r at (r / heads) * ld + (r % heads) * D, so a gate [..., heads,
// D] with a row stride ld over its leading dims (a column slice) is read in place; contiguous is
// heads 1, ld D.
struct GateRows {
  int heads;
  int64_t ld;
  // row < 2^32 (checked on the host): one 32-bit division, where a 64-bit one is a software
  // routine of about a hundred instructions, as much as the rest of a row's work.
  __device__ __forceinline__ int64_t offset(int64_t row, int D) const {
    const uint32_t lead = static_cast<uint32_t>(row) / static_cast<uint32_t>(heads);
    return lead * ld + (static_cast<uint32_t>(row) - lead * static_cast<uint32_t>(heads)) * static_cast<int64_t>(D);
  }
};

// gate with x's shape [..., heads, D]: its row layout, or heads 0 when it needs a copy.
GateRows gate_rows(const at::Tensor& gate) {
  const int64_t D = gate.size(-1), dims = gate.dim();
  if (gate.stride(-1) != 1) return {0, 0};
  if (dims == 1) return {1, D};
  if (dims == 2) return gate.stride(0) >= D ? GateRows{1, gate.stride(0)} : GateRows{0, 0};
  if (gate.stride(-2) != D) return {0, 0};
  const int64_t heads = gate.size(-2), ld = gate.stride(-3);
  if (ld < heads * D || heads > (1 << 30)) return {0, 0};
  for (int64_t d = dims - 4; d >= 0; --d)  // the leading dims collapse into one stride
    if (gate.size(d) != 1 && gate.stride(d) != gate.stride(d + 1) * gate.size(d + 1)) return {0, 0};
  return {static_cast<int>(heads), ld};
}

// The row's x in registers and its r = rsqrt(mean x^2 + eps).
template <class x_t>
__device__ __forceinline__ float load_row(const x_t* __restrict__ xr, int D, float eps, float (&xv)[kPerLane]) {
  return rsqrtf(detail::warp_load_row(xr, D, xv) / D + eps);
}

// A lane's elements of a row: v[i] = row[lane + 32 i] (zeros past D).
template <class T>
__device__ __forceinline__ void load_lane(const T* __restrict__ row, int D, float (&v)[kPerLane]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    v[i] = d < D ? static_cast<float>(row[d]) : 0.f;
  }
}

template <class x_t, class g_t, class y_t>
__global__ void gated_rms_norm_forward(const x_t* __restrict__ x, const g_t* __restrict__ gate, GateRows gate_rows,
                                       const float* __restrict__ w, y_t* __restrict__ y, int64_t rows, int D,
                                       float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  float xv[kPerLane], gv[kPerLane];
  load_lane(gate + gate_rows.offset(row, D), D, gv);
  const float r = load_row(x + row * D, D, eps, xv);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d >= D) break;
    const float n = static_cast<float>(static_cast<x_t>(xv[i] * r));
    y[row * D + d] = static_cast<y_t>((w[d] * n) * (gv[i] * fast_sigmoid(gv[i])));
  }
}

// The block's partial dw, its warps' sums (dw_warps, filled by every warp) added in a fixed order.
__device__ __forceinline__ void write_block_partial(const float (&dw_warps)[kWarps][32 * kPerLane], int D,
                                                    float* __restrict__ dw_partial) {
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += dw_warps[v][d];
    dw_partial[static_cast<int64_t>(blockIdx.x) * D + d] = sum;
  }
}

template <class x_t, class g_t, class y_t>
__global__ void gated_rms_norm_backward(const x_t* __restrict__ x, const g_t* __restrict__ gate, GateRows gate_rows,
                                        const float* __restrict__ w, const y_t* __restrict__ dy,
                                        x_t* __restrict__ dx, g_t* __restrict__ dgate, GateRows dgate_rows,
                                        float* __restrict__ dw_partial, int64_t rows, int D, float eps) {
  __shared__ float dw_warps[kWarps][32 * kPerLane];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float dw[kPerLane] = {};
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    float xv[kPerLane], gv[kPerLane], dyv[kPerLane], dn[kPerLane];
    load_lane(gate + gate_rows.offset(row, D), D, gv);
    load_lane(dy + row * D, D, dyv);
    const float r = load_row(x + row * D, D, eps, xv);
    g_t* dgate_row = dgate + dgate_rows.offset(row, D);
    float dot = 0.f;  // sum_d dn_d u_d
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      dn[i] = 0.f;
      if (d >= D) continue;
      const float u = xv[i] * r, n = static_cast<float>(static_cast<x_t>(u));
      const float g = gv[i], s = fast_sigmoid(g);
      const float dyw = dyv[i] * w[d];
      dn[i] = dyw * g * s;
      dgate_row[d] = static_cast<g_t>(dyw * n * s * (1.f + g * (1.f - s)));
      dw[i] += dyv[i] * n * g * s;
      dot += dn[i] * u;
    }
    const float mean_dot = warp_sum(dot) / D;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) dx[row * D + d] = static_cast<x_t>(r * (dn[i] - xv[i] * r * mean_dot));
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dw_warps[warp][lane + 32 * i] = dw[i];
  write_block_partial(dw_warps, D, dw_partial);
}

// Wide form (header): the raw 16-byte piece at p (zeros where the lane holds none or the row is
// past the end), so that a warp's loads of several rows are all issued before any is converted
// by unpack; its results go out through vector_access.cuh's store<8>.
template <class T>
__device__ __forceinline__ uint4 raw_piece(const T* __restrict__ p, bool loads) {
  return loads ? *reinterpret_cast<const uint4*>(p) : make_uint4(0, 0, 0, 0);
}
template <class T>
__device__ __forceinline__ void unpack(const uint4& bits, float (&v)[8]) {
  const T* e = reinterpret_cast<const T*>(&bits);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(e[i]);
}

// The lane's pieces of x's and the gate's rows first .. first + R - 1, all loads issued together.
template <int R, class x_t, class g_t>
__device__ __forceinline__ void load_row_pieces(const x_t* __restrict__ x, const g_t* __restrict__ gate,
                                                const GateRows& gate_rows, int64_t first, int64_t rows, int D,
                                                int d0, uint4 (&xb)[R], uint4 (&gb)[R]) {
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const int64_t row = first + j;
    const bool loads = d0 < D && row < rows;
    xb[j] = raw_piece(x + row * D + d0, loads);
    gb[j] = raw_piece(gate + (loads ? gate_rows.offset(row, D) : 0) + d0, loads);
  }
}

// The lane's 8 weights (zeros where it holds no piece of the row).
__device__ __forceinline__ void lane_weights(const float* __restrict__ w, int d0, int D, float (&wv)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) wv[i] = d0 < D ? w[d0 + i] : 0.f;
}

constexpr int kWideRows = 2;

template <class x_t, class g_t, class y_t>
__global__ void gated_rms_norm_backward_wide(const x_t* __restrict__ x, const g_t* __restrict__ gate,
                                             GateRows gate_rows, const float* __restrict__ w,
                                             const y_t* __restrict__ dy, x_t* __restrict__ dx,
                                             g_t* __restrict__ dgate, GateRows dgate_rows,
                                             float* __restrict__ dw_partial, int64_t rows, int D, float eps) {
  __shared__ float dw_warps[kWarps][32 * kPerLane];
  const int warp = threadIdx.x / 32, d0 = 8 * (threadIdx.x % 32);
  const bool holds = d0 < D;
  float wv[8], dw[8] = {};
  lane_weights(w, d0, D, wv);
  for (int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kWideRows; first < rows;
       first += static_cast<int64_t>(gridDim.x) * kWarps * kWideRows) {
    uint4 xb[kWideRows], gb[kWideRows], dyb[kWideRows];
    load_row_pieces(x, gate, gate_rows, first, rows, D, d0, xb, gb);
#pragma unroll
    for (int j = 0; j < kWideRows; ++j) dyb[j] = raw_piece(dy + (first + j) * D + d0, holds && first + j < rows);
#pragma unroll
    for (int j = 0; j < kWideRows; ++j) {
      const int64_t row = first + j;
      float xv[8], gv[8], dyv[8], dn[8], dg[8], ss = 0.f, dot = 0.f;  // dot = sum_d dn_d u_d
      unpack<x_t>(xb[j], xv);
      unpack<g_t>(gb[j], gv);
      unpack<y_t>(dyb[j], dyv);
#pragma unroll
      for (int i = 0; i < 8; ++i) ss += xv[i] * xv[i];
      const float r = rsqrtf(warp_sum(ss) / D + eps);
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // zeros in, zeros out where the lane holds no row
        const float u = xv[i] * r, n = static_cast<float>(static_cast<x_t>(u));
        const float g = gv[i], s = fast_sigmoid(g), dyw = dyv[i] * wv[i];
        dn[i] = dyw * g * s;
        dg[i] = dyw * n * s * (1.f + g * (1.f - s));
        dw[i] += dyv[i] * n * g * s;
        dot += dn[i] * u;
      }
      const float mean_dot = warp_sum(dot) / D;
      if (!holds || row >= rows) continue;
#pragma unroll
      for (int i = 0; i < 8; ++i) dn[i] = r * (dn[i] - xv[i] * r * mean_dot);
      store<8>(dx + row * D + d0, dn);
      store<8>(dgate + dgate_rows.offset(row, D) + d0, dg);
    }
  }
  if (holds) {
#pragma unroll
    for (int i = 0; i < 8; ++i) dw_warps[warp][d0 + i] = dw[i];
  }
  write_block_partial(dw_warps, D, dw_partial);
}

// Whether rows of 2-byte elements take the wide form: D a multiple of 8 up to 256, every row's
// start 16-byte aligned (the gate's and dgate's through their layouts; the rows of x, dy and dx
// are D apart).
bool wide_rows(std::initializer_list<const void*> starts, const GateRows& gate, const GateRows& dgate, int D) {
  if (D % 8 != 0 || D > 256 || gate.ld % 8 != 0 || dgate.ld % 8 != 0) return false;
  for (const void* p : starts)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}
template <class x_t, class g_t, class y_t>
constexpr bool kTwoByteTypes = sizeof(x_t) == 2 && sizeof(g_t) == 2 && sizeof(y_t) == 2;

// The three dtypes as template parameters: x (and dx) and gate (and dgate) need not match; y
// (and dy) is in one of theirs.
template <class Fn>
void dispatch_dtypes(const at::Tensor& x, const at::Tensor& gate, at::ScalarType y, Fn fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_rms_norm", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "gated_rms_norm", [&] {
      if (y == x.scalar_type()) fn(x_t{}, scalar_t{}, x_t{});
      else fn(x_t{}, scalar_t{}, scalar_t{});
    });
  });
}

// What both kernels are launched with: the gate as they read it (itself, or a contiguous copy
// when its layout is not GateRows'), its layout, and x's rows and row length.
struct Operands {
  at::Tensor gate;
  GateRows layout;
  int64_t rows;
  int D;
};
Operands operands(const at::Tensor& x, const at::Tensor& gate) {
  TORCH_CHECK(x.size(0) < (int64_t{1} << 32), "gated_rms_norm_cuda: at most 2^32 - 1 rows");
  const GateRows rows = gate_rows(gate);
  const int D = static_cast<int>(x.size(1));
  if (rows.heads > 0) return {gate, rows, x.size(0), D};
  return {gate.contiguous(), GateRows{1, gate.size(-1)}, x.size(0), D};
}

// The gate's gradient, laid out as the gate where that is a column window of wider rows (GDN's
// fused projection: util::empty_window_like, so that the projection's backward finds it in
// place), contiguous otherwise. Heads of a [..., heads, D] gate are D apart in its rows (gate_rows).
at::Tensor gate_gradient_like(const at::Tensor& gate) {
  if (gate.dim() < 3) return util::empty_window_like(gate);
  return util::empty_window_like(gate.flatten(-2)).view(gate.sizes());
}

}  // namespace

// x [rows, D] contiguous, gate of any shape with rows x D elements (read in place when it can
// be), w [D] float32 contiguous, D <= 256; y in y_dtype, x's or the gate's.
at::Tensor gated_rms_norm_cuda(const at::Tensor& x, const at::Tensor& gate_in, const at::Tensor& w, double eps,
                               at::ScalarType y_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Operands op = operands(x, gate_in);
  at::Tensor y = at::empty_like(x, x.options().dtype(y_dtype));
  const int blocks = static_cast<int>((op.rows + kWarps - 1) / kWarps);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtypes(x, op.gate, y_dtype, [&](auto x_tag, auto g_tag, auto y_tag) {
    using x_t = decltype(x_tag);
    using g_t = decltype(g_tag);
    using y_t = decltype(y_tag);
    gated_rms_norm_forward<x_t, g_t, y_t><<<blocks, kWarps * 32, 0, stream>>>(
        x.data_ptr<x_t>(), op.gate.data_ptr<g_t>(), op.layout, w.data_ptr<float>(), y.data_ptr<y_t>(), op.rows, op.D,
        static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// dy [rows, D] contiguous in x's or the gate's dtype. Returns {dx in x's dtype, dgate with the
// gate's sizes in its dtype (gate_gradient_like), dw [D] float32}.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_rms_norm_backward_cuda(const at::Tensor& x,
                                                                            const at::Tensor& gate_in,
                                                                            const at::Tensor& w, const at::Tensor& dy,
                                                                            double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Operands op = operands(x, gate_in);
  at::Tensor dx = at::empty_like(x), dgate = gate_gradient_like(op.gate);
  const GateRows dgate_rows = gate_rows(dgate);
  TORCH_CHECK(dgate_rows.heads > 0, "gated_rms_norm_backward_cuda: the gate's gradient in no row layout");
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dw_partial;
  dispatch_dtypes(x, op.gate, dy.scalar_type(), [&](auto x_tag, auto g_tag, auto y_tag) {
    using x_t = decltype(x_tag);
    using g_t = decltype(g_tag);
    using y_t = decltype(y_tag);
    auto kernel = gated_rms_norm_backward<x_t, g_t, y_t>;
    int64_t rows_a_block = kWarps;
    if constexpr (kTwoByteTypes<x_t, g_t, y_t>) {
      if (wide_rows({x.data_ptr(), op.gate.data_ptr(), dy.data_ptr(), dx.data_ptr(), dgate.data_ptr()}, op.layout,
                    dgate_rows, op.D)) {
        kernel = gated_rms_norm_backward_wide<x_t, g_t, y_t>;
        rows_a_block = kWarps * kWideRows;
      }
    }
    const int64_t resident = detail::resident_blocks_on_gpu(kernel, kWarps * 32);
    const int blocks = static_cast<int>(
        std::max<int64_t>(std::min((op.rows + rows_a_block - 1) / rows_a_block, resident), 1));
    dw_partial = at::empty({blocks, op.D}, w.options());
    if (op.rows == 0) {
      dw_partial.zero_();
      return;
    }
    kernel<<<blocks, kWarps * 32, 0, stream>>>(x.data_ptr<x_t>(), op.gate.data_ptr<g_t>(), op.layout,
                                               w.data_ptr<float>(), dy.data_ptr<y_t>(), dx.data_ptr<x_t>(),
                                               dgate.data_ptr<g_t>(), dgate_rows, dw_partial.data_ptr<float>(), op.rows,
                                               op.D, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dgate, dw_partial.sum(0)};
}

}  // namespace hybrid::ops
