// The chunk-local terms of the chunked delta rule (src/ops/delta_chunk_terms.h) on CUDA, float32,
// one block of 8 warps per (head, chunk) of C = 64 rows:
//   gc = cumsum(g), gamma = exp(gc), eta = exp(gc_C - gc), last = gamma_C, QG = diag(gamma) Q
//   KKG = K K^T * Gamma, QKG = Q K^T * Gamma      (Gamma_ij = exp(gc_i - gc_j), j <= i; else 0)
//   Lg = StrictTril(diag(beta) KKG), Ag = (I + Lg)^-1, T = Ag diag(beta)
//
// Products: 3xTF32 mma.sync (tf32x3.cuh) from the chunk's keys and queries in shared memory
// (rows padded to K + 4 floats, conflict-free fragments); warp w computes rows 16 (w % 4) .. + 15
// and columns 32 (w / 4) .. + 31 of both products (the two warps whose tile lies above the
// diagonal only write zeros).
// Inverse, in shared memory over the keys' space: the four 16 x 16 diagonal blocks of the unit
// lower triangular I + Lg by forward substitution (one warp each, a column per lane, in
// registers), then the blocks below them a diagonal at a time:
//   X_ij = -X_ii sum_{m=j}^{i-1} Lg_im X_mj     (i > j, block indices)
// 6 barriers for the whole inverse instead of one per row.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../src/ops/delta_chunk_terms.h"
#include "tf32x3.cuh"
#include "vector_access.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kC = 64;
constexpr int kThreads = 256;
constexpr int kLd = kC + 4;  // row stride of C x C tiles in shared memory
constexpr int kB = 16;       // block of the inverse

struct Params {
  const float *q, *k, *g, *beta;
  float *gc, *gamma, *eta, *last, *T, *QKG, *QG;
  float *Ag, *KKG;  // null in the forward
  int K;
};

// Keys and queries first; after the products the same memory holds Lg, the inverse and the
// inverse's scratch blocks.
size_t shared_floats(int K) {
  const size_t products = 2 * kC * (K + 4), inverse = 2 * kC * kLd + 3 * kB * kB;
  return products > inverse ? products : inverse;
}

__global__ void __launch_bounds__(kThreads) chunk_prep_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];
  __shared__ float gcs[kC], betas[kC];
  const int K = p.K, ldk = K + 4, tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t hc = blockIdx.x;  // (head, chunk)
  float* ks = smem;           // [C][ldk]
  float* qs = ks + kC * ldk;  // [C][ldk]
  float* L = smem;            // [C][kLd], after the products
  float* X = L + kC * kLd;    // [C][kLd]
  float* tmp = X + kC * kLd;  // [3][kB][kB]

  const int per_row = K / 4;
  for (int i = tid; i < kC * per_row; i += kThreads) {
    const int r = i / per_row, c = 4 * (i % per_row);
    const int64_t at = (hc * kC + r) * K + c;
    *reinterpret_cast<float4*>(ks + r * ldk + c) = *reinterpret_cast<const float4*>(p.k + at);
    *reinterpret_cast<float4*>(qs + r * ldk + c) = *reinterpret_cast<const float4*>(p.q + at);
  }
  // Chunk-local cumulative gate: a scan in each of two warps, then the second adds the first's total.
  if (tid < kC) {
    float x = p.g[hc * kC + tid];
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const float y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    gcs[tid] = x;
    betas[tid] = p.beta[hc * kC + tid];
  }
  __syncthreads();
  if (tid >= 32 && tid < kC) gcs[tid] += gcs[31];
  __syncthreads();
  if (tid < kC) {
    const float x = gcs[tid], end = gcs[kC - 1];
    p.gc[hc * kC + tid] = x;
    p.gamma[hc * kC + tid] = expf(x);
    p.eta[hc * kC + tid] = expf(end - x);
    if (tid == 0) p.last[hc] = expf(end);
  }

  // K K^T and Q K^T for this warp's 16 x 32 tile: B(kk, n) = K[n][kk].
  const int r0 = 16 * (warp % 4), c0 = 32 * (warp / 4);
  const bool below = c0 <= r0 + 15;  // the tile holds entries on or below the diagonal
  float kk[4][2][4] = {}, qk[4][2][4] = {};
  if (below) {
    warp_gemm<4>(ks + r0 * ldk, ldk, 1, ks + c0 * ldk, 1, ldk, K / 8, g, t, kk);
    warp_gemm<4>(qs + r0 * ldk, ldk, 1, ks + c0 * ldk, 1, ldk, K / 8, g, t, qk);
  }
  // diag(gamma) Q from the queries in shared memory (the output's and the backward's product take it,
  // where the state passes do not take the raw queries instead).
  for (int i = tid; p.QG && i < kC * per_row; i += kThreads) {
    const int r = i / per_row, c = 4 * (i % per_row);
    const float4 x = *reinterpret_cast<const float4*>(qs + r * ldk + c);
    const float s = expf(gcs[r]);
    *reinterpret_cast<float4*>(p.QG + (hc * kC + r) * K + c) = make_float4(s * x.x, s * x.y, s * x.z, s * x.w);
  }
  __syncthreads();  // keys and queries are read: L and X may overwrite them

  const int64_t cc = hc * kC * kC;
  for_each_pair<4>(r0, c0, g, t, [&](int n, int half, int i, int j) {
    const float gate0 = j <= i ? expf(gcs[i] - gcs[j]) : 0.f, gate1 = j + 1 <= i ? expf(gcs[i] - gcs[j + 1]) : 0.f;
    const float2 qkd = pair_sum(qk[n], half), kkd = pair_sum(kk[n], half);
    const float2 kkg = make_float2(kkd.x * gate0, kkd.y * gate1);
    st2(p.QKG + cc + i * kC + j, qkd.x * gate0, qkd.y * gate1);
    if (p.KKG) st2(p.KKG + cc + i * kC + j, kkg.x, kkg.y);
    st2(L + i * kLd + j, j < i ? betas[i] * kkg.x : 0.f, j + 1 < i ? betas[i] * kkg.y : 0.f);
  });
  // The inverse is 0 above its diagonal blocks.
  for (int i = tid; i < kC * kC; i += kThreads) {
    const int r = i / kC, c = i % kC;
    if (c / kB > r / kB) X[r * kLd + c] = 0.f;
  }
  __syncthreads();

  // Diagonal blocks: lane c of warp b computes column c of (I + L_bb)^-1, row by row.
  if (warp < 4) {
    const int b = kB * warp, c = lane % kB;
    float col[kB];
#pragma unroll
    for (int r = 0; r < kB; ++r) {
      float s = r == c ? 1.f : 0.f;
#pragma unroll
      for (int m = 0; m < r; ++m) s -= L[(b + r) * kLd + b + m] * col[m];
      col[r] = s;
    }
    if (lane < kB)
#pragma unroll
      for (int r = 0; r < kB; ++r) X[(b + r) * kLd + b + c] = col[r];
  }
  __syncthreads();

  // Blocks below the diagonal, one diagonal d at a time: block (i, j = i - d) for i = d .. 3.
  const int r = tid / kB, c = tid % kB;
  for (int d = 1; d < 4; ++d) {
    for (int i = d; i < 4; ++i) {
      const int j = i - d;
      float s = 0.f;
      for (int m = j; m < i; ++m)
#pragma unroll
        for (int x = 0; x < kB; ++x) s += L[(kB * i + r) * kLd + kB * m + x] * X[(kB * m + x) * kLd + kB * j + c];
      tmp[(i - d) * kB * kB + r * kB + c] = s;
    }
    __syncthreads();
    for (int i = d; i < 4; ++i) {
      const int j = i - d;
      float s = 0.f;
#pragma unroll
      for (int x = 0; x < kB; ++x) s -= X[(kB * i + r) * kLd + kB * i + x] * tmp[(i - d) * kB * kB + x * kB + c];
      X[(kB * i + r) * kLd + kB * j + c] = s;
    }
    __syncthreads();
  }

  for (int i = tid; i < kC * kC / 4; i += kThreads) {
    const int row = i / (kC / 4), col = 4 * (i % (kC / 4));
    const float4 x = *reinterpret_cast<const float4*>(X + row * kLd + col);
    const int64_t at = cc + row * kC + col;
    *reinterpret_cast<float4*>(p.T + at) =
        make_float4(x.x * betas[col], x.y * betas[col + 1], x.z * betas[col + 2], x.w * betas[col + 3]);
    if (p.Ag) *reinterpret_cast<float4*>(p.Ag + at) = x;
  }
}

}  // namespace

