// SwiGLU on the MLP's fused gate-and-up projection (src/ops/swiglu.cpp), forward and backward:
//   h = silu(g) u = g s u,  s = sigmoid(g);
//   dg = dh u s (1 + g (1 - s)),  du = dh g s.
// gate_up [rows, 2 H] contiguous (a row's g in its first H columns, u in the last H), h and dh
// [rows, H], the gradient [rows, 2 H] laid out as gate_up; one dtype, float32 arithmetic.
// Memory-bound: a thread owns V adjacent columns of one row (16 bytes of each operand where H
// and the addresses allow it, else one element), a block 256 V columns of a row; grid (rows,
// column blocks), so no thread divides an index.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "fast_math.cuh"
#include "vector_access.cuh"

namespace hybrid::ops {
namespace {

using detail::fast_sigmoid;
using detail::load;
using detail::store;

constexpr int kThreads = 256;

template <class T, int V>
__global__ void swiglu_forward(const T* __restrict__ gate_up, T* __restrict__ h, int64_t H) {
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * V;
  if (c >= H) return;
  const T* row = gate_up + static_cast<int64_t>(blockIdx.x) * 2 * H + c;
  float g[V], u[V], h_out[V];
  load<V>(row, g);
  load<V>(row + H, u);
#pragma unroll
  for (int i = 0; i < V; ++i) h_out[i] = g[i] * fast_sigmoid(g[i]) * u[i];
  store<V>(h + static_cast<int64_t>(blockIdx.x) * H + c, h_out);
}

template <class T, int V>
__global__ void swiglu_backward(const T* __restrict__ gate_up, const T* __restrict__ dh, T* __restrict__ d_gate_up,
                                int64_t H) {
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * V;
  if (c >= H) return;
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * 2 * H + c;
  float g[V], u[V], d[V], dg[V], du[V];
  load<V>(gate_up + offset, g);
  load<V>(gate_up + offset + H, u);
  load<V>(dh + static_cast<int64_t>(blockIdx.x) * H + c, d);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float s = fast_sigmoid(g[i]);
    dg[i] = d[i] * u[i] * s * (1.f + g[i] * (1.f - s));
    du[i] = d[i] * g[i] * s;
  }
  store<V>(d_gate_up + offset, dg);
  store<V>(d_gate_up + offset + H, du);
}

// Runs fn(V, grid) with V = 16 bytes of elements when H and the tensors' addresses keep every
// row's halves aligned for it, else V = 1.
template <class T, class Fn>
void with_vector_width(int64_t rows, int64_t H, std::initializer_list<const at::Tensor*> tensors, Fn fn) {
  detail::with_16_byte_vectors<T>(H, tensors, [&](auto width) {
    constexpr int V = decltype(width)::value;
    fn(width, dim3(static_cast<unsigned>(rows), static_cast<unsigned>((H + kThreads * V - 1) / (kThreads * V))));
  });
}

void check(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0, "swiglu_cuda: gate_up contiguous, [..., 2 H]");
  TORCH_CHECK(gate_up.numel() / gate_up.size(-1) < (int64_t{1} << 31), "swiglu_cuda: at most 2^31 - 1 rows");
}

}  // namespace

at::Tensor swiglu_cuda(const at::Tensor& gate_up) {
  check(gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t H = gate_up.size(-1) / 2, rows = gate_up.numel() / gate_up.size(-1);
  std::vector<int64_t> sizes = gate_up.sizes().vec();
  sizes.back() = H;
  at::Tensor h = at::empty(sizes, gate_up.options());
  if (h.numel() == 0) return h;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_up.scalar_type(), "swiglu_forward", [&] {
    with_vector_width<scalar_t>(rows, H, {&gate_up, &h}, [&](auto vec, dim3 grid) {
      swiglu_forward<scalar_t, decltype(vec)::value>
          <<<grid, kThreads, 0, stream>>>(gate_up.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), H);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& gate_up, const at::Tensor& dh) {
  check(gate_up);
  const int64_t H = gate_up.size(-1) / 2, rows = gate_up.numel() / gate_up.size(-1);
  TORCH_CHECK(dh.is_contiguous() && dh.scalar_type() == gate_up.scalar_type() && dh.numel() == rows * H,
              "swiglu_backward_cuda: dh contiguous, [..., H] in gate_up's dtype");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  at::Tensor d_gate_up = at::empty(gate_up.sizes(), gate_up.options());
  if (d_gate_up.numel() == 0) return d_gate_up;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_up.scalar_type(), "swiglu_backward", [&] {
    with_vector_width<scalar_t>(rows, H, {&gate_up, &dh, &d_gate_up}, [&](auto vec, dim3 grid) {
      swiglu_backward<scalar_t, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(
          gate_up.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(), d_gate_up.data_ptr<scalar_t>(), H);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d_gate_up;
}

}  // namespace hybrid::ops
