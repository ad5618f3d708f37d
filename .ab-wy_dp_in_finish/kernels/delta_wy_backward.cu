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
// over the warps' parts in shared memory in a fixed order (deterministic: no atomics).
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
//
// With kRaw (the op's TF32 path from bf16 inputs, K up to 128) the products take q and k's raw
// bf16 rows (q = diag(sq) q_raw, k = diag(sk) k_raw, exact in bf16) on bf16 mma.sync, the rows'
// scales folded into two C x C operands, S = diag(sq) dQK diag(sk) and R = diag(sk) dKK diag(sk),
// which go into shared memory split into bf16 hi and lo planes (16 bits of each value kept where
// TF32 keeps 11; bf16_split.cuh), and out of the results' rows:
//   dq = diag(1/sq) S k_raw,   dk = diag(1/sk) (S^T q_raw + R k_raw)
// The element-wise pass writes S in Ag's place and R in M's (swizzled rows, 16 KB each); the raw
// keys arrive after dLg's place and the raw queries in it. Half the rows' bytes from global
// memory, and 66 KB of shared memory at K = 96, 70 KB at K = 128 (the float32 rows: 79 and
// 104): three blocks an SM where two fit before (80 registers as compiled; asking for three
// blocks by __launch_bounds__ gave the same 80 with 52 bytes spilled); and the layout then need
// not write float32 q and k for this kernel.
//
// With kFactors (the raw path given WyFactors) the block forms its dT = dV' W^T and dP = dO V'^T
// itself, before anything else: the value dimension streams through shared memory in slices of
// 16 columns (C x 16 of dO, V', dV' and W a slice, three stages), which thread 0 loads by TMA as
// dense 64-byte rows with the 64-byte swizzle (as the finish kernel's slices at K = 128), and
// warpgroup 0 accumulates dP, warpgroup 1 dT, on TF32 wgmma (m64n64k8, two k-steps a slice). The
// stages take the places of M, dT and the keys (unused until then); the results go to dT's place
// and to a fourth C x C place where the keys were (dP, read by the element-wise pass), and the
// raw keys arrive after that pass, with the queries. Batched products wrote both C x C matrices
// for this kernel to read back, and read dO and V' once more than the finish kernel does. With
// kKept16 (the registers passes keep V', dV' and W in bf16: half the bytes) the products are bf16
// (m64n64k16, one k-step a slice): dT from shared memory, dP with dO's fragments (bf16 values)
// from registers; a stage is 10 KB where four float32 slices take 16.
// With kLeavesDP (bf16 factors, S and R out for the finish kernel, where its instance that forms dP
// fits: finish_forms_wy_dp) the block forms dT alone, from dV' and W (each warpgroup 32 of its
// columns, m64n32k16): the finish kernel streams dO and V' anyway, and forms dP there, S from it
// and dP's share of dgc (s dP * QKG's row sums less its column sums). This kernel then writes R
// alone, and reads neither dO, V' nor QKG: 82 KB fewer a chunk-head at the OLMo shape, of about 180.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "../src/ops/chunk_matmul.h"
#include "../src/ops/delta_chunk_terms.h"
#include "../src/ops/reverse_pass_order.h"
#include "bf16_split.cuh"
#include "chunk_ready.cuh"
#include "cp_async.cuh"
#include "tensor_map.h"
#include "tf32x3.cuh"
#include "vector_access.cuh"
#include "wgmma.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kC = 64;
constexpr int kThreads = kCopyThreads;  // 256: copy_async's blocks
constexpr int kLd = kC + 4;

struct Params {
  const float *dT, *dP, *Ag, *KKG, *QKG, *gc, *beta;
  const float *q, *k;  // kProducts: [H, NC, C, K]
  const uint16_t *q_raw, *k_raw;   // kRaw: [H, NC, C, K] bf16
  const float *q_scale, *k_scale;  // kRaw: [H, NC, C]
  float *dQK, *dKK;    // without kProducts
  float *dq, *dk;      // kProducts
  float *dbeta, *dgc;
  int K;
  float scale;
  int V;  // kFactors
  // kFactors, or null: S and R (split rows, 16 KiB each) out to [H, NC, 2, C, C] for the finish
  // kernel's products, in place of dq and dk here
  float* split_out;
  // Beside the reverse pass (WyFactors::from_pass), or null: the chunks' counters and the count
  // each reaches before its dV' is read. The blocks then take the chunks in the order the pass
  // finishes them (src/ops/reverse_pass_order.h).
  const int* chunk_ready = nullptr;
  int ready_count = 0;
  ReversePassOrder order;
};

