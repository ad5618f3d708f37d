// Causal depthwise conv + SiLU (Gated DeltaNet's short convolution), forward and backward:
//   z[t] = sum_{j<K} w[K-1-j] x[t-j] m(t, j),   y[t] = silu(z[t]) = z / (1 + exp(-z)),
//   m(t, j) = 1 if j <= pos_in_doc[t] (or t - j >= 0 without documents), else 0;
//   dz[t] = dy[t] silu'(z[t]),   silu'(z) = s (1 + z (1 - s)),  s = sigmoid(z);
//   dx[t] = sum_{j<K} w[K-1-j] dz[t+j] m(t+j, j);   dw[K-1-j] = sum_t dz[t] x[t-j] m(t, j).
// Per batch row b and channel c; x, y, dy, dx [B, T, C] in the input dtype, w [C, K] float32,
// arithmetic in float32. x is read with its own batch and row strides (channels contiguous), so
// a column slice of a wider projection output is read in place; y, dy and dx are contiguous.
//
// Tiles: a thread owns one channel and walks a tile of kTile time steps of one row, keeping the
// last K inputs (and in the backward the last K dz and document positions) in registers, so each
// element is read once plus a K-1 halo per tile. Loads go kAhead steps at a time ahead of their
// use, so that a thread has several in flight (one at a time left the kernels at 1.1 TB/s). Consecutive threads own consecutive channels:
// every load and store is coalesced. Grid (C / 256, T / kTile, B), 256 threads. The backward
// walks K-1 steps past its tile (dx[t] needs dz up to t+K-1) and writes its dw partial sums per
// tile, [B * tiles, C, K], summed afterwards in a fixed order, so the gradient is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace hybrid::ops {
namespace {

constexpr int kTile = 128, kThreads = 256;
constexpr int kAhead = 4;  // time steps whose loads are issued together (kTile a multiple)

// Whether term j of step t counts: inside the sequence and, with documents, inside t's document.
__device__ __forceinline__ bool tap_counts(int j, int64_t t, int64_t pos) { return j <= pos && j <= t; }

template <class scalar_t, int K>
__global__ void causal_conv_silu_forward(const scalar_t* __restrict__ x, const float* __restrict__ w,
                                         const int64_t* __restrict__ pos_in_doc, scalar_t* __restrict__ y,
                                         int64_t T, int64_t C, int64_t x_batch_stride, int64_t x_row_stride) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t b = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.y) * kTile, t1 = min(t0 + kTile, T);
  const scalar_t* xr = x + b * x_batch_stride + c;
  float wk[K], win[K];  // win[j] = x[t - j]
#pragma unroll
  for (int j = 0; j < K; ++j) {
    wk[j] = w[c * K + j];
    win[j] = (j < K - 1 && t0 - 1 - j >= 0) ? static_cast<float>(xr[(t0 - 1 - j) * x_row_stride]) : 0.f;  // shifted on entry
  }
  for (int64_t ts = t0; ts < t1; ts += kAhead) {
    // kAhead steps' inputs and positions loaded before any is used: more loads in flight.
    float xa[kAhead];
    int64_t pa[kAhead];
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int64_t t = ts + i;
      xa[i] = t < t1 ? static_cast<float>(xr[t * x_row_stride]) : 0.f;
      pa[i] = t < t1 ? (pos_in_doc ? pos_in_doc[b * T + t] : t) : 0;
    }
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int64_t t = ts + i;
      if (t >= t1) break;
#pragma unroll
      for (int j = K - 1; j > 0; --j) win[j] = win[j - 1];
      win[0] = xa[i];
      float z = wk[K - 1] * win[0];
#pragma unroll
      for (int j = 1; j < K; ++j)
        if (tap_counts(j, t, pa[i])) z += wk[K - 1 - j] * win[j];
      y[(b * T + t) * C + c] = static_cast<scalar_t>(z / (1.f + __expf(-z)));
    }
  }
}

template <class scalar_t, int K>
__global__ void causal_conv_silu_backward(const scalar_t* __restrict__ x, const float* __restrict__ w,
                                          const int64_t* __restrict__ pos_in_doc, const scalar_t* __restrict__ dy,
                                          scalar_t* __restrict__ dx, float* __restrict__ dw_partial, int64_t T,
                                          int64_t C, int64_t x_batch_stride, int64_t x_row_stride) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t b = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.y) * kTile, t1 = min(t0 + kTile, T);
  const scalar_t* xr = x + b * x_batch_stride + c;
  float wk[K], win[K], dwk[K];      // dwk[j]: partial sum for tap K-1-j
  float dzr[K];                     // dzr[i] = dz[t - i], masks folded in below
  int64_t posr[K];                  // posr[i] = position of step t - i
