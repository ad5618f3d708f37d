// Gated RMSNorm per row of D elements (Gated DeltaNet's output norm), forward and backward:
//   r = rsqrt(mean_d x_d^2 + eps),  u = x r,  n = u rounded to x's dtype,  s = sigmoid(g),
//   y = (w n) (g s)
//   dn = dy w g s,   dg = dy w n s (1 + g (1 - s)),   dw = sum over rows of dy n g s,
//   dx = r (dn - u mean_d(dn u))
// x [rows, D] in its dtype, gate [rows, D] in its own (read in place from a wider matrix: GDN's
// gate is a column slice of the fused projection), w [D] float32; arithmetic in float32.
//
// Tiles: one warp per row, lane l holding elements l, l + 32, ... (up to 8 a lane, so D <= 256)
// in registers; the row's sums are warp shuffles. Blocks of 8 warps. The backward's warps walk
// rows with a grid stride and keep their dw sums in registers; each block writes one partial
// [D] (warps added in shared memory in a fixed order), summed afterwards, so the gradient is
// deterministic. Loads and stores: consecutive lanes, consecutive elements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <tuple>

#include "reductions.cuh"

namespace hybrid::ops {
namespace {

constexpr int kWarps = 8, kPerLane = 8, kMaxBackwardBlocks = 1024;

using detail::warp_sum;

// Where the gate's rows are: row r at (r / heads) * ld + (r % heads) * D, so a gate [..., heads,
// D] with a row stride ld over its leading dims (a column slice) is read in place; contiguous is
// heads 1, ld D.
struct GateRows {
  int heads;
  int64_t ld;
  __device__ __forceinline__ int64_t offset(int64_t row, int D) const { return (row / heads) * ld + (row % heads) * D; }
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

template <class x_t, class g_t>
__global__ void gated_rms_norm_forward(const x_t* __restrict__ x, const g_t* __restrict__ gate, GateRows gate_rows,
                                       const float* __restrict__ w, x_t* __restrict__ y, int64_t rows, int D,
                                       float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  float xv[kPerLane];
  const float r = load_row(x + row * D, D, eps, xv);
  const g_t* gr = gate + gate_rows.offset(row, D);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d >= D) break;
    const float n = static_cast<float>(static_cast<x_t>(xv[i] * r));
    const float g = static_cast<float>(gr[d]);
    y[row * D + d] = static_cast<x_t>((w[d] * n) * (g / (1.f + expf(-g))));
  }
}

template <class x_t, class g_t>
__global__ void gated_rms_norm_backward(const x_t* __restrict__ x, const g_t* __restrict__ gate, GateRows gate_rows,
                                        const float* __restrict__ w, const x_t* __restrict__ dy,
                                        x_t* __restrict__ dx, g_t* __restrict__ dgate, float* __restrict__ dw_partial,
                                        int64_t rows, int D, float eps) {
  __shared__ float dw_warps[kWarps][32 * kPerLane];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float dw[kPerLane] = {};
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    float xv[kPerLane], dn[kPerLane];
    const float r = load_row(x + row * D, D, eps, xv);
    const g_t* gr = gate + gate_rows.offset(row, D);
    float dot = 0.f;  // sum_d dn_d u_d
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      dn[i] = 0.f;
      if (d >= D) continue;
      const float u = xv[i] * r, n = static_cast<float>(static_cast<x_t>(u));
      const float g = static_cast<float>(gr[d]), s = 1.f / (1.f + expf(-g));
      const float dyw = static_cast<float>(dy[row * D + d]) * w[d];
      dn[i] = dyw * g * s;
      dgate[row * D + d] = static_cast<g_t>(dyw * n * s * (1.f + g * (1.f - s)));
      dw[i] += static_cast<float>(dy[row * D + d]) * n * g * s;
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
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += dw_warps[v][d];
    dw_partial[static_cast<int64_t>(blockIdx.x) * D + d] = sum;
  }
}

// Both dtypes as template parameters: x (and y, dx) and gate (and dgate) need not match.
template <class Fn>
void dispatch_dtypes(const at::Tensor& x, const at::Tensor& gate, Fn fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_rms_norm", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "gated_rms_norm",
                                    [&] { fn(x_t{}, scalar_t{}); });
  });
}

// The gate as the kernels read it: itself, or a contiguous copy when its layout is not GateRows'.
std::pair<at::Tensor, GateRows> readable(const at::Tensor& gate) {
  const GateRows rows = gate_rows(gate);
  if (rows.heads > 0) return {gate, rows};
  return {gate.contiguous(), GateRows{1, gate.size(-1)}};
}

}  // namespace

// x [rows, D] contiguous, gate of any shape with rows x D elements (read in place when it can
// be), w [D] float32 contiguous, D <= 256.
at::Tensor gated_rms_norm_cuda(const at::Tensor& x, const at::Tensor& gate_in, const at::Tensor& w, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto read = readable(gate_in);
  const at::Tensor& gate = read.first;
  const GateRows layout = read.second;
  const int64_t rows = x.size(0);
  const int D = static_cast<int>(x.size(1));
  at::Tensor y = at::empty_like(x);
  const int blocks = static_cast<int>((rows + kWarps - 1) / kWarps);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtypes(x, gate, [&](auto x_tag, auto g_tag) {
    using x_t = decltype(x_tag);
    using g_t = decltype(g_tag);
    gated_rms_norm_forward<x_t, g_t><<<blocks, kWarps * 32, 0, stream>>>(
        x.data_ptr<x_t>(), gate.data_ptr<g_t>(), layout, w.data_ptr<float>(), y.data_ptr<x_t>(), rows, D,
        static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// Returns {dx in x's dtype, dgate [rows, D] contiguous in gate's dtype, dw [D] float32}.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_rms_norm_backward_cuda(const at::Tensor& x,
                                                                            const at::Tensor& gate_in,
                                                                            const at::Tensor& w, const at::Tensor& dy,
                                                                            double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto read = readable(gate_in);
  const at::Tensor& gate = read.first;
  const GateRows layout = read.second;
  const int64_t rows = x.size(0);
  const int D = static_cast<int>(x.size(1));
  at::Tensor dx = at::empty_like(x), dgate = at::empty_like(x, x.options().dtype(gate.scalar_type()));
  const int blocks = static_cast<int>(std::min<int64_t>((rows + kWarps - 1) / kWarps, kMaxBackwardBlocks));
  at::Tensor dw_partial = at::empty({std::max(blocks, 1), D}, w.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (rows > 0) {
    dispatch_dtypes(x, gate, [&](auto x_tag, auto g_tag) {
      using x_t = decltype(x_tag);
      using g_t = decltype(g_tag);
      gated_rms_norm_backward<x_t, g_t><<<blocks, kWarps * 32, 0, stream>>>(
          x.data_ptr<x_t>(), gate.data_ptr<g_t>(), layout, w.data_ptr<float>(), dy.data_ptr<x_t>(), dx.data_ptr<x_t>(),
          dgate.data_ptr<g_t>(), dw_partial.data_ptr<float>(), rows, D, static_cast<float>(eps));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    dw_partial.zero_();
  }
  return {dx, dgate, dw_partial.sum(0)};
}

}  // namespace hybrid::ops