// kFactors: dO, V', dV' and W as 2D tensors [H NC C, V] for TMA, boxes of a slice's 16 columns by C
// rows. An argument of its own, as the finish kernel's SliceMaps.
struct FactorMaps {
  CUtensorMap dO, vnew, dvnew, W;
};
// Three stages of float32 slices; six of bf16 ones (kept16), twelve of dV' and W alone in bf16
// (dT_only), in the same places (M's, dT's and dP's, 3 x 17 KB): more of the slices' bytes in flight.
constexpr int kFactorSlice = 16, kMaxFactorStages = 12;
__host__ __device__ constexpr int factor_stages(bool kept16, bool dT_only) { return dT_only ? 12 : kept16 ? 6 : 3; }
// A stage's floats: four float32 slices, four bf16 ones (kept16), or two bf16 ones (dT_only).
__host__ __device__ constexpr int factor_stage_floats(bool kept16, bool dT_only) {
  return (dT_only ? 2 * 2 : kept16 ? 4 * 2 : 4 * 4) * kC * kFactorSlice / 4;
}

__host__ __device__ constexpr int rows_stride(int K) { return K + 8; }  // of the queries and keys
// dLg's place, then (kProducts) the queries'.
__host__ __device__ constexpr int last_place_floats(bool products, int K) {
  return kC * (products && rows_stride(K) > kLd ? rows_stride(K) : kLd);
}
// kRaw: a raw row's bytes in shared memory (an odd multiple of 16: ldmatrix's rows on distinct
// banks). The split C x C operands (64 swizzled rows of 128 hi and 128 lo bytes) fit the float
// matrices' places.
__host__ __device__ constexpr int raw_row_bytes(int K) { return 2 * K + 16; }
// kFactors: four C x C places, the last one dP's and then the raw keys' (K up to 128).
size_t shared_bytes(bool products, int K, bool raw = false, bool factors = false) {
  if (factors) return sizeof(float) * 4 * kC * kLd;
  if (raw) return sizeof(float) * 3 * kC * kLd + kC * raw_row_bytes(K);
  return sizeof(float) * (2 * kC * kLd + last_place_floats(products, K) + (products ? kC * rows_stride(K) : 0));
}

// This warp's columns, its half of K 16 (or 8) at a time: f(std::integral_constant<int, NT>, c)
// for the NT 8-column tiles from column c.
template <class F>
__device__ __forceinline__ void for_each_column_block(int warp, int K, F&& f) {
  const int half_k = K / 2, c_end = (warp / 4 + 1) * half_k;
  int c = (warp / 4) * half_k;
  for (; c + 16 <= c_end; c += 16) f(std::integral_constant<int, 2>{}, c);
  if (c < c_end) f(std::integral_constant<int, 1>{}, c);
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
  for_each_column_block(warp, K, [&](auto nt, int c) {
    gradient_columns<decltype(nt)::value, kPrecise, kKeys>(A, M, Qs, Ks, ldq, r0, c, g, t, out, K);
  });
}

// kRaw's operands in shared memory: S and R split, the raw rows.
struct RawOperands {
  SplitOperand S, R, queries, keys;
};

// kRaw: this warp's share of dq = diag(1/sq) S k_raw or (kKeys) dk = diag(1/sk) (S^T q_raw + R
// k_raw), bf16 mma.sync with the C x C operand split (its lo plane's product first); row_scales
// the scales the rows divide by (sq, or sk).
template <bool kKeys>
__device__ __forceinline__ void raw_gradient(const RawOperands& x, const float* row_scales, int r0, int warp,
                                             int lane, float* out, int K) {
  for_each_column_block(warp, K, [&](auto nt, int c) {
    constexpr int NT = decltype(nt)::value;
    float acc[NT][2][4] = {};
    if constexpr (kKeys) {
      warp_gemm_split<NT, true, true, false>(x.S, r0, x.queries, c, kC / 16, lane, acc);
      warp_gemm_split<NT, false, true, false>(x.R, r0, x.keys, c, kC / 16, lane, acc);
    } else {
      warp_gemm_split<NT, false, true, false>(x.S, r0, x.keys, c, kC / 16, lane, acc);
    }
    for_each_pair<NT>(r0, c, lane / 4, lane % 4, [&](int n, int half, int i, int j) {
      const float2 v = pair_sum(acc[n], half);
      stg2(out + i * K + j, v.x / row_scales[i], v.y / row_scales[i]);
    });
  });
}

__device__ __forceinline__ void st4(float* p, const float (&x)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}

