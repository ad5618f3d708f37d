// The chunk-local terms of the chunked delta rule (src/ops/delta_chunk_terms.h) on CUDA, float32,
// one block of 8 warps per (head, chunk) of C = 64 rows:
//   gc = cumsum(g), gamma = exp(gc), eta = exp(gc_C - gc), last = gamma_C, QG = diag(gamma) Q
//   KKG = K K^T * Gamma, QKG = Q K^T * Gamma      (Gamma_ij = exp(gc_i - gc_j), j <= i; else 0)
//   Lg = StrictTril(diag(beta) KKG), Ag = (I + Lg)^-1, T = Ag diag(beta)
//
// Products: 3xTF32 mma.sync (tf32x3.cuh) from the chunk's keys and queries in shared memory
// (rows padded to K + 4 floats, conflict-free fragments); warp w computes rows 16 (w % 4) .. + 15
// and columns 32 (w / 4) .. + 31 of both products (the two warps whose tile lies above the
// diagonal only write zeros), K K^T first (into KKG and Lg), then Q K^T: one product's accumulators
// at a time keep a thread at 80 registers, three blocks an SM (both at once took 107: two, and the
// kernel's time goes with its fixed work a chunk, not with its bytes; the gates' exponentials are
// computed once for each product). With raw rows (bf16 inputs: q = diag(sq) q_raw, k = diag(sk) k_raw
// with q_raw, k_raw exact in bf16, as the layout writes them for the state pass) the products are
// one bf16 mma.sync a step on those rows, exact products summed in float32, scaled afterwards:
//   K K^T = diag(sk) k_raw k_raw^T diag(sk),   Q K^T = diag(sq) q_raw k_raw^T diag(sk)
// at half the bytes read and a sixth of the 3xTF32 instructions (rows padded to K + 8 bf16 for
// ldmatrix without bank conflicts).
// Inverse, in shared memory over the keys' space: the four 16 x 16 diagonal blocks of the unit
// lower triangular I + Lg by forward substitution (one warp each, a column per lane, in
// registers), then the blocks below them by block products, since a block lower triangular
//   [[P, 0], [Q, R]]^-1 = [[P^-1, 0], [-R^-1 Q P^-1, R^-1]]:
// within each half (16 x 16 blocks (1, 0) and (3, 2)), then between the halves (32 x 32), each as
// two 3xTF32 products of 16 x 8 tiles a warp: 5 barriers for the whole inverse. (Scalar dots a
// diagonal at a time took 512 shared-memory loads a thread and 7 barriers.)
// T can also come out as the CUDA state passes take it (PassSplits::T): in split rows
// (split_rows.h), and transposed for the reverse pass, straight from the inverse in shared
// memory, in place of the float32 T that split_rows and split_transposed would read back to
// split; and QKG's split rows beside QKG (PassSplits::QKG) from the product's registers. With raw
// rows, also the passes' row factors with the keys' scales folded in (PassSplits::factors): -gamma
// sk, eta sk and s gamma sq, the same floats ATen's products of gamma, eta and the scales give.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../src/ops/delta_chunk_terms.h"
#include "bf16_split.cuh"
#include "cp_async.cuh"
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
  const uint16_t *q_raw, *k_raw;     // kRaw: [H, NC, C, K] bf16 rows
  const float *q_scale, *k_scale;    // kRaw: [H, NC, C]
  float *gc, *gamma, *eta, *last, *T, *QKG, *QG;  // T null with T_split
  float *Ag, *KKG;  // null in the forward
  uint32_t *T_split, *Tt_split;  // PassSplits::T: T's and (backward) T^T's split rows, else null
  uint32_t* QKG_split;           // PassSplits::QKG: QKG's split rows, else null
  // PassSplits::factors (kRaw): -gamma sk, eta sk and query_scale gamma sq, else null
  float *neg_gamma_k, *eta_k, *query_factor;
  float query_scale;
  int K;
};

// Keys and queries (float32 rows of K + 4, or raw bf16 rows of K + 8), then Lg, the inverse and the
// inverse's scratch blocks beside them: K K^T's terms go into Lg while the queries are still read
// for Q K^T, so a warp holds one product's accumulators at a time (three blocks an SM at K = 96).
__host__ __device__ constexpr int raw_stride(int K) { return K + 8; }  // bf16: 2K + 16 bytes, odd in 16s
__host__ __device__ constexpr int rows_floats(int K, bool raw) { return raw ? kC * raw_stride(K) : 2 * kC * (K + 4); }
size_t shared_floats(int K, bool raw) { return rows_floats(K, raw) + 2 * kC * kLd; }
// The inverse's intermediate products (L X, read back as the next product's B operand) go in the
// rows' place, read no more by then: up to 32 rows of 40 floats, a B fragment's loads (row t,
// column g: bank 8 t + g mod 32) on distinct banks.
constexpr int kScratchLd = 40;
static_assert(kC / 2 * kScratchLd <= kC * raw_stride(16), "the rows' place holds the inverse's scratch");

