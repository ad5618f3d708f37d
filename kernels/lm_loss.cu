// The language-model loss over the vocabulary (src/train/loss.cpp), forward and backward, one
// pass over the logits each. Prediction row r = (b, t), t < T - 1, of logits x [B, T, V] (bf16,
// half or float32; float32 arithmetic) with target y = tokens[b, t + 1]:
//   forward:  lse_r = log sum_j exp x_rj  (an online max and rescaled sum, one read of the row),
//             target_r = x_ry (NaN for a y outside [0, V): the loss turns NaN, never a wild read)
//   backward: dx_rj = exp(x_rj - lse_r) (gc + 2 gz lse_r) - gc [j = y],  gc = dce / N, gz = dz / N
//             dx = 0 on every t = T - 1 row (it predicts nothing), written here too; dx may be
//             the logits' own memory (each thread reads a vector before it writes it).
// What goes: the blockwise ATen formula's float32 copy of each 1024-row block, its subtract, exp,
// max, sum, scale and gradient copy, each a pass over [1024, V] float32 (about 37 ms of a 1b.yaml
// step at 4 x 4096 tokens and V = 100352, forty-fourth session), and the zero fill of dx.
//
// Tiles: one block of 256 threads a row; thread t reads 16-byte vectors t, t + 256, ... of the
// row (one element where V or the address does not allow it), four vectors in flight before their
// exps; the (max, sum) pairs combine by warp shuffles and shared memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <utility>

#include "vector_access.cuh"

namespace hybrid {
namespace {

using ops::detail::load;
using ops::detail::with_16_byte_vectors;
using ops::detail::store;

constexpr int kThreads = 256, kInFlight = 4;

// A running log-sum-exp: sum_j exp(x_j - m) over the elements seen, m their max (-inf, 0 before any).
struct MaxSum {
  float m = -INFINITY, s = 0.f;
};

// exp(a - b), 0 for a = -inf (also when b is: an empty partial).
__device__ __forceinline__ float exp_below(float a, float b) { return a == -INFINITY ? 0.f : __expf(a - b); }

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * exp_below(a.m, m) + b.s * exp_below(b.m, m)};
}

template <int W>
__device__ __forceinline__ void absorb(MaxSum& acc, const float (&v)[W]) {
  float vm = v[0];
#pragma unroll
  for (int k = 1; k < W; ++k) vm = fmaxf(vm, v[k]);
  if (vm > acc.m) {
    acc.s *= exp_below(acc.m, vm);
    acc.m = vm;
  }
#pragma unroll
  for (int k = 0; k < W; ++k) acc.s += __expf(v[k] - acc.m);
}

// Every thread gets the block's combined pair.
__device__ __forceinline__ MaxSum block_combine(MaxSum x) {
  __shared__ MaxSum partial[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o /= 2)
    x = combine(x, {__shfl_xor_sync(0xffffffffu, x.m, o), __shfl_xor_sync(0xffffffffu, x.s, o)});
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = x;
  __syncthreads();
  MaxSum total;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total = combine(total, partial[w]);
  return total;
}

// f(i, x) for each of the row's vectors i (W elements x) a thread owns, kInFlight loads issued
// before the first f.
template <int W, class T, class F>
__device__ __forceinline__ void for_each_vector(const T* row, int64_t vectors, F&& f) {
  for (int64_t i0 = threadIdx.x; i0 < vectors; i0 += kThreads * kInFlight) {
    float x[kInFlight][W];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (i0 + u * kThreads < vectors) load<W>(row + (i0 + u * kThreads) * W, x[u]);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u)
      if (i0 + u * kThreads < vectors) f(i0 + u * kThreads, x[u]);
  }
}

// Grid: one block a prediction row, B (T - 1) of them; lse and target [B, T - 1].
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
    lm_loss_forward(const T* __restrict__ logits, const int64_t* __restrict__ tokens, float* __restrict__ lse,
                    float* __restrict__ target, int64_t T_len, int64_t V) {
  const int64_t r = blockIdx.x, b = r / (T_len - 1), t = r % (T_len - 1);
  const T* row = logits + (b * T_len + t) * V;
  const int64_t vectors = V / W;
  MaxSum acc;
  for_each_vector<W>(row, vectors, [&](int64_t, float(&x)[W]) { absorb(acc, x); });
  acc = block_combine(acc);
  if (threadIdx.x == 0) {
    lse[r] = acc.m + logf(acc.s);
    const int64_t y = tokens[b * T_len + t + 1];
    target[r] = y >= 0 && y < V ? static_cast<float>(row[y]) : NAN;
  }
}

