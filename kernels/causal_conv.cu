// Causal depthwise conv + SiLU (Gated DeltaNet's short convolution), forward and backward:
//   z[t] = sum_{j<K} w[K-1-j] x[t-j] m(t, j),   y[t] = silu(z[t]) = z s,  s = sigmoid(z),
//   m(t, j) = 1 if j <= pos_in_doc[t] (or t - j >= 0 without documents), else 0;
//   dz[t] = dy[t] silu'(z[t]),   silu'(z) = s (1 + z (1 - s));
//   dx[t] = sum_{j<K} w[K-1-j] dz[t+j] m(t+j, j);   dw[K-1-j] = sum_t dz[t] x[t-j] m(t, j).
// Per batch row b and channel c; x, y, dy, dx [B, T, C] in the input dtype, w [C, K] float32,
// arithmetic in float32. x is read with its own batch and row strides (channels contiguous), so
// a column slice of a wider projection output is read in place; y and dy are contiguous, and dx
// is laid out like x (util::empty_window_like: the same columns of a buffer as wide as x's rows,
// which the projection's backward then takes over as its output gradient instead of
// concatenating the groups' gradients).
//
// Tiles: a thread owns V adjacent channels (4 in the forward, 2 in the backward: one 8- or 4-byte
// access a step for bf16; V = 1 where the addresses are not aligned for it) and walks a tile of
// kTile time steps of one row, keeping the last K inputs (and in the backward the last K dz and
// document positions) in registers, so each element is read once plus a K-1 halo per tile. Loads
// go kAhead steps at a time ahead of their use. Consecutive threads own consecutive channels:
// every access is coalesced. Grid
// (C / (kThreads V), T / kTile, B), kThreads threads. The backward walks K-1 steps past its tile
// (dx[t] needs dz up to t+K-1) and writes its dw partial sums per tile, [B * tiles, C, K], summed
// afterwards in a fixed order, so the gradient is deterministic.
//
// Written first with a branch per tap, these kernels were bound by instruction issue, not memory
// (Nsight Compute at 7b width: 0.66 issued warps a scheduler, DRAM 24% busy), so a step now does
// little beyond its FMAs: the masks m are applied by zeroing the input window once (x[t-j]
// outside t's document is outside every later step's too, so the zeros stay right as the window
// shifts), positions are 32-bit, and sigmoid uses the fast division (2 ulp in float32). The
// forward then ran with DRAM 60% busy. The backward still issued 240M instructions (391 us, DRAM
// 31%) until its per-step tests and 64-bit index products went (two phases, pointer steps, no
// masks without documents): 100M, 190 us, DRAM 63% (twelfth session).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "fast_math.cuh"
#include "vector_access.cuh"
#include "hybrid/util/column_window.h"

namespace hybrid::ops {
namespace {

using detail::load;
using detail::store;

constexpr int kTile = 128, kThreads = 128;
constexpr int kAhead = 4;  // time steps whose loads are issued together (kTile a multiple)
constexpr int kAheadBackward = 4;  // the same in the backward's second phase
// Channels a thread where alignment allows: fewer in the backward, whose windows take more
// registers, so that more warps fit.
constexpr int kVecForward = 4, kVecBackward = 2;
// Blocks an SM the backward is compiled for (at most 72 registers): it lives on occupancy.
constexpr int kBackwardBlocks = 7;

// Step t's position in its document (t itself without documents).
__device__ __forceinline__ int position(const int64_t* __restrict__ pos_in_doc, int64_t b, int64_t T, int64_t t) {
  return static_cast<int>(pos_in_doc ? pos_in_doc[b * T + t] : t);
}

// The thread's weights, wk[j][v] = w[c + v, j], and the input window of the step before its tile,
// win[j][v] = x[t0 - 1 - j] for j < K - 1 (zeros before the sequence; shifted on the first step).
template <class scalar_t, int K, int V>
__device__ __forceinline__ void load_weights_and_halo(const float* __restrict__ w, const scalar_t* xr, int64_t c,
                                                      int64_t t0, int64_t x_row_stride, float (&wk)[K][V],
                                                      float (&win)[K][V]) {
#pragma unroll
  for (int j = 0; j < K; ++j) {
#pragma unroll
    for (int v = 0; v < V; ++v) wk[j][v] = w[(c + v) * K + j], win[j][v] = 0.f;
    if (j < K - 1 && t0 - 1 - j >= 0) load<V>(xr + (t0 - 1 - j) * x_row_stride, win[j]);
  }
}

// Shifts x[t] (at position pos in its document) into the window, zeroes the entries outside
// the document (kDocs; without documents the halo's zeros before the sequence are the only
// ones), and returns z = sum_j wk[K-1-j] win[j] for each of the V channels.
template <int K, int V, bool kDocs>
__device__ __forceinline__ void conv_step(const float (&wk)[K][V], float (&win)[K][V], const float (&x)[V], int pos,
                                          float (&z)[V]) {
#pragma unroll
  for (int j = K - 1; j > 0; --j)
#pragma unroll
    for (int v = 0; v < V; ++v) win[j][v] = !kDocs || j <= pos ? win[j - 1][v] : 0.f;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    win[0][v] = x[v];
    z[v] = wk[K - 1][v] * x[v];
#pragma unroll
    for (int j = 1; j < K; ++j) z[v] += wk[K - 1 - j][v] * win[j][v];
  }
}

template <class scalar_t, int K, int V, bool kDocs>
__global__ void __launch_bounds__(kThreads)
    causal_conv_silu_forward(const scalar_t* __restrict__ x, const float* __restrict__ w,
                             const int64_t* __restrict__ pos_in_doc, scalar_t* __restrict__ y, int64_t T, int64_t C,
                             int64_t x_batch_stride, int64_t x_row_stride) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  const int64_t b = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.y) * kTile, t1 = min(t0 + kTile, T);
  const scalar_t* xr = x + b * x_batch_stride + c;
  float wk[K][V], win[K][V];
  load_weights_and_halo<scalar_t, K, V>(w, xr, c, t0, x_row_stride, wk, win);
  for (int64_t ts = t0; ts < t1; ts += kAhead) {
    // kAhead steps' inputs and positions loaded before any is used: more loads in flight.
    float xa[kAhead][V];
    int pa[kAhead];
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int64_t t = ts + i;
      if (t < t1) load<V>(xr + t * x_row_stride, xa[i]);
      pa[i] = kDocs && t < t1 ? position(pos_in_doc, b, T, t) : 0;
    }
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int64_t t = ts + i;
      if (t >= t1) break;
      float z[V];
      conv_step<K, V, kDocs>(wk, win, xa[i], pa[i], z);