// D = sign A B for this warp's 16 x 8 tile, A's rows at A (stride kLd), B's at B (stride ldb), over
// `steps` k-steps of 8, in 3xTF32: the inverse's block products.
__device__ __forceinline__ void block_product(const float* A, const float* B, int ldb, int steps, float* D, int ldd,
                                              float sign, int g, int t) {
  float acc[1][2][4] = {};
  warp_gemm<1>(A, kLd, 1, B, ldb, 1, steps, g, t, acc);
  for_each_pair<1>(0, 0, g, t, [&](int, int half, int i, int j) {
    const float2 x = pair_sum(acc[0], half);
    st2(D + i * ldd + j, sign * x.x, sign * x.y);
  });
}

// acc += x_raw k_raw^T for this warp's rows r0 .. + 15 and columns c0 .. + 31, from raw rows in
// shared memory (ld bf16 a row; xs the keys or the queries).
__device__ __forceinline__ void raw_product(const uint16_t* xs, const uint16_t* ks, int ld, int r0, int c0, int K,
                                            int lane, float (&acc)[4][2][4]) {
  auto operand = [&](const uint16_t* x) {
    return SplitOperand{static_cast<uint32_t>(__cvta_generic_to_shared(x)), 2 * ld, 0};
  };
  const SplitOperand X_op = operand(xs), K_op = operand(ks);
  for_each_k_step(K / 16, [&](int p, int k0) {
    uint32_t a[4], unused[4], b[4];
    load_a<false, false>(X_op, r0, k0, lane, a, unused);
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      load_b_from_rows(K_op, c0 + 16 * pair, k0, lane, b);
#pragma unroll
      for (int half = 0; half < 2; ++half) mma_bf16(acc[2 * pair + half][p], a, b[2 * half], b[2 * half + 1]);
    }
  });
}

