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
//
// With kProducts (K a multiple of 16), dQK and dKK go into shared memory instead (Ag's and M's
// places, free by then) and the block ends with the products of dq and dk:
//   dq = dQK K,  dk = dQK^T Q + dKK K                     (C x K each, written out)
// from the chunk's keys, which arrive by cp.async (rows of K + 8 floats: the B fragments' rows
// then fall on distinct banks) while the rest runs, and its queries, which take dLg's place once
// it is read and arrive while dq is formed: batched products would read back both C x C matrices
// written for them. So the block holds two C x C matrices and two C x K ones at most (104 KB at
// K = 128: two blocks an SM, where the queries beside dLg took one). Warp w computes rows
// 16 (w % 4) .. + 15 and the columns of its half of K, 16 (or 8) at a time, in plain TF32 or,
// with kPrecise, 3xTF32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../src/ops/chunk_matmul.h"
#include "../src/ops/delta_chunk_terms.h"
#include "cp_async.cuh"
#include "tf32x3.cuh"
#include "vector_access.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kC = 64;
constexpr int kThreads = kCopyThreads;  // 256: copy_async's blocks
constexpr int kLd = kC + 4;

struct Params {
  const float *dT, *dP, *Ag, *KKG, *QKG, *gc, *beta;
  const float *q, *k;  // kProducts: [H, NC, C, K]
  float *dQK, *dKK;    // without kProducts
  float *dq, *dk;      // kProducts
  float *dbeta, *dgc;
  int K;
  float scale;
};

__host__ __device__ constexpr int rows_stride(int K) { return K + 8; }  // of the queries and keys
// dLg's place, then (kProducts) the queries'.
__host__ __device__ constexpr int last_place_floats(bool products, int K) {
  return kC * (products && rows_stride(K) > kLd ? rows_stride(K) : kLd);
}
size_t shared_bytes(bool products, int K) {
  return sizeof(float) * (2 * kC * kLd + last_place_floats(products, K) + (products ? kC * rows_stride(K) : 0));
}

// This warp's rows r0 .. + 15 of dq = dQK K or (kKeys) dk = dQK^T Q + dKK K, columns c .. c +
// 8 NT - 1: dQK in A, dKK in M (both C x C, row stride kLd), Q and K in Qs and Ks (row stride ldq).
template <int NT, bool kPrecise, bool kKeys>
__device__ __forceinline__ void gradient_columns(const float* A, const float* M, const float* Qs, const float* Ks,
                                                 int ldq, int r0, int c, int g, int t, float* out, int K) {
  float acc[NT][2][4] = {};
  if constexpr (kKeys) {
    warp_gemm<NT, kPrecise>(A + r0, 1, kLd, Qs + c, ldq, 1, kC / 8, g, t, acc);        // dQK^T Q
    warp_gemm<NT, kPrecise>(M + r0 * kLd, kLd, 1, Ks + c, ldq, 1, kC / 8, g, t, acc);  // + dKK K
  } else {
    warp_gemm<NT, kPrecise>(A + r0 * kLd, kLd, 1, Ks + c, ldq, 1, kC / 8, g, t, acc);  // dQK K
  }
  for_each_pair<NT>(r0, c, g, t, [&](int n, int half, int i, int j) {
    const float2 x = pair_sum(acc[n], half);
    stg2(out + i * K + j, x.x, x.y);
  });
}

// This warp's share of dq or (kKeys) dk: the columns of its half of K, 16 (or 8) at a time.
template <bool kPrecise, bool kKeys>
__device__ __forceinline__ void gradient(const float* A, const float* M, const float* Qs, const float* Ks, int ldq,
                                         int r0, int warp, int g, int t, float* out, int K) {
  const int half_k = K / 2, c_end = (warp / 4 + 1) * half_k;
  int c = (warp / 4) * half_k;
  for (; c + 16 <= c_end; c += 16) gradient_columns<2, kPrecise, kKeys>(A, M, Qs, Ks, ldq, r0, c, g, t, out, K);
  if (c < c_end) gradient_columns<1, kPrecise, kKeys>(A, M, Qs, Ks, ldq, r0, c, g, t, out, K);
}

__device__ __forceinline__ void st4(float* p, const float (&x)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}

