// One decoding step of the gated delta rule for every (sequence, value head), in place:
//   S <- exp(g) S;   v' = beta (v - S^T k);   S <- S + k v'^T;   o = scale S^T q
// Shapes: q, k [N, Hk, K]; v [N, Hv, V]; g, beta [N, Hv]; state [N, Hv, K, V] float32;
// o [N, Hv, V] in v's dtype. Value head h reads key head h / (Hv / Hk) (grouped values).
//
// Tiles: one block per (n, h), one thread per state column v (blockDim = V rounded up to a
// warp). q and k of the block's key head sit in shared memory; each thread walks its column
// S[:, v] twice (once for S^T k, once to update it and accumulate S^T q). Consecutive threads
// touch consecutive v, so every access to the state is coalesced. Arithmetic in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "hybrid/ops/delta_rule.h"

namespace hybrid::ops {
namespace {

template <class scalar_t>
__global__ void recurrent_step_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                      const scalar_t* __restrict__ v, const float* __restrict__ g,
                                      const float* __restrict__ beta, float* __restrict__ state,
                                      scalar_t* __restrict__ o, int Hk, int Hv, int K, int V, float scale) {
  extern __shared__ float qk[];  // q then k of this block's key head, 2K floats
  const int n = blockIdx.x / Hv, h = blockIdx.x % Hv, hk = h / (Hv / Hk);
  const int col = threadIdx.x;
  const scalar_t* qh = q + (static_cast<int64_t>(n) * Hk + hk) * K;
  const scalar_t* kh = k + (static_cast<int64_t>(n) * Hk + hk) * K;
  for (int i = threadIdx.x; i < K; i += blockDim.x) {
    qk[i] = static_cast<float>(qh[i]);
    qk[K + i] = static_cast<float>(kh[i]);
  }
  __syncthreads();
  if (col >= V) return;
  const int64_t nh = static_cast<int64_t>(n) * Hv + h;
  const float a = __expf(g[nh]), b = beta[nh];
  float* S = state + nh * K * V + col;

  float predicted = 0;  // (a S)^T k, for this column
  for (int i = 0; i < K; ++i) predicted += S[static_cast<int64_t>(i) * V] * qk[K + i];
  const float v_new = b * (static_cast<float>(v[nh * V + col]) - a * predicted);
  float out = 0;
  for (int i = 0; i < K; ++i) {
    float s = a * S[static_cast<int64_t>(i) * V] + qk[K + i] * v_new;
    S[static_cast<int64_t>(i) * V] = s;
    out += s * qk[i];
  }
  o[nh * V + col] = static_cast<scalar_t>(scale * out);
}

}  // namespace

at::Tensor recurrent_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                               const at::Tensor& beta, at::Tensor& state, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int N = q.size(0), Hk = q.size(1), K = q.size(2), Hv = v.size(1), V = v.size(2);
  at::Tensor qc = q.contiguous(), kc = k.to(q.scalar_type()).contiguous(), vc = v.to(q.scalar_type()).contiguous();
  at::Tensor gc = g.to(at::kFloat).contiguous(), bc = beta.to(at::kFloat).contiguous();
  at::Tensor o = at::empty({N, Hv, V}, v.options().dtype(q.scalar_type()));
  const int threads = (V + 31) / 32 * 32;
  const size_t shared = 2 * K * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "recurrent_step_cuda", [&] {
    recurrent_step_kernel<scalar_t><<<N * Hv, threads, shared, stream>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), gc.data_ptr<float>(),
        bc.data_ptr<float>(), state.data_ptr<float>(), o.data_ptr<scalar_t>(), Hk, Hv, K, V, static_cast<float>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o.to(v.scalar_type());
}

}  // namespace hybrid::ops
