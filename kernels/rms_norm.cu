// RMSNorm per row of D elements (the blocks' norms, the attention's QK-norm), forward and
// backward:
//   r = rsqrt(mean_d x_d^2 + eps),  u = x r,  y = w u
//   dn = dy w,  dx = r (dn - u mean_d(dn u)),  dw = sum over rows of dy u
// x, y, dy, dx [rows, D] in x's dtype, w [D] float32; arithmetic in float32. x's rows may lie
// further apart than D (a column slice of a wider projection): x_stride.
// The blocks' residual adds fused in, bit for bit ATen's float32 adds: pre-norm (add_rms_norm_cuda)
// normalises h = residual + x, writing h too, and its backward writes dx + dh, h's gradient from
// the residual stream added as dx is written; post-norm (rms_norm_add_cuda) writes h = residual +
// y alone, y rounded to x's dtype first, and its backward reads h's float32 gradient, rounding it
// to x's dtype as autograd would for the add. What goes: ATen's float32 + bf16 add (an
// unrolled, unvectorised kernel for mixed dtypes), the gradient sum or cast, and y's store.
//
// Tiles: 256 threads a row, thread t holding elements t, t + 256, ... (up to 16, so D <= 4096)
// in registers; the row's sums by warp shuffles and shared memory. The forward takes one block
// a row. The backward launches as many blocks as fit on the GPU at once (a fixed 512 at three
// blocks an SM, 396 on an H200, left a second wave of 116 blocks walking their rows on a
// quarter-full GPU; 290 -> 228 us a float32 backward at the 7b width, 8K tokens, thirtieth
// session), which walk the rows with a stride, each thread keeping its columns' dw sums in
// registers; one partial [D] a block, summed afterwards in a fixed order, so the gradient is
// deterministic. r is recomputed there rather than saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "reductions.cuh"
#include "resident_blocks.cuh"

namespace hybrid::ops {
namespace {

using detail::block_sum;

constexpr int kThreads = 256, kPerThread = 16;

// The row's x in registers and its r.
template <class x_t>
__device__ __forceinline__ float load_row(const x_t* __restrict__ xr, int D, float eps, float (&xv)[kPerThread],
                                          float* scratch) {
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int d = threadIdx.x + i * kThreads;
    xv[i] = d < D ? static_cast<float>(xr[d]) : 0.f;
    ss += xv[i] * xv[i];
  }
  return rsqrtf(block_sum(ss, scratch) / D + eps);
}

// Where a float32 residual (rows D apart) comes in: kBefore normalises h = residual + x, written
// to h_out as it is formed (add_rms_norm_cuda); kAfter writes h = residual + y to h_out instead of
// y (rms_norm_add_cuda), y rounded to y_t first. Each sum is ATen's float32 add, bit for bit.
enum class Residual { kNone, kBefore, kAfter };

template <class x_t, class y_t, Residual kResidual>
__global__ void __launch_bounds__(kThreads)
    rms_norm_forward(const x_t* __restrict__ x, const float* __restrict__ residual, float* __restrict__ h_out,
                     const float* __restrict__ w, y_t* __restrict__ y, int D, int64_t x_stride, float eps) {
  __shared__ float scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  float xv[kPerThread], ss = 0.f;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int d = threadIdx.x + i * kThreads;
    xv[i] = d < D ? static_cast<float>(x[row * x_stride + d]) : 0.f;
    // The null test, always true here, is kept on purpose: with it this instance compiles to 32
    // registers and measured 127 us at the 7b width (thirtieth session, call 4); without it the
    // compiler hoists every load (42 registers) and it took 155 (call 5).
    if (kResidual == Residual::kBefore && residual != nullptr && d < D) {
      xv[i] = __fadd_rn(residual[row * D + d], xv[i]);
      h_out[row * D + d] = xv[i];
    }
    ss += xv[i] * xv[i];
  }
  const float r = rsqrtf(block_sum(ss, scratch) / D + eps);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int d = threadIdx.x + i * kThreads;
    if (d >= D) continue;
    const y_t n = static_cast<y_t>(w[d] * (xv[i] * r));
    if constexpr (kResidual == Residual::kAfter)
      h_out[row * D + d] = __fadd_rn(residual[row * D + d], static_cast<float>(n));
    else
      y[row * D + d] = n;
  }
}