template <bool kRaw>
__global__ void __launch_bounds__(kThreads, 3) chunk_prep_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];
  __shared__ float gcs[kC], betas[kC], q_scales[kC], k_scales[kC];
  const int K = p.K, ldk = kRaw ? raw_stride(K) : K + 4, tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t hc = blockIdx.x;  // (head, chunk)
  float* ks = smem;           // [C][ldk]
  float* qs = ks + kC * ldk;  // [C][ldk]
  uint16_t* ks_raw = reinterpret_cast<uint16_t*>(smem);  // kRaw: [C][ldk] bf16
  uint16_t* qs_raw = ks_raw + kC * ldk;                   // kRaw: [C][ldk] bf16
  float* L = smem + rows_floats(K, kRaw);  // [C][kLd]
  float* X = L + kC * kLd;                 // [C][kLd]
  float* scratch = smem;                   // [C / 2][kScratchLd] in the inverse, in the rows' place

  // The chunk's rows by cp.async, waited for before the gates' first barrier publishes them: copied
  // through registers instead, each thread's next load would wait behind its previous shared store
  // (a generic store may alias it for the compiler), three or four global latencies in a row.
  if constexpr (kRaw) {  // bf16 rows copied as K / 2 floats' bytes (K a multiple of 8)
    const RowPieces pieces = row_pieces(K / 2);
    copy_async(reinterpret_cast<float*>(ks_raw), ldk / 2, reinterpret_cast<const float*>(p.k_raw + hc * kC * K), K / 2,
               kC, pieces);
    copy_async(reinterpret_cast<float*>(qs_raw), ldk / 2, reinterpret_cast<const float*>(p.q_raw + hc * kC * K), K / 2,
               kC, pieces);
    if (tid < kC) q_scales[tid] = p.q_scale[hc * kC + tid], k_scales[tid] = p.k_scale[hc * kC + tid];
  } else {
    const RowPieces pieces = row_pieces(K);
    copy_async(ks, ldk, p.k + hc * kC * K, K, kC, pieces);
    copy_async(qs, ldk, p.q + hc * kC * K, K, kC, pieces);
  }
  cp_async_commit();
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
  cp_async_wait_all();
  __syncthreads();
  if (tid >= 32 && tid < kC) gcs[tid] += gcs[31];
  __syncthreads();
  if (tid < kC) {
    const float x = gcs[tid], end = gcs[kC - 1];
    p.gc[hc * kC + tid] = x;
    p.gamma[hc * kC + tid] = expf(x);
    p.eta[hc * kC + tid] = expf(end - x);
    if (tid == 0) p.last[hc] = expf(end);
    if (kRaw && p.neg_gamma_k) {  // the same products as ATen's -gamma * sk, eta * sk, gamma * sq * s
      const float gamma = expf(x), eta = expf(end - x);
      p.neg_gamma_k[hc * kC + tid] = -gamma * k_scales[tid];
      p.eta_k[hc * kC + tid] = eta * k_scales[tid];
      p.query_factor[hc * kC + tid] = gamma * q_scales[tid] * p.query_scale;
    }
  }

  // K K^T, then Q K^T, for this warp's 16 x 32 tile: B(kk, n) = K[n][kk].
  const int r0 = 16 * (warp % 4), c0 = 32 * (warp / 4);
  const bool below = c0 <= r0 + 15;  // the tile holds entries on or below the diagonal
  const int64_t cc = hc * kC * kC;
  // Split rows as the state pass takes them (split_chunk_matrices): word w of row r at
  // swizzled_word(r, w); a row's hi pairs, then its lo pairs.
  auto store_split = [&](uint32_t* x, int row, int pair, SplitPair s) {
    x[cc + row * kC + swizzled_word(row, pair)] = s.hi, x[cc + row * kC + swizzled_word(row, kC / 2 + pair)] = s.lo;
  };
  // x_i k_j^T's tile with the rows' scales (raw rows: diag(s_i) (raw products) diag(sk_j)) and the
  // gates, a pair of columns at a time: f(i, j, the pair).
  auto gated_pairs = [&](float (&acc)[4][2][4], const float* row_scales, auto&& f) {
    for_each_pair<4>(r0, c0, g, t, [&](int n, int half, int i, int j) {
      const float gate0 = j <= i ? expf(gcs[i] - gcs[j]) : 0.f, gate1 = j + 1 <= i ? expf(gcs[i] - gcs[j + 1]) : 0.f;
      float2 x = pair_sum(acc[n], half);
      if constexpr (kRaw) x = make_float2(row_scales[i] * x.x * k_scales[j], row_scales[i] * x.y * k_scales[j + 1]);
      f(i, j, make_float2(x.x * gate0, x.y * gate1));
    });
  };
  {
    float kk[4][2][4] = {};
    if (below) {
      if constexpr (kRaw) raw_product(ks_raw, ks_raw, ldk, r0, c0, K, lane, kk);
      else warp_gemm<4>(ks + r0 * ldk, ldk, 1, ks + c0 * ldk, 1, ldk, K / 8, g, t, kk);
    }
    gated_pairs(kk, k_scales, [&](int i, int j, float2 kkg) {
      if (p.KKG) stg2(p.KKG + cc + i * kC + j, kkg.x, kkg.y);
      st2(L + i * kLd + j, j < i ? betas[i] * kkg.x : 0.f, j + 1 < i ? betas[i] * kkg.y : 0.f);
    });
  }
  {
    float qk[4][2][4] = {};
    if (below) {
      if constexpr (kRaw) raw_product(qs_raw, ks_raw, ldk, r0, c0, K, lane, qk);
      else warp_gemm<4>(qs + r0 * ldk, ldk, 1, ks + c0 * ldk, 1, ldk, K / 8, g, t, qk);
    }
    gated_pairs(qk, q_scales, [&](int i, int j, float2 qkg) {
      stg2(p.QKG + cc + i * kC + j, qkg.x, qkg.y);
      if (p.QKG_split) store_split(p.QKG_split, i, j / 2, split_pair(qkg.x, qkg.y));
    });
  }
  // diag(gamma) Q from the queries in shared memory (the output's and the backward's product take it,
  // where the state passes do not take the raw queries instead).
  for (int i = tid; p.QG && i < kC * K / 4; i += kThreads) {
    const int r = i / (K / 4), c = 4 * (i % (K / 4));
    float4 x;
    float s = expf(gcs[r]);
    if constexpr (kRaw) {
      x = bf16x4_floats(*reinterpret_cast<const uint2*>(qs_raw + r * ldk + c));
      s *= q_scales[r];
    } else {
      x = *reinterpret_cast<const float4*>(qs + r * ldk + c);
    }
    *reinterpret_cast<float4*>(p.QG + (hc * kC + r) * K + c) = make_float4(s * x.x, s * x.y, s * x.z, s * x.w);
  }
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

  // Within each half: X(i, i - 1) = -X(i, i) [L(i, i - 1) X(i - 1, i - 1)] for blocks i = 1 and 3,
  // warps 0-3 a 16 x 8 tile each (i = 1 + 2 (w / 2), columns 8 (w % 2)).
  if (warp < 4) {
    const int i = kB * (1 + 2 * (warp / 2)), j = i - kB, n = 8 * (warp % 2);
    block_product(L + i * kLd + j, X + j * kLd + j + n, kLd, kB / 8, scratch + (warp / 2) * kB * kScratchLd + n,
                  kScratchLd, 1.f, g, t);
  }
  __syncthreads();
  if (warp < 4) {
    const int i = kB * (1 + 2 * (warp / 2)), j = i - kB, n = 8 * (warp % 2);
    block_product(X + i * kLd + i, scratch + (warp / 2) * kB * kScratchLd + n, kScratchLd, kB / 8,
                  X + i * kLd + j + n, kLd, -1.f, g, t);
  }
  __syncthreads();
  // Between the halves: X(B, A) = -X(B, B) [L(B, A) X(A, A)], A the first 32 rows and columns, B the
  // last; warp w a 16 x 8 tile, rows 16 (w % 2) and columns 8 (w / 2) of the 32 x 32 block.
  {
    constexpr int kHalf = kC / 2;
    const int r = 16 * (warp % 2), n = 8 * (warp / 2);
    block_product(L + (kHalf + r) * kLd, X + n, kLd, kHalf / 8, scratch + r * kScratchLd + n, kScratchLd, 1.f, g, t);
    __syncthreads();
    block_product(X + (kHalf + r) * kLd + kHalf, scratch + n, kScratchLd, kHalf / 8, X + (kHalf + r) * kLd + n, kLd,
                  -1.f, g, t);
  }
  __syncthreads();

  for (int i = tid; i < kC * kC / 4; i += kThreads) {
    const int row = i / (kC / 4), col = 4 * (i % (kC / 4));
    const float4 x = *reinterpret_cast<const float4*>(X + row * kLd + col);
    const int64_t at = cc + row * kC + col;
    if (p.T)
      *reinterpret_cast<float4*>(p.T + at) =
          make_float4(x.x * betas[col], x.y * betas[col + 1], x.z * betas[col + 2], x.w * betas[col + 3]);
    if (p.Ag) *reinterpret_cast<float4*>(p.Ag + at) = x;
  }
  // T = X diag(beta) in split rows (a row's hi pairs, then its lo pairs), the same floats as above,
  // so the same bits as split_chunk_matrices(T); T^T's rows are T's columns (split_transposed's).
  constexpr int kPairs = kC / 2;
  for (int i = tid; p.T_split && i < kC * kPairs; i += kThreads) {
    const int row = i / kPairs, pair = i % kPairs, col = 2 * pair;
    store_split(p.T_split, row, pair,
                split_pair(X[row * kLd + col] * betas[col], X[row * kLd + col + 1] * betas[col + 1]));
  }
  // T^T's rows are X's columns: a warp takes 4 rows of 8 pairs each (X's loads at 8 pair + row mod 32,
  // two lanes a bank; a row's 8 pairs one 32-byte piece of global memory), where a warp on one row's
  // 32 pairs loaded with lanes 8 apart, eight a bank.
  for (int i = tid; p.Tt_split && i < kC * kPairs; i += kThreads) {
    const int piece = i / 32, lane_of = i % 32;
    const int row = 4 * (piece % (kC / 4)) + lane_of / 8, pair = 8 * (piece / (kC / 4)) + lane_of % 8, col = 2 * pair;
    store_split(p.Tt_split, row, pair,
                split_pair(X[col * kLd + row] * betas[row], X[(col + 1) * kLd + row] * betas[row]));
  }
}

}  // namespace