// Grid: one block a position, B T of them; dx [B, T, V] in the logits' dtype (no __restrict__ on
// the two: they may be one).
template <class T, int W>
__global__ void __launch_bounds__(kThreads)
    lm_loss_backward(const T* logits, const int64_t* __restrict__ tokens, const float* __restrict__ lse,
                     const float* __restrict__ d_ce, const float* __restrict__ d_z, T* dx, int64_t T_len, int64_t V,
                     float n) {
  const int64_t p = blockIdx.x, b = p / T_len, t = p % T_len;
  const T* row = logits + p * V;
  T* drow = dx + p * V;
  const int64_t vectors = V / W;
  if (t == T_len - 1) {  // predicts nothing: a row of zeros
    const float zeros[W] = {};
    for (int64_t i = threadIdx.x; i < vectors; i += kThreads) store<W>(drow + i * W, zeros);
    return;
  }
  const float gc = d_ce ? __fdiv_rn(*d_ce, n) : 0.f, gz = d_z ? __fdiv_rn(*d_z, n) : 0.f;
  const float l = lse[b * (T_len - 1) + t], scale = gc + 2.f * gz * l;
  const int64_t y = tokens[p + 1];
  for_each_vector<W>(row, vectors, [&](int64_t i, float(&x)[W]) {
#pragma unroll
    for (int k = 0; k < W; ++k) x[k] = __expf(x[k] - l) * scale - (i * W + k == y ? gc : 0.f);
    store<W>(drow + i * W, x);
  });
}

void check(const at::Tensor& logits, const at::Tensor& tokens) {
  TORCH_CHECK(logits.is_cuda() && logits.is_contiguous() && logits.dim() == 3,
              "lm_loss_cuda: logits contiguous [B, T, V] on CUDA");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous() && tokens.device() == logits.device() &&
                  tokens.sizes() == logits.sizes().slice(0, 2),
              "lm_loss_cuda: tokens contiguous int64 [B, T] beside the logits");
  TORCH_CHECK(logits.size(1) >= 2 && logits.size(0) * logits.size(1) < (int64_t{1} << 31),
              "lm_loss_cuda: 2 <= T, B T < 2^31");
}

}  // namespace

std::pair<at::Tensor, at::Tensor> lm_loss_forward_cuda(const at::Tensor& logits, const at::Tensor& tokens) {
  check(logits, tokens);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto options = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({B, T - 1}, options), target = at::empty({B, T - 1}, options);
  if (lse.numel() == 0) return {lse, target};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lm_loss_forward", [&] {
    with_16_byte_vectors<scalar_t>(V, {&logits}, [&](auto width) {
      lm_loss_forward<scalar_t, decltype(width)::value><<<B * (T - 1), kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), lse.data_ptr<float>(), target.data_ptr<float>(), T,
          V);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {lse, target};
}

// d_ce, d_z: the two outputs' gradients (0-dim float32 on the logits' device), either undefined;
// dx: where the gradient goes, the logits' shape and dtype, contiguous (their own memory allowed).
at::Tensor lm_loss_backward_cuda(const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& lse,
                                 const at::Tensor& d_ce, const at::Tensor& d_z, const at::Tensor& dx) {
  check(logits, tokens);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == B * (T - 1),
              "lm_loss_backward_cuda: lse float32 [B, T - 1]");
  for (const at::Tensor* g : {&d_ce, &d_z})
    TORCH_CHECK(!g->defined() || (g->scalar_type() == at::kFloat && g->numel() == 1 && g->device() == logits.device()),
                "lm_loss_backward_cuda: the loss gradients are float32 scalars on the logits' device");
  TORCH_CHECK(dx.sizes() == logits.sizes() && dx.scalar_type() == logits.scalar_type() && dx.is_contiguous() &&
                  dx.device() == logits.device(),
              "lm_loss_backward_cuda: dx contiguous, the logits' shape and dtype");
  const c10::cuda::CUDAGuard guard(logits.device());
  if (dx.numel() == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lm_loss_backward", [&] {
    with_16_byte_vectors<scalar_t>(V, {&logits, &dx}, [&](auto width) {
      lm_loss_backward<scalar_t, decltype(width)::value><<<B * T, kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), lse.data_ptr<float>(),
          d_ce.defined() ? d_ce.data_ptr<float>() : nullptr, d_z.defined() ? d_z.data_ptr<float>() : nullptr,
          dx.data_ptr<scalar_t>(), T, V, static_cast<float>(B * (T - 1)));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace hybrid