#pragma unroll
      for (int v = 0; v < V; ++v) z[v] *= detail::fast_sigmoid(z[v]);
      store<V>(y + (b * T + t) * C + c, z);
    }
  }
}

// The backward's registers for V channels: weights, the input window, the dw partial sums
// (dwk[j] for tap K-1-j), the last K dz (dzr[i] = dz[t - i]) and, with documents, their steps'
// positions.
template <int K, int V, bool kDocs>
struct BackwardWindow {
  float wk[K][V], win[K][V], dwk[K][V] = {}, dzr[K][V] = {};
  int posr[K] = {};

  // Step t: x[t] and dy[t] in (valid: t < T; past T dz is zero), dz[t] into the window and, if
  // add_dw, into the dw sums; returns dx at u = t - (K-1), which gathers dz[u + j] = dzr[K-1-j]
  // through tap K-1-j where u lies in u + j's document.
  __device__ __forceinline__ void step(const float (&x)[V], const float (&dy)[V], int pos, bool valid, bool add_dw,
                                       float (&dx)[V]) {
#pragma unroll
    for (int j = K - 1; j > 0; --j) {
#pragma unroll
      for (int v = 0; v < V; ++v) dzr[j][v] = dzr[j - 1][v];
      if (kDocs) posr[j] = posr[j - 1];
    }
#pragma unroll
    for (int v = 0; v < V; ++v) dzr[0][v] = 0.f;
    if (kDocs) posr[0] = pos;
    if (valid) {
      float z[V];
      conv_step<K, V, kDocs>(wk, win, x, pos, z);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float s = detail::fast_sigmoid(z[v]);
        dzr[0][v] = dy[v] * s * (1.f + z[v] * (1.f - s));
      }
      if (add_dw) {
#pragma unroll
        for (int j = 0; j < K; ++j)
#pragma unroll
          for (int v = 0; v < V; ++v) dwk[j][v] += dzr[0][v] * win[j][v];  // masked taps are zeros in win
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
      dx[v] = 0.f;
#pragma unroll
      for (int j = 0; j < K; ++j)
        dx[v] += wk[K - 1 - j][v] * (!kDocs || j <= posr[K - 1 - j] ? dzr[K - 1 - j][v] : 0.f);
    }
  }
};