// kFactors: dP (warpgroup 0) or dT (warpgroup 1) of chunk hc into `out` (C x C, rows kLd apart),
// from TMA slices staged in `stages` (1024-byte aligned, factor_stages stages). kKept16: all four
// in bf16 (32-byte rows of a slice's 16 values, the 32-byte swizzle; dO's values are o's bf16
// gradient), the products bf16 (m64n64k16, one k-step a slice), both from shared memory. kDTOnly
// (bf16): dT alone, from slices of dV' and W, warpgroup w its columns 32 w .. 32 w + 31 (m64n32k16).
template <bool kKept16, bool kDTOnly>
__device__ __forceinline__ void factor_products(const FactorMaps& maps, int V, int64_t hc, float* stages,
                                                uint64_t (&slice_in)[kMaxFactorStages], float* out) {
  static_assert(!kDTOnly || kKept16, "dT alone: from bf16 factors");
  constexpr int kFactorStages = factor_stages(kKept16, kDTOnly);
  static_assert(sizeof(float) * kFactorStages * factor_stage_floats(kKept16, kDTOnly) + 1024 <=
                    sizeof(float) * 3 * kC * kLd,
                "the stages in M's, dT's and dP's places, from a 1024-byte boundary");
  constexpr int kStage = factor_stage_floats(kKept16, kDTOnly), kSliceFloats = kC * kFactorSlice / (kKept16 ? 2 : 1);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, slices = (V + kFactorSlice - 1) / kFactorSlice;
  if (tid == 0)
    for (int i = 0; i < kFactorStages; ++i) mbarrier_init(&slice_in[i], 1);
  __syncthreads();
  // Slice s's C x 16 of dO, V', dV', W into its stage (a partial last slice's box is filled with
  // zeros past V and counts its full bytes).
  auto issue = [&](int s) {
    if (tid != 0) return;
    float* to = stages + (s % kFactorStages) * kStage;
    uint64_t* in = &slice_in[s % kFactorStages];
    const int v0 = s * kFactorSlice, row = static_cast<int>(hc) * kC;
    mbarrier_arrive_expect_bytes(in, sizeof(float) * kStage);
    if constexpr (kDTOnly) {
      bulk_load_2d(to, &maps.dvnew, v0, row, in);
      bulk_load_2d(to + kSliceFloats, &maps.W, v0, row, in);
    } else {
      bulk_load_2d(to, &maps.dO, v0, row, in);
      bulk_load_2d(to + kSliceFloats, &maps.vnew, v0, row, in);
      bulk_load_2d(to + 2 * kSliceFloats, &maps.dvnew, v0, row, in);
      bulk_load_2d(to + 3 * kSliceFloats, &maps.W, v0, row, in);
    }
  };
  for (int s = 0; s < kFactorStages - 1 && s < slices; ++s) issue(s);
  // Float32 rows of 16 floats (64 bytes) with the 64-byte swizzle. Warpgroup 0: dP = dO V'^T; 1:
  // dT = dV' W^T (both TN).
  auto at = [](const float* x, int ks) { return swizzled_rows_descriptor(x, 4 * kFactorSlice, 0, ks); };
  constexpr int kTiles = kDTOnly ? 4 : 8;  // n8 tiles of a warpgroup's product
  float d[kTiles][4] = {};
  for (int s = 0; s < slices; ++s) {
    mbarrier_wait(&slice_in[s % kFactorStages], (s / kFactorStages) % 2);
    wgmma_wait<0>();  // slice s - 1's products: its stage is refilled after the barrier
    __syncthreads();
    if (s + kFactorStages - 1 < slices) issue(s + kFactorStages - 1);
    const float* stage = stages + (s % kFactorStages) * kStage;
    // Rows of 16 bf16 (32 bytes, the 32-byte swizzle) from first_row on.
    auto rows = [](const float* x, int first_row) { return swizzled_rows_descriptor(x, 32, first_row, 0); };
    wgmma_fence();
    if constexpr (kDTOnly) {
      const float *dvnew = stage, *W = dvnew + kSliceFloats;
      wgmma_bf16_shared<4>(d, rows(dvnew, 0), rows(W, 32 * (warp / 4)), 1);
    } else {
      const float *dO = stage, *vnew = dO + kSliceFloats, *dvnew = vnew + kSliceFloats, *W = dvnew + kSliceFloats;
      const float *a = warp < 4 ? dO : dvnew, *b = warp < 4 ? vnew : W;
      if constexpr (kKept16) {
        wgmma_bf16_shared<8>(d, rows(a, 0), rows(b, 0), 1);
      } else {
#pragma unroll
        for (int ks = 0; ks < kFactorSlice / 8; ++ks) wgmma_tf32_accumulate<8>(d, at(a, ks), at(b, ks));
      }
    }
    wgmma_commit();
  }
  wgmma_wait<0>();
  wgmma_hold(d);
  __syncthreads();  // every warpgroup is done with the stages, which `out` may overlap
  const int r = 16 * (warp % 4) + lane / 4, c = 2 * (lane % 4) + (kDTOnly ? 32 * (warp / 4) : 0);
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    *reinterpret_cast<float2*>(out + r * kLd + 8 * j + c) = make_float2(d[j][0], d[j][1]);
    *reinterpret_cast<float2*>(out + (r + 8) * kLd + 8 * j + c) = make_float2(d[j][2], d[j][3]);
  }
}