ChunkTerms chunk_terms_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& g_in,
                            const at::Tensor& beta_in, bool for_backward, bool want_QG, const RawRows& raw,
                            PassSplits splits) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t H = q_in.size(0), NC = q_in.size(1), C = q_in.size(2), K = q_in.size(3);
  TORCH_CHECK(C == kC && K % 16 == 0 && K <= 256 && H * NC < (int64_t{1} << 31),
              "chunk_terms_cuda: needs chunk 64 and K a multiple of 16 up to 256");
  // Raw rows when both are there: the kernel then reads neither float32 operand, which may be a
  // stand-in for its shape (rows_stand_in: the layout wrote no float32 rows).
  const bool use_raw = raw.keys.defined() && raw.queries.defined();
  const at::Tensor q = use_raw ? q_in : q_in.contiguous(), k = use_raw ? k_in : k_in.contiguous(),
                   g = g_in.contiguous(), beta = beta_in.contiguous();
  for (const at::Tensor* x : {&q, &k, &g, &beta})
    TORCH_CHECK(x->scalar_type() == at::kFloat, "chunk_terms_cuda: float32 inputs");
  for (const at::Tensor* x : {&q, &k})
    TORCH_CHECK(use_raw || reinterpret_cast<uintptr_t>(x->data_ptr()) % 16 == 0,
                "chunk_terms_cuda: q and k must be 16-byte aligned");
  at::Tensor q_raw, k_raw, q_scale, k_scale;
  if (use_raw) {
    q_raw = raw.queries.contiguous(), k_raw = raw.keys.contiguous();
    q_scale = raw.query_scale.contiguous(), k_scale = raw.scale.contiguous();
    TORCH_CHECK(q_raw.scalar_type() == at::kBFloat16 && k_raw.scalar_type() == at::kBFloat16 &&
                    q_raw.sizes() == q.sizes() && k_raw.sizes() == k.sizes() && q_scale.scalar_type() == at::kFloat &&
                    k_scale.scalar_type() == at::kFloat && q_scale.sizes() == g.sizes() && k_scale.sizes() == g.sizes(),
                "chunk_terms_cuda: raw rows must be bf16 of q's shape, their scales float32 of g's");
    for (const at::Tensor* x : {&q_raw, &k_raw})
      TORCH_CHECK(reinterpret_cast<uintptr_t>(x->data_ptr()) % 16 == 0, "chunk_terms_cuda: raw rows must be 16-byte aligned");
  }

  ChunkTerms c;
  const auto opt = q.options();
  c.gc = at::empty({H, NC, C}, opt), c.gamma = at::empty({H, NC, C}, opt), c.eta = at::empty({H, NC, C}, opt);
  c.last = at::empty({H, NC}, opt);
  c.QKG = at::empty({H, NC, C, C}, opt);
  if (splits.QKG) c.QKG_split = at::empty({H, NC, C, C}, opt.dtype(at::kInt));
  if (splits.T) {
    c.T_split = at::empty({H, NC, C, C}, opt.dtype(at::kInt));
    if (for_backward) c.Tt_split = at::empty({H, NC, C, C}, opt.dtype(at::kInt));
  } else {
    c.T = at::empty({H, NC, C, C}, opt);
  }
  if (want_QG) c.QG = at::empty({H, NC, C, K}, opt);
  if (for_backward) c.Ag = at::empty({H, NC, C, C}, opt), c.KKG = at::empty({H, NC, C, C}, opt);
  const bool factors = splits.factors && use_raw;
  if (factors)
    c.neg_gamma_k = at::empty({H, NC, C}, opt), c.eta_k = at::empty({H, NC, C}, opt),
    c.query_factor = at::empty({H, NC, C}, opt);
  if (H * NC == 0) return c;

  auto split_data = [](const at::Tensor& x) {
    return x.defined() ? reinterpret_cast<uint32_t*>(x.data_ptr<int>()) : nullptr;
  };
  auto bf16_rows = [](const at::Tensor& x) {
    return x.defined() ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  };
  Params p{use_raw ? nullptr : q.data_ptr<float>(), use_raw ? nullptr : k.data_ptr<float>(), g.data_ptr<float>(),
           beta.data_ptr<float>(),
           bf16_rows(q_raw), bf16_rows(k_raw), use_raw ? q_scale.data_ptr<float>() : nullptr,
           use_raw ? k_scale.data_ptr<float>() : nullptr,
           c.gc.data_ptr<float>(), c.gamma.data_ptr<float>(), c.eta.data_ptr<float>(), c.last.data_ptr<float>(),
           splits.T ? nullptr : c.T.data_ptr<float>(), c.QKG.data_ptr<float>(),
           want_QG ? c.QG.data_ptr<float>() : nullptr, for_backward ? c.Ag.data_ptr<float>() : nullptr,
           for_backward ? c.KKG.data_ptr<float>() : nullptr, split_data(c.T_split), split_data(c.Tt_split),
           split_data(c.QKG_split), factors ? c.neg_gamma_k.data_ptr<float>() : nullptr,
           factors ? c.eta_k.data_ptr<float>() : nullptr, factors ? c.query_factor.data_ptr<float>() : nullptr,
           static_cast<float>(splits.scale), static_cast<int>(K)};
  const size_t shared = sizeof(float) * shared_floats(static_cast<int>(K), use_raw);
  auto* kernel = use_raw ? chunk_prep_kernel<true> : chunk_prep_kernel<false>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  kernel<<<static_cast<unsigned>(H * NC), kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

}  // namespace hybrid::ops::detail