// A tile [t0, t1) walks steps t0 .. t1 + K - 2 in two phases: the first K - 1 steps only fill the
// dz window (dx[t0] needs dz up to t0 + K - 1), then every step writes dx[t - (K-1)]. Each tile
// adds to dw the steps of its second phase, t0 + K - 1 .. t1 + K - 2 (and the first tile its
// first phase too), so every step of the sequence is counted once and the second phase, a whole
// number of kAheadBackward batches, has no test but t < T, and that only in the tiles near the end
// (kTail): the per-step tests were a large part of the instructions of a kernel that had too
// few loads in flight.
template <class scalar_t, int K, int V, bool kDocs, bool kTail>
__device__ __forceinline__ void backward_second_phase(BackwardWindow<K, V, kDocs>& window, const scalar_t* px,
                                                      const scalar_t* pdy, scalar_t* pdx, const int64_t* pos_in_doc,
                                                      int64_t b, int64_t T, int64_t t, int n, int64_t x_row_stride,
                                                      int64_t C, int64_t dx_row_stride) {
  for (int s = 0; s < n; s += kAheadBackward, t += kAheadBackward) {
    float xa[kAheadBackward][V], dya[kAheadBackward][V];
    int pa[kAheadBackward];
#pragma unroll
    for (int i = 0; i < kAheadBackward; ++i) {
      const bool valid = !kTail || t + i < T;
      if (valid) {
        load<V>(px + i * x_row_stride, xa[i]);
        load<V>(pdy + i * C, dya[i]);
      }
      pa[i] = kDocs && valid ? position(pos_in_doc, b, T, t + i) : 0;
    }
#pragma unroll
    for (int i = 0; i < kAheadBackward; ++i) {
      if (kTail && s + i >= n) break;
      float g[V];
      window.step(xa[i], dya[i], pa[i], !kTail || t + i < T, true, g);
      store<V>(pdx + i * dx_row_stride, g);
    }
    px += kAheadBackward * x_row_stride, pdy += kAheadBackward * C, pdx += kAheadBackward * dx_row_stride;
  }
}

template <class scalar_t, int K, int V, bool kDocs>
__global__ void __launch_bounds__(kThreads, kBackwardBlocks)
    causal_conv_silu_backward(const scalar_t* __restrict__ x, const float* __restrict__ w,
                              const int64_t* __restrict__ pos_in_doc, const scalar_t* __restrict__ dy,
                              scalar_t* __restrict__ dx, float* __restrict__ dw_partial, int64_t T, int64_t C,
                              int64_t x_batch_stride, int64_t x_row_stride, int64_t dx_batch_stride,
                              int64_t dx_row_stride) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  const int64_t b = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.y) * kTile, t1 = min(t0 + kTile, T);
  const scalar_t* xr = x + b * x_batch_stride + c;
  BackwardWindow<K, V, kDocs> window;
  load_weights_and_halo<scalar_t, K, V>(w, xr, c, t0, x_row_stride, window.wk, window.win);
  // First phase: dz of t0 .. t0 + K - 2, no dx yet.
#pragma unroll
  for (int i = 0; i < K - 1; ++i) {
    const int64_t t = t0 + i;
    float xt[V] = {}, dyt[V] = {}, unused[V];
    if (t < T) {
      load<V>(xr + t * x_row_stride, xt);
      load<V>(dy + (b * T + t) * C + c, dyt);
    }
    window.step(xt, dyt, kDocs && t < T ? position(pos_in_doc, b, T, t) : 0, t < T, t0 == 0, unused);
  }
  // Second phase: steps t0 + K - 1 .. t1 + K - 2, dx of t0 .. t1 - 1.
  const int64_t t = t0 + K - 1;
  const int n = static_cast<int>(t1 - t0);
  const scalar_t* px = xr + t * x_row_stride;
  const scalar_t* pdy = dy + (b * T + t) * C + c;
  scalar_t* pdx = dx + b * dx_batch_stride + t0 * dx_row_stride + c;
  if (t1 + K - 1 > T || n < kTile)
    backward_second_phase<scalar_t, K, V, kDocs, true>(window, px, pdy, pdx, pos_in_doc, b, T, t, n, x_row_stride, C,
                                                       dx_row_stride);
  else
    backward_second_phase<scalar_t, K, V, kDocs, false>(window, px, pdy, pdx, pos_in_doc, b, T, t, n, x_row_stride, C,
                                                        dx_row_stride);
  float* part = dw_partial + ((b * gridDim.y + blockIdx.y) * C + c) * K;
#pragma unroll
  for (int v = 0; v < V; ++v)
#pragma unroll
    for (int j = 0; j < K; ++j) part[v * K + K - 1 - j] = window.dwk[j][v];
}

// V channels a thread when every access the kernels make is aligned for it: channels, strides
// and base addresses multiples of V elements.
template <int V>
bool vectorizable(const at::Tensor& x, std::initializer_list<const at::Tensor*> others) {
  const int64_t align = V * static_cast<int64_t>(x.element_size());
  auto aligned = [&](const at::Tensor& t) {
    return t.stride(0) % V == 0 && t.stride(1) % V == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % align == 0;
  };
  bool ok = x.size(2) % V == 0 && aligned(x);
  for (const at::Tensor* t : others) ok = ok && aligned(*t);
  return ok;
}