template <bool kProducts, bool kPrecise, bool kRaw = false, bool kFactors = false, bool kKept16 = false,
          bool kLeavesDP = false>
__global__ void __launch_bounds__(kThreads) wy_backward_kernel(const Params p, const __grid_constant__ FactorMaps maps) {
  static_assert(!kRaw || (kProducts && !kPrecise), "raw rows: the TF32 path's products");
  static_assert(!kFactors || kRaw, "dT and dP formed here: the raw path");
  static_assert(!kKept16 || kFactors, "bf16 factors: the factor products");
  static_assert(!kLeavesDP || kKept16, "dP left to the finish kernel: from bf16 factors");
  extern __shared__ __align__(16) float smem[];
  float* A = smem;          // [C][kLd]: Ag (kProducts: then dQK; kRaw: S split)
  float* M = A + kC * kLd;  // [C][kLd]: Ag^T dAg (kProducts: then dKK; kRaw: R split)
  float* D = M + kC * kLd;  // [C][kLd]: dT, then dAg, then dLg
  const int ldq = rows_stride(p.K);
  float* Qs = D;  // kProducts: [C][ldq], once dLg is read (kRaw: raw rows)
  float* Ks = D + (kRaw ? kC * kLd : last_place_floats(kProducts, p.K));  // kProducts: [C][ldq] (kRaw: raw rows)
  float* Ps = Ks;  // kFactors: [C][kLd], dP until the element-wise pass is done with it, then the raw keys
  __shared__ float gcs[kC], betas[kC], row_dbeta[kC], row_z[kC];
  // The column sums' parts, added in a fixed order at the end: dbeta and dgc the same bit for bit
  // at every run (shared-memory atomics added them in the order the warps came), and no atomics.
  // colsum(dT * Ag) by quarter of the rows, z's by warp (its eight rows).
  __shared__ float col_dbeta_parts[kThreads / kC][kC], col_z_parts[kThreads / 32][kC];
  __shared__ float key_scales[kRaw ? kC : 1], query_scales[kRaw ? kC : 1];
  __shared__ uint64_t slice_in[kMaxFactorStages];  // kFactors: stage i's TMA bytes arrived, a phase a use
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t hc = p.chunk_ready ? reverse_pass_chunk(p.order, blockIdx.x) : blockIdx.x, cc = hc * kC * kC;
  const RowPieces pieces = row_pieces(p.K);
  // Ag and dT by cp.async: copied through registers instead, each thread's next load would wait
  // behind its own shared store (a generic store may alias the next load for the compiler).
  const RowPieces square = row_pieces(kC);
  copy_async(A, kLd, p.Ag + cc, kC, kC, square);
  if constexpr (!kFactors) copy_async(D, kLd, p.dT + cc, kC, kC, square);
  cp_async_commit();
  // In flight while the WY terms are computed (kRaw: bf16 rows as K / 2 floats); with kFactors
  // after the element-wise pass, in dP's place.
  if constexpr (kRaw && !kFactors) {
    copy_async(Ks, raw_row_bytes(p.K) / 4, reinterpret_cast<const float*>(p.k_raw + hc * kC * p.K), p.K / 2, kC,
               row_pieces(p.K / 2));
    cp_async_commit();
  } else if constexpr (kProducts && !kRaw) {
    copy_async(Ks, ldq, p.k + hc * kC * p.K, p.K, kC, pieces);
    cp_async_commit();
  }
  // The element-wise pass's operands, read after the two products (no shared memory left for
  // them): into L2 meanwhile (-26 us at K = 128, -3 at the OLMo shape; twenty-seventh session).
  // With kFactors once the factors are in, whose stream would evict them first, and the raw rows
  // that come after the pass with them.
  constexpr uint32_t kSquareBytes = kC * kC * sizeof(float);
  if (tid == 0 && !kFactors)
    prefetch_l2(p.dP + cc, kSquareBytes), prefetch_l2(p.QKG + cc, kSquareBytes), prefetch_l2(p.KKG + cc, kSquareBytes);
  if (tid < kC) {
    gcs[tid] = p.gc[hc * kC + tid], betas[tid] = p.beta[hc * kC + tid];
    if constexpr (kRaw) key_scales[tid] = p.k_scale[hc * kC + tid], query_scales[tid] = p.q_scale[hc * kC + tid];
  }
  if constexpr (kFactors) {
    if (p.chunk_ready && tid == 0) wait_for_chunk(p.chunk_ready + hc, p.ready_count);  // dV' out
    // The stages in M's, dT's and dP's places (3 x 17 KB), from the first 1024-byte boundary.
    factor_products<kKept16, kLeavesDP>(maps, p.V, hc, swizzle_aligned(M), slice_in, warp < 4 && !kLeavesDP ? Ps : D);
    if (tid == 0) {
      const uint32_t row_bytes = static_cast<uint32_t>(sizeof(uint16_t) * kC * p.K);
      if (!kLeavesDP) prefetch_l2(p.QKG + cc, kSquareBytes);
      prefetch_l2(p.KKG + cc, kSquareBytes);
      if (!p.split_out)
        prefetch_l2(p.k_raw + hc * kC * p.K, row_bytes), prefetch_l2(p.q_raw + hc * kC * p.K, row_bytes);
    }
  }
  if constexpr (kProducts && !kFactors) cp_async_wait<1>();  // Ag and dT; the keys may still be in flight
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
    col_dbeta_parts[tid / kC][j] = s;
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
  // before the loop (between them its shared stores would hold each load back); with kLeavesDP
  // those of dT's side alone (dLg's), dP's to the finish kernel.
  const int i = tid / 4, j0 = 16 * (tid % 4);
  const float beta_i = betas[i], gc_i = gcs[i];
  float row_sum_dbeta = 0.f, row_sum_z = 0.f;
  float4 dps[4] = {}, qkgs[4] = {}, kkgs[4];  // (kLeavesDP: dP's and QKG's zeros, not read)
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const int64_t at = cc + i * kC + j0 + 4 * b;
    if constexpr (!kLeavesDP) {
      dps[b] = kFactors ? ld4(Ps + i * kLd + j0 + 4 * b) : ld4(p.dP + at);
      qkgs[b] = ld4(p.QKG + at);
    }
    kkgs[b] = ld4(p.KKG + at);
  }
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const int jb = j0 + 4 * b;
    const int64_t at = cc + i * kC + jb;
    const float4 dp4 = dps[b], qkg4 = qkgs[b], kkg4 = kkgs[b];
    const float dp[4] = {dp4.x, dp4.y, dp4.z, dp4.w}, qkg[4] = {qkg4.x, qkg4.y, qkg4.z, qkg4.w},
                kkg[4] = {kkg4.x, kkg4.y, kkg4.z, kkg4.w};
    float dqk[4] = {}, dkk[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = jb + e;
      const float dl = D[i * kLd + j];  // 0 unless j < i
      // The gates' exponents are at most 0 (gc falls along the chunk): the fast exp's error is
      // relative, about 1e-6 at the exponents where the result is not already below 1e-30. One
      // exponential an element: exp(gc_i - gc_j) on and below the diagonal, exp(gc_j - gc_i) above.
      const float decay = __expf(j <= i ? gc_i - gcs[j] : gcs[j] - gc_i);
      const float gate = j <= i ? decay : 0.f;
      // D_ij below the diagonal, D_ji above it.
      dkk[e] = j < i ? dl * beta_i * gate : j > i ? D[j * kLd + i] * betas[j] * decay : 0.f;
      row_sum_dbeta += dl * kkg[e];
      float z = j < i ? dl * beta_i * kkg[e] : 0.f;
      if constexpr (!kLeavesDP) {
        dqk[e] = p.scale * dp[e] * gate;
        z = p.scale * dp[e] * qkg[e] + z;
      }
      row_sum_z += z;
      // Column sums: the warp's eight rows of column j sit in lanes 4 apart, added by shuffles
      // into the warp's part.
      float col = z;
#pragma unroll
      for (int o = 4; o < 32; o *= 2) col += __shfl_xor_sync(0xffffffffu, col, o);
      if (lane < 4) col_z_parts[warp][j] = col;
    }
    if constexpr (kRaw) {  // S and R, split (Ag and M are read by now)
      const float sq_i = query_scales[i], sk_i = key_scales[i];
      float S[4], R[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float sk_j = key_scales[jb + e];
        S[e] = sq_i * dqk[e] * sk_j, R[e] = sk_i * dkk[e] * sk_j;
      }
      if constexpr (!kLeavesDP) store_split4(reinterpret_cast<char*>(A), i, jb, S);
      store_split4(reinterpret_cast<char*>(M), i, jb, R);
    } else if constexpr (kProducts) {  // Ag and M are read by now (the last product's barrier)
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
    float col_dbeta = 0.f, col_z = 0.f;
#pragma unroll
    for (int q = 0; q < kThreads / kC; ++q) col_dbeta += col_dbeta_parts[q][tid];
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) col_z += col_z_parts[w][tid];
    p.dbeta[hc * kC + tid] = row_dbeta[tid] + col_dbeta;
    p.dgc[hc * kC + tid] = row_z[tid] - col_z;
  }
  if (kFactors && p.split_out) {  // S and R (kLeavesDP: R alone) out as they stand in shared memory: 16 KiB each
    constexpr int kMatrices = kLeavesDP ? 1 : 2, kSplitFloats = kC * kC;  // a matrix's floats
    constexpr int kPieces = kMatrices * kSplitFloats / 4;                 // float4 pieces
    float* out = p.split_out + kMatrices * hc * kSplitFloats;
    for (int f = tid; f < kPieces; f += kThreads) {
      const int m = f / (kSplitFloats / 4), at = 4 * f - m * kSplitFloats;
      *reinterpret_cast<float4*>(out + m * kSplitFloats + at) = ld4((m || kLeavesDP ? M : A) + at);
    }
    return;
  }
  if constexpr (kRaw) {
    if constexpr (kFactors) {  // dP is read: the keys take its place
      copy_async(Ks, raw_row_bytes(p.K) / 4, reinterpret_cast<const float*>(p.k_raw + hc * kC * p.K), p.K / 2, kC,
                 row_pieces(p.K / 2));
      cp_async_commit();
    }
    copy_async(Qs, raw_row_bytes(p.K) / 4, reinterpret_cast<const float*>(p.q_raw + hc * kC * p.K), p.K / 2, kC,
               row_pieces(p.K / 2));
    cp_async_commit();
    if constexpr (kFactors) {
      cp_async_wait<1>();
      __syncthreads();
    }
    const int raw_bytes = raw_row_bytes(p.K);
    auto split = [](const void* at) { return SplitOperand{shared_address(at), 256, 128, true}; };
    const RawOperands x{split(A), split(M), SplitOperand{shared_address(Qs), raw_bytes, 0},
                        SplitOperand{shared_address(Ks), raw_bytes, 0}};
    raw_gradient<false>(x, query_scales, r0, warp, lane, p.dq + hc * kC * p.K, p.K);
    cp_async_wait_all();
    __syncthreads();
    raw_gradient<true>(x, key_scales, r0, warp, lane, p.dk + hc * kC * p.K, p.K);
  } else if constexpr (kProducts) {
    copy_async(Qs, ldq, p.q + hc * kC * p.K, p.K, kC, pieces);
    cp_async_commit();
    gradient<kPrecise, false>(A, M, Qs, Ks, ldq, r0, warp, g, t, p.dq + hc * kC * p.K, p.K);
    cp_async_wait_all();
    __syncthreads();
    gradient<kPrecise, true>(A, M, Qs, Ks, ldq, r0, warp, g, t, p.dk + hc * kC * p.K, p.K);
  }
}