#pragma unroll
  for (int j = 0; j < K; ++j) {
    wk[j] = w[c * K + j];
    win[j] = (j < K - 1 && t0 - 1 - j >= 0) ? static_cast<float>(xr[(t0 - 1 - j) * x_row_stride]) : 0.f;  // shifted on entry
    dwk[j] = 0.f, dzr[j] = 0.f, posr[j] = 0;
  }
  const int64_t t_end = t1 + K - 1;  // dx[t1 - 1] needs dz up to t1 + K - 2; steps past T add dz = 0
  for (int64_t ts = t0; ts < t_end; ts += kAhead) {
    // kAhead steps' inputs, positions and output gradients loaded before any is used.
    float xa[kAhead], dya[kAhead];
    int64_t pa[kAhead];
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int64_t t = ts + i;
      const bool in = t < t_end && t < T;
      xa[i] = in ? static_cast<float>(xr[t * x_row_stride]) : 0.f;
      dya[i] = in ? static_cast<float>(dy[(b * T + t) * C + c]) : 0.f;
      pa[i] = in ? (pos_in_doc ? pos_in_doc[b * T + t] : t) : 0;
    }
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int64_t t = ts + i;
      if (t >= t_end) break;
#pragma unroll
      for (int j = K - 1; j > 0; --j) win[j] = win[j - 1], dzr[j] = dzr[j - 1], posr[j] = posr[j - 1];
      float dz = 0.f;
      int64_t pos = 0;
      if (t < T) {
        win[0] = xa[i];
        pos = pa[i];
        float z = wk[K - 1] * win[0];
#pragma unroll
        for (int j = 1; j < K; ++j)
          if (tap_counts(j, t, pos)) z += wk[K - 1 - j] * win[j];
        const float s = 1.f / (1.f + __expf(-z));
        dz = dya[i] * s * (1.f + z * (1.f - s));
        if (t < t1) {
#pragma unroll
          for (int j = 0; j < K; ++j)
            if (tap_counts(j, t, pos)) dwk[j] += dz * win[j];
        }
      }
      dzr[0] = dz, posr[0] = pos;
      // dx at step u = t - (K-1) gathers dz[u + j] = dzr[K-1-j] through tap K-1-j.
      const int64_t u = t - (K - 1);
      if (u >= t0) {
        float g = 0.f;
#pragma unroll
        for (int j = 0; j < K; ++j)
          if (tap_counts(j, u + j, posr[K - 1 - j])) g += wk[K - 1 - j] * dzr[K - 1 - j];
        dx[(b * T + u) * C + c] = static_cast<scalar_t>(g);
      }
    }
  }
  float* part = dw_partial + ((b * gridDim.y + blockIdx.y) * C + c) * K;
#pragma unroll
  for (int j = 0; j < K; ++j) part[K - 1 - j] = dwk[j];
}

template <int K>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const int64_t* pos, at::Tensor& y) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const dim3 grid((C + kThreads - 1) / kThreads, (T + kTile - 1) / kTile, B);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv_silu_forward", [&] {
    causal_conv_silu_forward<scalar_t, K><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), w.data_ptr<float>(), pos, y.data_ptr<scalar_t>(), T, C, x.stride(0), x.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int K>
void launch_backward(const at::Tensor& x, const at::Tensor& w, const int64_t* pos, const at::Tensor& dy,
                     at::Tensor& dx, at::Tensor& dw_partial) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const dim3 grid((C + kThreads - 1) / kThreads, (T + kTile - 1) / kTile, B);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv_silu_backward", [&] {
    causal_conv_silu_backward<scalar_t, K><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), w.data_ptr<float>(), pos, dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
        dw_partial.data_ptr<float>(), T, C, x.stride(0), x.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// K is a template parameter so the register windows stay in registers.
template <class Fn>
void with_kernel_size(int64_t K, Fn fn) {
  switch (K) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    default: TORCH_CHECK(false, "causal_conv_silu_cuda: kernel size ", K, " is not compiled (1 to 4 are)");
  }
}

const int64_t* positions(const at::Tensor& pos_in_doc) {
  return pos_in_doc.defined() ? pos_in_doc.data_ptr<int64_t>() : nullptr;
}

}  // namespace

// x [B, T, C] with x.stride(2) == 1, w [C, K] float32 contiguous, pos_in_doc [B, T] int64 contiguous or undefined.
at::Tensor causal_conv_silu_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& pos_in_doc) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  with_kernel_size(w.size(1), [&](auto K) { launch_forward<decltype(K)::value>(x, w, positions(pos_in_doc), y); });
  return y;
}

// Returns {dx [B, T, C] in x's dtype, dw [C, K] float32}.
std::pair<at::Tensor, at::Tensor> causal_conv_silu_backward_cuda(const at::Tensor& x, const at::Tensor& w,
                                                                 const at::Tensor& pos_in_doc, const at::Tensor& dy) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), K = w.size(1);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw_partial = at::empty({B * ((T + kTile - 1) / kTile), C, K}, w.options());
  with_kernel_size(K, [&](auto k) { launch_backward<decltype(k)::value>(x, w, positions(pos_in_doc), dy, dx, dw_partial); });
  return {dx, dw_partial.sum(0)};
}

}  // namespace hybrid::ops
