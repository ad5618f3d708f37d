// The backward of the chunk-local terms (src/ops/delta_chunk_terms.h) on CUDA, float32, one
// block of 8 warps per (head, chunk) of C = 64 rows. Given dT = dV' W^T and dP = dO V'^T:
//   dAg = Tril(dT diag(beta)),  M = Ag^T dAg,  dLg = -StrictTril(M Ag^T)
//   dbeta = colsum(dT * Ag) + rowsum(dLg * KKG)
//   dQK = s dP * Gamma,  dKK = D + D^T with D = dLg * diag(beta) Gamma
//   dgc = rowsum(Z) - colsum(Z),  Z = s dP * QKG + dLg * Lg,  Lg = StrictTril(diag(beta) KKG)
// Ag, dT (then dAg, then dLg) and M live in shared memory (rows padded to 68 floats); the two
// 64 x 64 x 64 products are 3xTF32 mma.sync (tf32x3.cuh), warp w computing rows 16 (w % 4) ..
// + 15 and columns 32 (w / 4) .. + 31. The last pass gives each thread 16 columns of one row, so
// row sums reduce across four lanes and column sums across a warp's eight rows by shuffles, then
// through shared-memory atomics.
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
constexpr int kLd = kC + 4;

struct Params {
  const float *dT, *dP, *Ag, *KKG, *QKG, *gc, *beta;
  float *dQK, *dKK, *dbeta, *dgc;
  float scale;
};

__device__ __forceinline__ void st4(float* p, const float (&x)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}

__global__ void __launch_bounds__(kThreads) wy_backward_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];
  float* A = smem;          // [C][kLd]: Ag
  float* D = A + kC * kLd;  // [C][kLd]: dT, then dAg, then dLg
  float* M = D + kC * kLd;  // [C][kLd]: Ag^T dAg
  __shared__ float gcs[kC], betas[kC], col_dbeta[kC], col_z[kC], row_dbeta[kC], row_z[kC];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t hc = blockIdx.x, cc = hc * kC * kC;

  for (int i = tid; i < kC * kC / 4; i += kThreads) {
    const int r = i / (kC / 4), c = 4 * (i % (kC / 4));
    *reinterpret_cast<float4*>(A + r * kLd + c) = ld4(p.Ag + cc + r * kC + c);
    *reinterpret_cast<float4*>(D + r * kLd + c) = ld4(p.dT + cc + r * kC + c);
  }
  if (tid < kC) {
    gcs[tid] = p.gc[hc * kC + tid], betas[tid] = p.beta[hc * kC + tid];
    col_dbeta[tid] = 0.f, col_z[tid] = 0.f;
  }
  __syncthreads();

  // colsum(dT * Ag), and dT becomes dAg in place (each element by the thread that read it).
  {
    const int j = tid % kC, i0 = (tid / kC) * (kC / 4);
    float s = 0.f;
    for (int i = i0; i < i0 + kC / 4; ++i) {
      const float d = D[i * kLd + j];
      s += d * A[i * kLd + j];
      D[i * kLd + j] = j <= i ? d * betas[j] : 0.f;
    }
    atomicAdd(&col_dbeta[j], s);
  }
  __syncthreads();

  const int r0 = 16 * (warp % 4), c0 = 32 * (warp / 4);
  {  // M = Ag^T dAg: the A operand's (r, i) is Ag[i][r]
    float acc[4][2][4] = {};
    warp_gemm<4>(A + r0, 1, kLd, D + c0, kLd, 1, kC / 8, g, t, acc);
    for_each_pair<4>(r0, c0, g, t, [&](int n, int half, int i, int j) {
      const float2 m = pair_sum(acc[n], half);
      M[i * kLd + j] = m.x, M[i * kLd + j + 1] = m.y;
    });
  }
  __syncthreads();  // dAg is read: D may take dLg

  {  // dLg = -StrictTril(M Ag^T): B(c, n) = Ag[n][c]; tiles above the diagonal are zero
    float acc[4][2][4] = {};
    if (c0 <= r0 + 15) warp_gemm<4>(M + r0 * kLd, kLd, 1, A + c0 * kLd, 1, kLd, kC / 8, g, t, acc);
    for_each_pair<4>(r0, c0, g, t, [&](int n, int half, int i, int j) {
      const float2 m = pair_sum(acc[n], half);
      D[i * kLd + j] = j < i ? -m.x : 0.f, D[i * kLd + j + 1] = j + 1 < i ? -m.y : 0.f;
    });
  }
  __syncthreads();

  // Element-wise terms: this thread's row i, columns j0 .. j0 + 15.
  const int i = tid / 4, j0 = 16 * (tid % 4);
  const float beta_i = betas[i], gc_i = gcs[i];
  float row_sum_dbeta = 0.f, row_sum_z = 0.f;
  for (int jb = j0; jb < j0 + 16; jb += 4) {
    const int64_t at = cc + i * kC + jb;
    const float4 dp4 = ld4(p.dP + at), qkg4 = ld4(p.QKG + at), kkg4 = ld4(p.KKG + at);
    const float dp[4] = {dp4.x, dp4.y, dp4.z, dp4.w}, qkg[4] = {qkg4.x, qkg4.y, qkg4.z, qkg4.w},
                kkg[4] = {kkg4.x, kkg4.y, kkg4.z, kkg4.w};
    float dqk[4], dkk[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = jb + e;
      const float dl = D[i * kLd + j];  // 0 unless j < i
      // The gates' exponents are at most 0 (gc falls along the chunk): the fast exp's error is
      // relative, about 1e-6 at the exponents where the result is not already below 1e-30.
      const float gate = j <= i ? __expf(gc_i - gcs[j]) : 0.f;
      dqk[e] = p.scale * dp[e] * gate;
      // D_ij below the diagonal, D_ji above it.
      dkk[e] = j < i ? dl * beta_i * gate : j > i ? D[j * kLd + i] * betas[j] * __expf(gcs[j] - gc_i) : 0.f;
      row_sum_dbeta += dl * kkg[e];
      const float z = p.scale * dp[e] * qkg[e] + (j < i ? dl * beta_i * kkg[e] : 0.f);
      row_sum_z += z;
      // Column sums: the warp's eight rows of column j sit in lanes 4 apart; adding them by
      // shuffles first leaves one shared-memory atomic for eight rows (an atomic a row had eight
      // lanes of each instruction on one address).
      float col = z;
#pragma unroll
      for (int o = 4; o < 32; o *= 2) col += __shfl_xor_sync(0xffffffffu, col, o);
      if (lane < 4) atomicAdd(&col_z[j], col);
    }
    st4(p.dQK + at, dqk);
    st4(p.dKK + at, dkk);
  }
  // The four threads of a row are adjacent lanes.