ChunkTerms chunk_terms_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& g_in,
                            const at::Tensor& beta_in, bool for_backward, bool want_QG) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t H = q_in.size(0), NC = q_in.size(1), C = q_in.size(2), K = q_in.size(3);
  TORCH_CHECK(C == kC && K % 16 == 0 && K <= 256 && H * NC < (int64_t{1} << 31),
              "chunk_terms_cuda: needs chunk 64 and K a multiple of 16 up to 256");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), g = g_in.contiguous(), beta = beta_in.contiguous();
  for (const at::Tensor* x : {&q, &k, &g, &beta})
    TORCH_CHECK(x->scalar_type() == at::kFloat, "chunk_terms_cuda: float32 inputs");
  for (const at::Tensor* x : {&q, &k})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x->data_ptr()) % 16 == 0, "chunk_terms_cuda: q and k must be 16-byte aligned");

  ChunkTerms c;
  const auto opt = q.options();
  c.gc = at::empty({H, NC, C}, opt), c.gamma = at::empty({H, NC, C}, opt), c.eta = at::empty({H, NC, C}, opt);
  c.last = at::empty({H, NC}, opt);
  c.T = at::empty({H, NC, C, C}, opt), c.QKG = at::empty({H, NC, C, C}, opt);
  if (want_QG) c.QG = at::empty({H, NC, C, K}, opt);
  if (for_backward) c.Ag = at::empty({H, NC, C, C}, opt), c.KKG = at::empty({H, NC, C, C}, opt);
  if (H * NC == 0) return c;

  Params p{q.data_ptr<float>(), k.data_ptr<float>(), g.data_ptr<float>(), beta.data_ptr<float>(),
           c.gc.data_ptr<float>(), c.gamma.data_ptr<float>(), c.eta.data_ptr<float>(), c.last.data_ptr<float>(),
           c.T.data_ptr<float>(), c.QKG.data_ptr<float>(), want_QG ? c.QG.data_ptr<float>() : nullptr,
           for_backward ? c.Ag.data_ptr<float>() : nullptr,
           for_backward ? c.KKG.data_ptr<float>() : nullptr, static_cast<int>(K)};
  const size_t shared = sizeof(float) * shared_floats(static_cast<int>(K));
  C10_CUDA_CHECK(cudaFuncSetAttribute(chunk_prep_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  chunk_prep_kernel<<<static_cast<unsigned>(H * NC), kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

}  // namespace hybrid::ops::detail
