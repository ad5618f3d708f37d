// RMSNorm per row of D elements (the blocks' norms, the attention's QK-norm), forward and
// backward:
//   r = rsqrt(mean_d x_d^2 + eps),  u = x r,  y = w u
//   dn = dy w,  dx = r (dn - u mean_d(dn u)),  dw = sum over rows of dy u
// x, y, dy, dx [rows, D] in x's dtype, w [D] float32; arithmetic in float32. x's rows may lie
// further apart than D (a column slice of a wider projection): x_stride. y (and so dy) may also
// be in the compute dtype of the projection that reads it (bf16 for float32 x under autocast):
// rounded once as it is written, where a cast pass over float32 y would round it the same way.
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
#include <tuple>
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
// (at most 80 registers) with the sum too, where it would take 95 (two). With copy_t other than
// x_t, dx is written a second time, rounded to copy_t, into dx_copy (add_rms_norm's branch, bf16
// under autocast, takes h's gradient so: autograd's cast would round it the same way).
template <class x_t, class dy_t, bool kSum, class copy_t = x_t>
__global__ void __launch_bounds__(kThreads, 3)
    rms_norm_backward(const x_t* __restrict__ x, const float* __restrict__ w, const dy_t* __restrict__ dy,
                      const float* __restrict__ dsum, x_t* __restrict__ dx, copy_t* __restrict__ dx_copy,
                      float* __restrict__ dw_partial, int64_t rows, int D, int64_t x_stride, float eps) {
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
      const x_t g = static_cast<x_t>(kSum ? __fadd_rn(dxi, dsum[row * D + d]) : dxi);
      dx[row * D + d] = g;
      if constexpr (!std::is_same_v<copy_t, x_t>) dx_copy[row * D + d] = static_cast<copy_t>(static_cast<float>(g));
    }
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int d = threadIdx.x + i * kThreads;
    if (d < D) dw_partial[static_cast<int64_t>(blockIdx.x) * D + d] = dw[i];
  }
}

// f(t{}) for the C++ type of `dtype`, one a float32 value of value_t's is rounded to: value_t's
// own; float32 where kFloat32 (the backward's: rms_norm_add's float32 gradient of h, rounded to
// lower-precision x's dtype); for float32 values also bf16 and half (the compute dtype of a
// projection that reads a norm's output; the gradient that comes back from it, widened exactly).
template <class value_t, bool kFloat32, class F>
void with_type(at::ScalarType dtype, F&& f) {
  if (dtype == c10::CppTypeToScalarType<value_t>::value) return f(value_t{});
  if constexpr (kFloat32)
    if (dtype == at::kFloat) return f(float{});
  if constexpr (std::is_same_v<value_t, float>) {
    if (dtype == at::kBFloat16) return f(c10::BFloat16{});
    if (dtype == at::kHalf) return f(c10::Half{});
  }
  TORCH_CHECK(false, "rms_norm_cuda: no kernel for ", dtype, " with ", c10::CppTypeToScalarType<value_t>::value,
              " values");
}

// y in its dtype (with_type's for the normalised values: x's, or kBefore's float32 h); kAfter
// rounds the norm to x's dtype and writes no y.
template <Residual kResidual>
void launch_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& h_out, const at::Tensor& w,
                    const at::Tensor& y, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int D = static_cast<int>(x.size(1));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_forward", [&] {
    auto launch = [&](auto y_zero) {
      using out_t = decltype(y_zero);
      rms_norm_forward<scalar_t, out_t, kResidual><<<rows, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), residual.defined() ? residual.data_ptr<float>() : nullptr,
          h_out.defined() ? h_out.data_ptr<float>() : nullptr, w.data_ptr<float>(),
          y.defined() ? y.data_ptr<out_t>() : nullptr, D, x.stride(0), static_cast<float>(eps));
    };
    if constexpr (kResidual == Residual::kAfter)
      launch(scalar_t{});
    else if constexpr (kResidual == Residual::kBefore)
      with_type<float, false>(y.scalar_type(), launch);
    else
      with_type<scalar_t, false>(y.scalar_type(), launch);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// x [rows, D] with unit column stride and rows > 0, w [D] float32 contiguous, D <= 4096; y in