// Beside the reverse pass: returns once every one of the pass's blocks has started (so that the
// kernel after this one takes only SMs no pass block waits for), and with `all` once every chunk
// is done (for the paths that read dV' whole).
__global__ void wait_for_pass_kernel(const int* counters, int64_t chunks, int count, int blocks, bool all) {
  if (threadIdx.x == 0) wait_for_chunk(counters + chunks, blocks);
  if (all)
    for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) wait_for_chunk(counters + i, count);
}

template <bool kProducts, bool kPrecise, bool kRaw = false, bool kFactors = false, bool kKept16 = false,
          bool kLeavesDP = false>
void launch(const Params& p, int64_t chunks, const FactorMaps& maps = {}) {
  const size_t shared = shared_bytes(kProducts, p.K, kRaw, kFactors);
  auto* kernel = wy_backward_kernel<kProducts, kPrecise, kRaw, kFactors, kKept16, kLeavesDP>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  kernel<<<static_cast<unsigned>(chunks), kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(p, maps);
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

// Whether raw rows can stand in for q and k here: bf16 [H, NC, C, K] rows and float32 [H, NC, C]
// scales, contiguous and 16-byte aligned (cp.async's pieces).
bool raw_rows_fit(const RawRows& raw, int64_t H, int64_t NC, int64_t K) {
  auto fits = [&](const at::Tensor& x, at::ScalarType dtype, int64_t last) {
    return x.defined() && x.is_cuda() && x.scalar_type() == dtype && x.is_contiguous() &&
           x.numel() == H * NC * kC * last && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  };
  return fits(raw.queries, at::kBFloat16, K) && fits(raw.keys, at::kBFloat16, K) &&
         fits(raw.query_scale, at::kFloat, 1) && fits(raw.scale, at::kFloat, 1);
}

// kFactors' operands: [H, NC, C, V] alike, contiguous, 16-byte aligned, rows a multiple of 16 bytes
// (TMA's row stride); float32, or (kept16) all four bf16; anything else takes
// the batched products. Below a slice (V < 16) the one slice's boxes are wider than the
// tensor and load zeros past V (tested at V = 12, float32).
bool factors_fit(const WyFactors& f, int64_t H, int64_t NC, bool kept16) {
  const int64_t V = f.dO.size(-1);
  for (const at::Tensor* x : {&f.dO, &f.vnew, &f.dvnew, &f.W})
    if (x->scalar_type() != (kept16 ? at::kBFloat16 : at::kFloat) || !x->is_contiguous() ||
        x->dim() != 4 || x->size(0) != H || x->size(1) != NC || x->size(2) != kC || x->size(3) != V ||
        reinterpret_cast<uintptr_t>(x->data_ptr()) % 16)
      return false;
  return V % (kept16 ? 8 : 4) == 0 && H * NC * kC < (int64_t{1} << 31);
}

}  // namespace