template <int K>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const int64_t* pos, at::Tensor& y) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv_silu_forward", [&] {
    auto run = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const dim3 grid((C + kThreads * V - 1) / (kThreads * V), (T + kTile - 1) / kTile, B);
      auto kernel =
          pos ? causal_conv_silu_forward<scalar_t, K, V, true> : causal_conv_silu_forward<scalar_t, K, V, false>;
      kernel<<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), w.data_ptr<float>(), pos, y.data_ptr<scalar_t>(), T,
                                            C, x.stride(0), x.stride(1));
    };
    if (vectorizable<kVecForward>(x, {&y})) run(std::integral_constant<int, kVecForward>{});
    else run(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int K>
void launch_backward(const at::Tensor& x, const at::Tensor& w, const int64_t* pos, const at::Tensor& dy,
                     at::Tensor& dx, at::Tensor& dw_partial) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv_silu_backward", [&] {
    auto run = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const dim3 grid((C + kThreads * V - 1) / (kThreads * V), (T + kTile - 1) / kTile, B);
      auto kernel =
          pos ? causal_conv_silu_backward<scalar_t, K, V, true> : causal_conv_silu_backward<scalar_t, K, V, false>;
      kernel<<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), w.data_ptr<float>(), pos, dy.data_ptr<scalar_t>(),
                                            dx.data_ptr<scalar_t>(), dw_partial.data_ptr<float>(), T, C, x.stride(0),
                                            x.stride(1), dx.stride(0), dx.stride(1));
    };
    if (vectorizable<kVecBackward>(x, {&dy, &dx})) run(std::integral_constant<int, kVecBackward>{});
    else run(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One decoding step: y = silu(w[K-1] x + sum_{j=1}^{K-1} w[K-1-j] x[t-j]) from the K-1 inputs
// kept before it (kept[i] = x[t-(K-1)+i]) and the new token's x, the taps summed in the forward
// kernel's order; then the kept inputs shift by one in place (x appended). A thread a channel
// (each touches only its own channel's inputs, so the shift needs no barrier). Grid (C / 128, B).
template <class scalar_t>
__global__ void __launch_bounds__(kThreads)
    causal_conv_silu_step(const scalar_t* __restrict__ x, scalar_t* __restrict__ kept, const float* __restrict__ w,
                          scalar_t* __restrict__ y, int K, int64_t C, int64_t x_batch_stride) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, b = blockIdx.y;
  if (c >= C) return;
  scalar_t* kb = kept + b * (K - 1) * C + c;
  const scalar_t x_new = x[b * x_batch_stride + c];
  float z = w[c * K + K - 1] * static_cast<float>(x_new);
  for (int j = 1; j < K; ++j) z += w[c * K + K - 1 - j] * static_cast<float>(kb[(K - 1 - j) * C]);
  y[b * C + c] = static_cast<scalar_t>(z * detail::fast_sigmoid(z));
  for (int i = 0; i + 1 < K - 1; ++i) kb[i * C] = kb[(i + 1) * C];
  if (K > 1) kb[(K - 2) * C] = x_new;
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
  TORCH_CHECK(x.size(1) < (int64_t{1} << 31), "causal_conv_silu_cuda: positions are 32-bit, T must be below 2^31");
  at::Tensor y = at::empty(x.sizes(), x.options());
  with_kernel_size(w.size(1), [&](auto K) { launch_forward<decltype(K)::value>(x, w, positions(pos_in_doc), y); });
  return y;
}

// Returns {dx [B, T, C] in x's dtype and layout, dw [C, K] float32}.
std::pair<at::Tensor, at::Tensor> causal_conv_silu_backward_cuda(const at::Tensor& x, const at::Tensor& w,
                                                                 const at::Tensor& pos_in_doc, const at::Tensor& dy) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), K = w.size(1);
  at::Tensor dx = util::empty_window_like(x);
  at::Tensor dw_partial = at::empty({B * ((T + kTile - 1) / kTile), C, K}, w.options());
  with_kernel_size(K, [&](auto k) { launch_backward<decltype(k)::value>(x, w, positions(pos_in_doc), dy, dx, dw_partial); });
  return {dx, dw_partial.sum(0)};
}

// x [B, 1, C] with x.stride(2) == 1, kept [B, K - 1, C] contiguous in x's dtype (shifted in place),
// w [C, K] float32 contiguous -> y [B, 1, C].
at::Tensor causal_conv_silu_step_cuda(const at::Tensor& x, at::Tensor& kept, const at::Tensor& w) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(2);
  at::Tensor y = at::empty({B, 1, C}, x.options());
  const dim3 grid(static_cast<unsigned>((C + kThreads - 1) / kThreads), static_cast<unsigned>(B));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv_silu_step_cuda", [&] {
    causal_conv_silu_step<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), kept.data_ptr<scalar_t>(), w.data_ptr<float>(), y.data_ptr<scalar_t>(),
        static_cast<int>(w.size(1)), C, x.stride(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace hybrid::ops