// y_dtype (x's, or for float32 x bf16 or half), rounded once from the float32 product.
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& w, double eps, at::ScalarType y_dtype) {
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options().dtype(y_dtype));
  launch_forward<Residual::kNone>(x, at::Tensor(), at::Tensor(), w, y, eps);
  return y;
}

// h = residual + x, float32 (residual float32 [rows, D] contiguous), and y = norm(h) in y_dtype
// (float32, bf16 or half).
std::pair<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& residual, const at::Tensor& x,
                                                    const at::Tensor& w, double eps, at::ScalarType y_dtype) {
  at::Tensor h = at::empty_like(residual), y = at::empty_like(residual, residual.options().dtype(y_dtype));
  launch_forward<Residual::kBefore>(x, residual, h, w, y, eps);
  return {h, y};
}

// h = residual + norm(x), the norm rounded to x's dtype, h float32 (residual as above).
at::Tensor rms_norm_add_cuda(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor h = at::empty_like(residual);
  launch_forward<Residual::kAfter>(x, residual, h, w, at::Tensor(), eps);
  return h;
}

// Returns {dx in x's dtype, dw [D] float32, and where copy_dtype differs from x's, dx rounded to
// it}; dy in x's dtype or float32, or for float32 x in bf16 or half (the gradient of a y the
// forward wrote in a projection's compute dtype: widened exactly). With dsum (float32 [rows, D]
// contiguous, for float32 x), dx + dsum in dx's place: the gradient h gets from its other uses,
// added as the norm's is written. A copy in another dtype (bf16 or half) only with dsum.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& x, const at::Tensor& w,
                                                                      const at::Tensor& dy, double eps,
                                                                      const at::Tensor& dsum,
                                                                      at::ScalarType copy_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int D = static_cast<int>(x.size(1));
  const bool copy = copy_dtype != x.scalar_type();
  TORCH_CHECK(!copy || (dsum.defined() && (copy_dtype == at::kBFloat16 || copy_dtype == at::kHalf)),
              "rms_norm_backward_cuda: a copy of dx in bf16 or half, with dsum, only");
  at::Tensor dx = at::empty({rows, D}, x.options()), dx_copy, dw_partial;
  if (copy) dx_copy = at::empty({rows, D}, x.options().dtype(copy_dtype));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_backward", [&] {
    TORCH_CHECK(!dsum.defined() || x.scalar_type() == at::kFloat, "rms_norm_backward_cuda: dsum with float32 x only");
    // One grid for every instance (the plain one's resident blocks): the same dw sums in the same
    // order, whichever instance forms them.
    const int blocks = static_cast<int>(
        std::min(rows, detail::resident_blocks_on_gpu(rms_norm_backward<scalar_t, scalar_t, false>, kThreads)));
    dw_partial = at::empty({blocks, D}, w.options());
    with_type<scalar_t, true>(dy.scalar_type(), [&](auto dy_zero) {
      using dy_t = decltype(dy_zero);
      auto launch = [&](auto kernel, const float* dsum_data, auto* copy_data) {
        kernel<<<blocks, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), w.data_ptr<float>(), dy.data_ptr<dy_t>(),
                                                dsum_data, dx.data_ptr<scalar_t>(), copy_data,
                                                dw_partial.data_ptr<float>(), rows, D, x.stride(0),
                                                static_cast<float>(eps));
      };
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (copy && copy_dtype == at::kBFloat16)
          return launch(rms_norm_backward<float, dy_t, true, c10::BFloat16>, dsum.data_ptr<float>(),
                        dx_copy.data_ptr<c10::BFloat16>());
        if (copy)
          return launch(rms_norm_backward<float, dy_t, true, c10::Half>, dsum.data_ptr<float>(),
                        dx_copy.data_ptr<c10::Half>());
      }
      scalar_t* none = nullptr;
      if (dsum.defined())
        launch(rms_norm_backward<scalar_t, dy_t, true>, dsum.data_ptr<float>(), none);
      else
        launch(rms_norm_backward<scalar_t, dy_t, false>, nullptr, none);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw_partial.sum(0), dx_copy};
}

}  // namespace hybrid::ops