// dy rounded to x's dtype first (a float32 dy for bf16 x: the gradient of rms_norm_add_cuda's h,
// rounded as autograd rounds an add's gradient to its bf16 operand's dtype). Three blocks an SM
// (at most 80 registers) with the sum too, where it would take 95 (two).
template <class x_t, class dy_t, bool kSum>
__global__ void __launch_bounds__(kThreads, 3)
    rms_norm_backward(const x_t* __restrict__ x, const float* __restrict__ w, const dy_t* __restrict__ dy,
                      const float* __restrict__ dsum, x_t* __restrict__ dx, float* __restrict__ dw_partial,
                      int64_t rows, int D, int64_t x_stride, float eps) {
  __shared__ float scratch[kThreads / 32];
  float dw[kPerThread] = {};
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float xv[kPerThread], dn[kPerThread];
    const float r = load_row(x + row * x_stride, D, eps, xv, scratch);
    float dot = 0.f;  // sum_d dn_d u_d
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int d = threadIdx.x + i * kThreads;
      dn[i] = 0.f;
      if (d >= D) continue;
      const float u = xv[i] * r, g = static_cast<float>(static_cast<x_t>(dy[row * D + d]));
      dn[i] = g * w[d];
      dw[i] += g * u;
      dot += dn[i] * u;
    }
    const float mean_dot = block_sum(dot, scratch) / D;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int d = threadIdx.x + i * kThreads;
      if (d >= D) continue;
      const float dxi = r * (dn[i] - xv[i] * r * mean_dot);
      // Not contracted into an FMA: the sum is ATen's add of the two gradients, bit for bit.
      dx[row * D + d] = static_cast<x_t>(kSum ? __fadd_rn(dxi, dsum[row * D + d]) : dxi);
    }
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int d = threadIdx.x + i * kThreads;
    if (d < D) dw_partial[static_cast<int64_t>(blockIdx.x) * D + d] = dw[i];
  }
}

template <Residual kResidual, class y_t>
void launch_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& h_out, const at::Tensor& w,
                    const at::Tensor& y, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int D = static_cast<int>(x.size(1));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_forward", [&] {
    using out_t = std::conditional_t<std::is_void_v<y_t>, scalar_t, y_t>;
    rms_norm_forward<scalar_t, out_t, kResidual><<<rows, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), residual.defined() ? residual.data_ptr<float>() : nullptr,
        h_out.defined() ? h_out.data_ptr<float>() : nullptr, w.data_ptr<float>(),
        y.defined() ? y.data_ptr<out_t>() : nullptr, D, x.stride(0), static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// x [rows, D] with unit column stride and rows > 0, w [D] float32 contiguous, D <= 4096; y in
// x's dtype.
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  launch_forward<Residual::kNone, void>(x, at::Tensor(), at::Tensor(), w, y, eps);
  return y;
}

// h = residual + x and y = norm(h), both float32 (residual float32 [rows, D] contiguous).
std::pair<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& residual, const at::Tensor& x,
                                                    const at::Tensor& w, double eps) {
  at::Tensor h = at::empty_like(residual), y = at::empty_like(residual);
  launch_forward<Residual::kBefore, float>(x, residual, h, w, y, eps);
  return {h, y};
}

// h = residual + norm(x), the norm rounded to x's dtype, h float32 (residual as above).
at::Tensor rms_norm_add_cuda(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor h = at::empty_like(residual);
  launch_forward<Residual::kAfter, void>(x, residual, h, w, at::Tensor(), eps);
  return h;
}

// Returns {dx in x's dtype, dw [D] float32}; dy in x's dtype or float32. With dsum (float32
// [rows, D] contiguous, for float32 x), dx + dsum in dx's place: the gradient h gets from its
// other uses, added as the norm's is written.
std::pair<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dy,
                                                         double eps, const at::Tensor& dsum) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int D = static_cast<int>(x.size(1));
  at::Tensor dx = at::empty({rows, D}, x.options()), dw_partial;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_backward", [&] {
    const bool float_dy = dy.scalar_type() == at::kFloat;
    TORCH_CHECK(float_dy || dy.scalar_type() == x.scalar_type(), "rms_norm_backward_cuda: dy in x's dtype or float32");
    TORCH_CHECK(!dsum.defined() || x.scalar_type() == at::kFloat, "rms_norm_backward_cuda: dsum with float32 x only");
    // One grid for every instance (the plain one's resident blocks): the same dw sums in the same
    // order, whichever instance forms them.
    const int blocks = static_cast<int>(
        std::min(rows, detail::resident_blocks_on_gpu(rms_norm_backward<scalar_t, scalar_t, false>, kThreads)));
    dw_partial = at::empty({blocks, D}, w.options());
    auto launch = [&](auto kernel, const auto* dy_data, const float* dsum_data) {
      kernel<<<blocks, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), w.data_ptr<float>(), dy_data, dsum_data,
                                              dx.data_ptr<scalar_t>(), dw_partial.data_ptr<float>(), rows, D,
                                              x.stride(0), static_cast<float>(eps));
    };
    if (dsum.defined())
      launch(rms_norm_backward<scalar_t, float, true>, dy.data_ptr<float>(), dsum.data_ptr<float>());
    else if (float_dy)
      launch(rms_norm_backward<scalar_t, float, false>, dy.data_ptr<float>(), nullptr);
    else
      launch(rms_norm_backward<scalar_t, scalar_t, false>, dy.data_ptr<scalar_t>(), nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw_partial.sum(0)};
}

}  // namespace hybrid::ops