WyGrads wy_backward_cuda(const ChunkTerms& c, const WyFactors& given, const at::Tensor& beta_in, double scale,
                         const at::Tensor& q_in, const at::Tensor& k_in, bool tf32, const RawRows* raw,
                         bool leave_products) {
  const c10::cuda::CUDAGuard guard(c.QKG.device());
  const int64_t H = c.QKG.size(0), NC = c.QKG.size(1), C = c.QKG.size(2), K = k_in.size(3);
  TORCH_CHECK(C == kC && c.QKG.size(3) == kC && H * NC < (int64_t{1} << 31), "wy_backward_cuda: needs chunk 64");
  // The raw rows where the TF32 products take them (K a multiple of 16 up to 128: the raw queries
  // fit dLg's place): q and k are not read then, and may be stand-ins (rows_stand_in).
  const bool use_raw = tf32 && K % 16 == 0 && K <= 128 && raw && raw_rows_fit(*raw, H, NC, K) &&
                       products_fit(static_cast<int>(K));
  // On that path the kernel forms dT and dP from their factors where TMA can load them: float32,
  // or all four bf16 (V', dV' and W the state passes' kept copies, dO o's bf16 gradient; float32
  // elsewhere).
  const bool kept16 = use_raw && factors_fit(given, H, NC, true);
  // dV' from a pass beside this: chunk by chunk in the bf16 factor kernel, else once the pass is
  // done (before anything reads it).
  const ChunksFromPass& from_pass = given.from_pass;
  const bool streamed = from_pass.count > 0 && kept16 && H * NC > 0;
  if (from_pass.count > 0) {
    TORCH_CHECK(from_pass.counters.scalar_type() == at::kInt && from_pass.counters.numel() == H * NC + 1 &&
                    from_pass.sequences >= 1 && NC % from_pass.sequences == 0,
                "wy_backward_cuda: chunks from a pass need int32 [H NC + 1] counters and equal sequences");
    wait_for_pass_kernel<<<1, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        from_pass.counters.data_ptr<int>(), H * NC, from_pass.count, static_cast<int>(from_pass.pass_blocks),
        !streamed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const WyFactors f = kept16 ? given : factors_in(given, at::kFloat);
  const bool factors = kept16 || (use_raw && factors_fit(f, H, NC, false));
  const at::Tensor dT = factors ? at::Tensor() : chunk_matmul(f.dvnew, mT(f.W), tf32).contiguous(),
                   dP = factors ? at::Tensor() : chunk_matmul(f.dO, mT(f.vnew), tf32).contiguous();
  const at::Tensor Ag = c.Ag.contiguous(), KKG = c.KKG.contiguous(), QKG = c.QKG.contiguous(),
                   gc = c.gc.contiguous(), beta = beta_in.contiguous(),
                   q = use_raw ? at::Tensor() : q_in.contiguous(), k = use_raw ? at::Tensor() : k_in.contiguous();
  for (const at::Tensor* x : {&dT, &dP, &Ag, &KKG, &QKG, &gc, &beta, &q, &k})
    TORCH_CHECK(!x->defined() || x->scalar_type() == at::kFloat, "wy_backward_cuda: float32 inputs");
  // The products here where the tiles fit (cp.async's 16-byte pieces, column halves of 8) and two
  // blocks an SM still do.
  const bool products = use_raw || (K % 16 == 0 && K <= 256 && reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 &&
                                    reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0 &&
                                    products_fit(static_cast<int>(K)));

  WyGrads w;
  w.dbeta = at::empty_like(gc), w.dgc = at::empty_like(gc);
  at::Tensor dQK, dKK;
  const bool split_out = factors && leave_products;
  // From bf16 factors the finish kernel forms dP, S and dP's share of dgc itself where its instance
  // for that fits (it streams dO and V' anyway): R alone comes out, and dgc without that share.
  const bool leaves_dP = split_out && kept16 && finish_forms_wy_dp(K, f.dO.size(-1));
  if (split_out) w.split = at::empty({H, NC, leaves_dP ? 1 : 2, C, C}, gc.options());
  else if (products) w.dq = at::empty(k_in.sizes(), gc.options()), w.dk = at::empty(k_in.sizes(), gc.options());
  else dQK = at::empty_like(QKG), dKK = at::empty_like(QKG);
  if (H * NC == 0) {
    if (!products) w.dq = at::zeros_like(q), w.dk = at::zeros_like(k);
    return w;
  }
  auto data = [](const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; };
  Params p{data(dT),   data(dP), data(Ag), data(KKG),  data(QKG),     data(gc),    data(beta), data(q),
           data(k),    nullptr,  nullptr,  nullptr,    nullptr,    data(dQK),     data(dKK),  data(w.dq),
           data(w.dk), data(w.dbeta), data(w.dgc), static_cast<int>(K), static_cast<float>(scale)};
  if (use_raw) {
    p.q_raw = reinterpret_cast<const uint16_t*>(raw->queries.data_ptr<at::BFloat16>());
    p.k_raw = reinterpret_cast<const uint16_t*>(raw->keys.data_ptr<at::BFloat16>());
    p.q_scale = raw->query_scale.data_ptr<float>(), p.k_scale = raw->scale.data_ptr<float>();
  }
  if (!products) {
    launch<false, true>(p, H * NC);
    w.dq = chunk_matmul(dQK, k, tf32);
    w.dk = chunk_matmul(dKK, k, tf32, 1, chunk_matmul(dQK.mT(), q, tf32));
  } else if (factors) {
    const int64_t V = f.dO.size(-1);
    p.V = static_cast<int>(V), p.split_out = data(w.split);
    auto map = [&](const at::Tensor& x) {
      if (x.scalar_type() == at::kBFloat16)  // 32-byte rows of a slice's values
        return bf16_tensor_map(x.data_ptr(), H * NC * kC, V, kFactorSlice, kC, CU_TENSOR_MAP_SWIZZLE_32B,
                               "wy_backward_cuda");
      return float_tensor_map(x.data_ptr<float>(), H * NC * kC, V, kFactorSlice, kC, CU_TENSOR_MAP_SWIZZLE_64B,
                              "wy_backward_cuda");
    };
    const FactorMaps maps{map(f.dO), map(f.vnew), map(f.dvnew), map(f.W)};
    if (streamed) {
      p.chunk_ready = from_pass.counters.data_ptr<int>(), p.ready_count = from_pass.count;
      p.order = {static_cast<int>(H), static_cast<int>(NC), static_cast<int>(from_pass.sequences),
                 static_cast<int>(from_pass.early_pairs)};
    }
    if (leaves_dP) launch<true, false, true, true, true, true>(p, H * NC, maps);
    else if (kept16) launch<true, false, true, true, true>(p, H * NC, maps);
    else launch<true, false, true, true>(p, H * NC, maps);
  } else if (use_raw) {
    launch<true, false, true>(p, H * NC);
  } else if (tf32) {
    launch<true, false>(p, H * NC);
  } else {
    launch<true, true>(p, H * NC);
  }
  return w;
}

}  // namespace hybrid::ops::detail