template <bool kProducts, bool kPrecise>
__global__ void __launch_bounds__(kThreads) wy_backward_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];
  float* A = smem;          // [C][kLd]: Ag (kProducts: then dQK)
  float* M = A + kC * kLd;  // [C][kLd]: Ag^T dAg (kProducts: then dKK)
  float* D = M + kC * kLd;  // [C][kLd]: dT, then dAg, then dLg
  const int ldq = rows_stride(p.K);
  float* Qs = D;  // kProducts: [C][ldq], once dLg is read
  float* Ks = D + last_place_floats(kProducts, p.K);  // kProducts: [C][ldq]
  __shared__ float gcs[kC], betas[kC], col_dbeta[kC], col_z[kC], row_dbeta[kC], row_z[kC];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t hc = blockIdx.x, cc = hc * kC * kC;
  const RowPieces pieces = row_pieces(p.K);
  // Ag and dT by cp.async: copied through registers instead, each thread's next load would wait
  // behind its own shared store (a generic store may alias the next load for the compiler).
  const RowPieces square = row_pieces(kC);
  copy_async(A, kLd, p.Ag + cc, kC, kC, square);
  copy_async(D, kLd, p.dT + cc, kC, kC, square);
  cp_async_commit();
  if constexpr (kProducts) {  // in flight while the WY terms are computed
    copy_async(Ks, ldq, p.k + hc * kC * p.K, p.K, kC, pieces);
    cp_async_commit();
  }
  // The element-wise pass's operands, read after the two products (no shared memory left for
  // them): into L2 meanwhile (-26 us at K = 128, -3 at the OLMo shape; twenty-seventh session).
  if (tid == 0) {
    constexpr uint32_t kSquareBytes = kC * kC * sizeof(float);
    prefetch_l2(p.dP + cc, kSquareBytes), prefetch_l2(p.QKG + cc, kSquareBytes), prefetch_l2(p.KKG + cc, kSquareBytes);
  }
  if (tid < kC) {
    gcs[tid] = p.gc[hc * kC + tid], betas[tid] = p.beta[hc * kC + tid];
    col_dbeta[tid] = 0.f, col_z[tid] = 0.f;
  }
  if constexpr (kProducts) cp_async_wait<1>();  // Ag and dT; the keys may still be in flight
  else cp_async_wait_all();
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

  // Element-wise terms: this thread's row i, columns j0 .. j0 + 15, its dP, QKG and KKG loaded
  // before the loop (between them its shared stores would hold each load back).
  const int i = tid / 4, j0 = 16 * (tid % 4);
  const float beta_i = betas[i], gc_i = gcs[i];
  float row_sum_dbeta = 0.f, row_sum_z = 0.f;
  float4 dps[4], qkgs[4], kkgs[4];
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const int64_t at = cc + i * kC + j0 + 4 * b;
    dps[b] = ld4(p.dP + at), qkgs[b] = ld4(p.QKG + at), kkgs[b] = ld4(p.KKG + at);
  }
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const int jb = j0 + 4 * b;
    const int64_t at = cc + i * kC + jb;
    const float4 dp4 = dps[b], qkg4 = qkgs[b], kkg4 = kkgs[b];
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
    if constexpr (kProducts) {  // Ag and M are read by now (the last product's barrier)
      st4(A + i * kLd + jb, dqk);
      st4(M + i * kLd + jb, dkk);
    } else {
      st4(p.dQK + at, dqk);
      st4(p.dKK + at, dkk);
    }
  }
  // The four threads of a row are adjacent lanes.
#pragma unroll
  for (int o = 1; o < 4; o *= 2) {
    row_sum_dbeta += __shfl_xor_sync(0xffffffffu, row_sum_dbeta, o);
    row_sum_z += __shfl_xor_sync(0xffffffffu, row_sum_z, o);
  }
  if (tid % 4 == 0) row_z[i] = row_sum_z, row_dbeta[i] = row_sum_dbeta;
  if constexpr (kProducts) cp_async_wait_all();  // this thread's share of K; the barrier publishes all
  __syncthreads();  // and dLg is read: its place may take the queries
  if (tid < kC) {
    p.dbeta[hc * kC + tid] = row_dbeta[tid] + col_dbeta[tid];
    p.dgc[hc * kC + tid] = row_z[tid] - col_z[tid];
  }
  if constexpr (kProducts) {
    copy_async(Qs, ldq, p.q + hc * kC * p.K, p.K, kC, pieces);
    cp_async_commit();
    gradient<kPrecise, false>(A, M, Qs, Ks, ldq, r0, warp, g, t, p.dq + hc * kC * p.K, p.K);
    cp_async_wait_all();
    __syncthreads();
    gradient<kPrecise, true>(A, M, Qs, Ks, ldq, r0, warp, g, t, p.dk + hc * kC * p.K, p.K);
  }
}