#pragma unroll
  for (int o = 1; o < 4; o *= 2) {
    row_sum_dbeta += __shfl_xor_sync(0xffffffffu, row_sum_dbeta, o);
    row_sum_z += __shfl_xor_sync(0xffffffffu, row_sum_z, o);
  }
  if (tid % 4 == 0) row_z[i] = row_sum_z, row_dbeta[i] = row_sum_dbeta;
  __syncthreads();
  if (tid < kC) {
    p.dbeta[hc * kC + tid] = row_dbeta[tid] + col_dbeta[tid];
    p.dgc[hc * kC + tid] = row_z[tid] - col_z[tid];
  }
}

}  // namespace

WyGrads wy_backward_cuda(const ChunkTerms& c, const at::Tensor& dT_in, const at::Tensor& dP_in,
                         const at::Tensor& beta_in, double scale) {
  const c10::cuda::CUDAGuard guard(dT_in.device());
  const int64_t H = dT_in.size(0), NC = dT_in.size(1), C = dT_in.size(2);
  TORCH_CHECK(C == kC && dT_in.size(3) == kC && H * NC < (int64_t{1} << 31), "wy_backward_cuda: needs chunk 64");
  const at::Tensor dT = dT_in.contiguous(), dP = dP_in.contiguous(), Ag = c.Ag.contiguous(), KKG = c.KKG.contiguous(),
                   QKG = c.QKG.contiguous(), gc = c.gc.contiguous(), beta = beta_in.contiguous();
  for (const at::Tensor* x : {&dT, &dP, &Ag, &KKG, &QKG, &gc, &beta})
    TORCH_CHECK(x->scalar_type() == at::kFloat, "wy_backward_cuda: float32 inputs");

  WyGrads w;
  w.dQK = at::empty_like(dT), w.dKK = at::empty_like(dT);
  w.dbeta = at::empty_like(gc), w.dgc = at::empty_like(gc);
  if (H * NC == 0) return w;
  Params p{dT.data_ptr<float>(), dP.data_ptr<float>(), Ag.data_ptr<float>(), KKG.data_ptr<float>(),
           QKG.data_ptr<float>(), gc.data_ptr<float>(), beta.data_ptr<float>(), w.dQK.data_ptr<float>(),
           w.dKK.data_ptr<float>(), w.dbeta.data_ptr<float>(), w.dgc.data_ptr<float>(), static_cast<float>(scale)};
  constexpr size_t shared = sizeof(float) * 3 * kC * kLd;  // 52 KB: over the 48 KB default
  C10_CUDA_CHECK(cudaFuncSetAttribute(wy_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  wy_backward_kernel<<<static_cast<unsigned>(H * NC), kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}

}  // namespace hybrid::ops::detail
