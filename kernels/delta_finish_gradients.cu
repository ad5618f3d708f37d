// The end of the chunked delta rule's backward (finish_gradients, src/ops/delta_chunk_terms.h)
// on CUDA, float32, one block of 8 warps per (head, chunk) of C = 64 rows:
//   dq += s diag(gamma) dOh,  dk += diag(eta) vdh - diag(gamma) dWh            (in place)
//   dgc_i = s gamma_i <q_i, dOh_i> - gamma_i <k_i, dWh_i> - eta_i <k_i, vdh_i> + wy_dgc_i
//   dgc_C += sum_i eta_i <k_i, vdh_i> + last <dS_C, S0>
// (<dS_C, S0> comes as the reverse state pass's partial sums, one a value tile: reading S0 and
// dS_C here, 2 K V floats a chunk, was about 40% of this kernel's bytes.)
// Warp w takes rows w, w + 8, ..., its lanes float4 columns of the row (K a multiple of 4), the
// three row dots reduce by shuffles. The rows' sum reduces over warps in shared memory and the
// dot's partial sums are added in a fixed order, so the result is deterministic. It replaces
// about 15 element-wise and reduction kernels and one C x K x V product per chunk.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../src/ops/delta_chunk_terms.h"
#include "reductions.cuh"
#include "vector_access.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kC = 64;
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

struct Params {
  const float *q, *k, *dOh, *dWh, *vdh, *gamma, *eta, *wy_dgc, *last, *state_dot;
  float *dq, *dk, *dgc;
  int K, parts;
  float scale;
};

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
// x + a * y, element-wise
__device__ __forceinline__ float4 axpy4(float4 x, float a, float4 y) {
  return make_float4(x.x + a * y.x, x.y + a * y.y, x.z + a * y.z, x.w + a * y.w);
}

__global__ void __launch_bounds__(kThreads) finish_kernel(Params p) {
  __shared__ float row_dgc[kC], warp_total[kWarps];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t hc = blockIdx.x;
  const int K4 = p.K / 4;

  float to_end = 0.f;  // this warp's rows' eta <k, vdh>
  for (int r = warp; r < kC; r += kWarps) {
    const int64_t row = hc * kC + r;
    const float gamma = p.gamma[row], eta = p.eta[row];
    float qa = 0.f, kb = 0.f, ke = 0.f;
    for (int f = lane; f < K4; f += 32) {
      const int64_t at = row * p.K + 4 * f;
      const float4 q = ld4(p.q + at), k = ld4(p.k + at), a = ld4(p.dOh + at), b = ld4(p.dWh + at), e = ld4(p.vdh + at);
      qa += dot4(q, a), kb += dot4(k, b), ke += dot4(k, e);
      *reinterpret_cast<float4*>(p.dq + at) = axpy4(ld4(p.dq + at), p.scale * gamma, a);
      *reinterpret_cast<float4*>(p.dk + at) = axpy4(axpy4(ld4(p.dk + at), eta, e), -gamma, b);
    }
    qa = warp_sum(qa), kb = warp_sum(kb), ke = warp_sum(ke);
    to_end += eta * ke;
    if (lane == 0) row_dgc[r] = gamma * (p.scale * qa - kb) - eta * ke + p.wy_dgc[row];
  }

  if (lane == 0) warp_total[warp] = to_end;
  __syncthreads();
  if (tid < kC) {
    float x = row_dgc[tid];
    if (tid == kC - 1) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) x += warp_total[w];
      float hd = 0.f;
      for (int j = 0; j < p.parts; ++j) hd += p.state_dot[hc * p.parts + j];
      x += p.last[hc] * hd;
    }
    p.dgc[hc * kC + tid] = x;
  }
}

}  // namespace

at::Tensor finish_gradients_cuda(const FinishInputs& in, at::Tensor& dq, at::Tensor& dk) {
  const c10::cuda::CUDAGuard guard(in.q.device());
  const int64_t H = in.q.size(0), NC = in.q.size(1), C = in.q.size(2), K = in.q.size(3), parts = in.state_dot.size(-1);
  TORCH_CHECK(C == kC && K % 4 == 0 && H * NC < (int64_t{1} << 31), "finish_gradients_cuda: needs chunk 64, K % 4 == 0");
  TORCH_CHECK(dq.is_contiguous() && dk.is_contiguous(), "finish_gradients_cuda: dq and dk must be contiguous");
  std::vector<at::Tensor> x = {in.q, in.k, in.dOh, in.dWh, in.vdh, in.gamma, in.eta, in.wy_dgc, in.last, in.state_dot, dq, dk};
  for (at::Tensor& t : x) {
    t = t.contiguous();
    TORCH_CHECK(t.scalar_type() == at::kFloat, "finish_gradients_cuda: float32 inputs");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "finish_gradients_cuda: 16-byte aligned inputs");
  }
  at::Tensor dgc = at::empty({H, NC, C}, in.q.options());
  if (H * NC == 0) return dgc;
  auto f = [&](size_t i) { return x[i].data_ptr<float>(); };
  Params p{f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7), f(8), f(9), dq.data_ptr<float>(), dk.data_ptr<float>(),
           dgc.data_ptr<float>(), static_cast<int>(K), static_cast<int>(parts), static_cast<float>(in.scale)};
  finish_kernel<<<static_cast<unsigned>(H * NC), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dgc;
}

}  // namespace hybrid::ops::detail