template <bool kProducts, bool kPrecise>
void launch(const Params& p, int64_t chunks) {
  const size_t shared = shared_bytes(kProducts, p.K);
  auto* kernel = wy_backward_kernel<kProducts, kPrecise>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  kernel<<<static_cast<unsigned>(chunks), kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the products' version keeps at least two blocks an SM at this K (its queries and keys
// take 2 C (K + 8) floats beside two C x C matrices: K = 128 yes, K = 256 no); with one, the
// block's latency is exposed, and the batched products win (measured at K = 128 with the queries
// beside dLg, nineteenth session).
bool products_fit(int K) {
  static int known[256 / 16 + 1] = {};  // 0: not asked yet, 1: no, 2: yes
  if (!known[K / 16]) {
    const size_t shared = shared_bytes(true, K);
    int per_sm = 0;
    if (shared <= 227 * 1024) {
      auto* kernel = wy_backward_kernel<true, false>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared));
    }
    known[K / 16] = per_sm >= 2 ? 2 : 1;
  }
  return known[K / 16] == 2;
}

}  // namespace

WyGrads wy_backward_cuda(const ChunkTerms& c, const at::Tensor& dT_in, const at::Tensor& dP_in,
                         const at::Tensor& beta_in, double scale, const at::Tensor& q_in, const at::Tensor& k_in,
                         bool tf32) {
  const c10::cuda::CUDAGuard guard(dT_in.device());
  const int64_t H = dT_in.size(0), NC = dT_in.size(1), C = dT_in.size(2), K = k_in.size(3);
  TORCH_CHECK(C == kC && dT_in.size(3) == kC && H * NC < (int64_t{1} << 31), "wy_backward_cuda: needs chunk 64");
  const at::Tensor dT = dT_in.contiguous(), dP = dP_in.contiguous(), Ag = c.Ag.contiguous(), KKG = c.KKG.contiguous(),
                   QKG = c.QKG.contiguous(), gc = c.gc.contiguous(), beta = beta_in.contiguous(), q = q_in.contiguous(),
                   k = k_in.contiguous();
  for (const at::Tensor* x : {&dT, &dP, &Ag, &KKG, &QKG, &gc, &beta, &q, &k})
    TORCH_CHECK(x->scalar_type() == at::kFloat, "wy_backward_cuda: float32 inputs");
  // The products here where the tiles fit (cp.async's 16-byte pieces, column halves of 8) and two
  // blocks an SM still do.
  const bool products = K % 16 == 0 && K <= 256 && reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0 && products_fit(static_cast<int>(K));

  WyGrads w;
  w.dbeta = at::empty_like(gc), w.dgc = at::empty_like(gc);
  at::Tensor dQK, dKK;
  if (products) w.dq = at::empty_like(q), w.dk = at::empty_like(k);
  else dQK = at::empty_like(dT), dKK = at::empty_like(dT);
  if (H * NC == 0) {
    if (!products) w.dq = at::zeros_like(q), w.dk = at::zeros_like(k);
    return w;
  }
  auto data = [](const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; };
  Params p{data(dT),   data(dP), data(Ag), data(KKG),  data(QKG),     data(gc),    data(beta), data(q),
           data(k),    data(dQK), data(dKK), data(w.dq), data(w.dk), data(w.dbeta), data(w.dgc),
           static_cast<int>(K), static_cast<float>(scale)};
  if (!products) {
    launch<false, true>(p, H * NC);
    w.dq = chunk_matmul(dQK, k, tf32);
    w.dk = chunk_matmul(dKK, k, tf32, 1, chunk_matmul(dQK.mT(), q, tf32));
  } else if (tf32) {
    launch<true, false>(p, H * NC);
  } else {
    launch<true, true>(p, H * NC);
  }
  return w;
}

}  // namespace hybrid::ops::detail
