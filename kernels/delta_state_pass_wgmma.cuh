// The state pass (delta_state_pass_kernel.cuh's step) on warpgroup products (wgmma), for raw keys
// at K = 128 and 64-column value tiles: the backward's reverse pass with `extra` formed from the
// queries (Queries::kExtra) and the forward with the whole output (kWholeOutput). For each chunk,
// with S the K x 64 float32 state tile:
//   before = S;  X = diag(a) K S + add;  Y = M X;  S = last S + K^T diag(b) Y (+ q^T D)
//   forward: o = s QKG Y + diag(e) q S (S entering the chunk)    reverse: D = diag(e) dO
// The products as the mma.sync pass forms them (bf16_split.cuh): S, X and diag(b) Y split into hi
// and lo bf16 planes (16 significant bits), K and q exact in bf16, M and QKG split (their split
// rows): K S and K^T (b Y) two products, M X three, q^T D two; the output's q S on S's hi plane and
// QKG Y on Y rounded to bf16, as there. Float32 accumulators throughout.
//
// Why: on mma.sync a step is set by its instruction count (kernel notes, step 21), where wgmma
// issues a 64 x N x 16 product for a warpgroup in one instruction with both operands read from
// shared memory; scripts/gpu/wgmma_pass_bench.cu measured this step at 583 us against 840 for the
// mma.sync pass (B8 T4096 H16 K128 V128, kernel notes step 34). This kernel is not there yet
// (kernel notes step 35: 1,010 and 880 us against 852 and 866), so it runs only where asked
// (StatePassInputs::use_wgmma, HYBRID_WGMMA_PASS=1).
//
// Block: 384 threads, one block an SM (the 64-column tile's place in value_tile). Warpgroups 0 and
// 1 compute: warpgroup w holds rows 64 w .. 64 w + 63 of S as an m64n64 accumulator (32 floats a
// thread) and forms columns 32 w .. 32 w + 31 of X, Y (and o, D) as m64n32, so that Y = M X waits
// only on its own X (a barrier of its 128 threads), while K S and the update read both halves of
// S and diag(b) Y (barriers of both, named barrier 1). Warpgroup 2's first thread issues every
// copy: TMA boxes of the keys, queries, M and QKG and bulk copies of a, b and e, each buffer on a
// full mbarrier (bytes) and an empty one (an arrival from each computing warp once done with it);
// the keys (with a, b, e) double-buffered, the others single (each is read in one stage and
// refilled after it, a stage or more before it is read again). `add` and dO come from global
// memory into registers a step ahead (issued after the Y stage before), which the producer
// prefetches into L2 two steps before that.
//
// Shared memory: the keys and queries in boxes of 64 rows x 64 keys with TMA's 128-byte swizzle
// (A = K K-major for K S; the update's A = K^T MN-major on the same bytes, one swizzle atom wide).
// M and QKG arrive as the split rows (256-byte rows, unit u at u ^ (r % 8)): each plane's 128 bytes
// of a row, in one 64 x 64 box, are rows of that swizzle already. The planes of S, X, diag(b) Y, D
// and Y's bf16 as 8 x 8 core matrices without swizzle, [k/8][n/8][k%8][n%8] (B, MN-major: LBO
// 16 n_total, SBO 128), as the probe found. The kept intermediates go out by bulk tensor stores
// from boxes of 32 columns (128-byte swizzle), each warpgroup's thread 0 storing its rows of
// `before` and its columns of X after its X barrier, its columns of Y after the diag(b) Y barrier,
// their reads waited for before the step's last barrier. About 226 KB (QKG's 16 unused in reverse).
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "bf16_split.cuh"
#include "chunk_tokens.cuh"
#include "cp_async.cuh"
#include "delta_state_pass_kernel.cuh"
#include "vector_access.cuh"
#include "wgmma.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kWgK = 128, kWgBV = 64, kWgThreads = 384;
constexpr uint32_t kKeysBytes = 2 * kC * kWgK, kPlaneBytes = 2 * kC * kC, kFactorBytes = sizeof(float) * kC;

// The maps of the TMA copies: keys and queries as bf16 [H NC C, K] in boxes of 64 x 64 with the
// 128-byte swizzle; M and QKG's split rows as bf16 [H NC C, 2 C] in boxes of 64 x 64 (a plane's
// half of the rows, swizzled already); before, X and Y as float32 [H NC K, V] and [H NC C, V] in
// boxes of 32 columns with the 128-byte swizzle.
struct WgmmaPassMaps {
  CUtensorMap keys, queries, M, QKG;
  StoreMaps stores;
};

struct WgmmaPassShared {
  alignas(1024) uint16_t M[2][kC * kC];    // hi, lo: 128-byte swizzled rows
  alignas(1024) uint16_t QKG[2][kC * kC];  // forward
  alignas(1024) uint16_t keys[2][kC * kWgK];  // two boxes of 64 rows x 64 keys, 128-byte swizzled
  alignas(1024) uint16_t queries[kC * kWgK];
  alignas(128) uint16_t S[2][kWgK * kWgBV];  // hi, lo planes
  alignas(128) uint16_t X[2][kC * kWgBV];
  alignas(128) uint16_t bY[2][kC * kWgBV];   // diag(b) Y
  alignas(128) uint16_t D_or_Y[2][kC * kWgBV];  // reverse: D's planes; forward: Y in bf16 (the first)
  alignas(1024) float box_before[kWgK * kWgBV];  // [BV / 32][rows][32], 128-byte swizzled
  alignas(1024) float box_X[kC * kWgBV];
  alignas(1024) float box_Y[kC * kWgBV];
  float rows[2][3][kC];  // a, b, e with each buffer of keys
  uint64_t full_keys[2], empty_keys[2], full_queries, empty_queries, full_M, empty_M, full_QKG, empty_QKG;
};
// Dynamic shared memory: the struct and room to align it to 1024 bytes.
constexpr size_t kWgmmaPassShared = sizeof(WgmmaPassShared) + 1024;
static_assert(kWgmmaPassShared <= 227 * 1024, "the wgmma pass's shared memory");

__device__ __forceinline__ uint64_t core_descriptor(const void* p, uint32_t lbo, uint32_t sbo) {
  return wgmma_descriptor(shared_address(p), lbo, sbo);
}
// Operands in boxes of 64 rows x 64 bf16 (128-byte rows, 128-byte swizzle, 1024-byte aligned),
// boxes of further columns 8 KB on: K-major A (m the rows; M, QKG, the keys in K S), its k-step ks
// of 16 columns 8192 (ks / 4) + 32 (ks % 4) bytes on; and MN-major A (m the columns: the keys' K^T),
// rows 64 m0 .. of the transposed, its k-step ks of 16 rows 2048 ks bytes on. The latter's m64 is
// one 128-byte swizzle atom wide, so only the stride between its 8-row groups (1024) matters: it is
// given as both offsets.
__device__ __forceinline__ uint64_t k_major_descriptor(const uint16_t* boxes) {
  return swizzled_rows_descriptor(boxes, 128, 0, 0);
}
__device__ __forceinline__ uint64_t transposed_descriptor(const uint16_t* boxes, int m0) {
  return wgmma_descriptor(shared_address(boxes) + 8192 * m0, 1024, 1024, 1);
}
// A descriptor moved `bytes` further in shared memory (its address field holds addresses / 16 and
// cannot carry at these offsets): each product's from a loop-invariant base plus a constant.
__device__ __forceinline__ uint64_t descriptor_plus(uint64_t d, uint32_t bytes) { return d + (bytes >> 4); }
// Float (r, c) of a box of 32-column boxes with the 128-byte swizzle, `rows` rows each.
__device__ __forceinline__ int swizzled_box_index(int rows, int r, int c) {
  return (c / 32) * rows * 32 + r * 32 + ((((c % 32) / 4) ^ (r % 8)) * 4) + c % 4;
}
// The pair (k, n), (k, n + 1) into a pair of planes (hi, then lo plane_bytes on) in core layout of
// 64 columns; split, or rounded into the first plane alone.
__device__ __forceinline__ void store_core_pair(uint16_t* planes, uint32_t plane_bytes, int k, int n, float x0,
                                                float x1, bool split = true) {
  char* at = reinterpret_cast<char*>(planes) + core_offset(k, n, kWgBV);
  if (!split) {
    *reinterpret_cast<uint32_t*>(at) = bf16x2(x0, x1);
    return;
  }
  const SplitPair s = split_pair(x0, x1);
  *reinterpret_cast<uint32_t*>(at) = s.hi;
  *reinterpret_cast<uint32_t*>(at + plane_bytes) = s.lo;
}

template <Queries kQ>
__global__ void __launch_bounds__(kWgThreads, 1)
    state_pass_wgmma_kernel(const Params p, const __grid_constant__ WgmmaPassMaps maps) {
  static_assert(kQ == Queries::kWholeOutput || kQ == Queries::kExtra, "the forward with o, or the reverse with extra");
  constexpr bool kForward = kQ == Queries::kWholeOutput;
  constexpr int K = kWgK, BV = kWgBV;
  constexpr uint32_t kSPlane = 2 * K * BV, kXPlane = 2 * kC * BV;
  extern __shared__ __align__(1024) char smem_raw[];
  WgmmaPassShared& sh = *reinterpret_cast<WgmmaPassShared*>(
      smem_raw + (1024 - shared_address(smem_raw) % 1024) % 1024);
  // The warpgroup by a shuffle from lane 0: the compiler then knows it warp-uniform, and keeps the
  // descriptors made from it in uniform registers (not rebuilt and moved over before every product).
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0), warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32,
            g = lane / 4;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z, V = p.V;
  const int64_t begin = p.chunk_offsets[n], n_chunks = p.chunk_offsets[n + 1] - begin;
  auto chunk = [&](int64_t step) {
    return static_cast<int64_t>(h) * p.NC + (p.reverse ? begin + n_chunks - 1 - step : begin + step);
  };
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) mbarrier_init(&sh.full_keys[i], 1), mbarrier_init(&sh.empty_keys[i], 8);
    mbarrier_init(&sh.full_queries, 1), mbarrier_init(&sh.full_M, 1), mbarrier_init(&sh.full_QKG, 1);
    mbarrier_init(&sh.empty_queries, 8), mbarrier_init(&sh.empty_M, 8), mbarrier_init(&sh.empty_QKG, 8);
  }
  __syncthreads();

  if (wg == 2) {  // the producer: its first thread, a chunk ahead (the keys two)
    if (threadIdx.x != 256) return;
    auto rows_of = [&](const CUtensorMap& map, uint16_t* dst, int64_t hc, uint64_t* bar) {
#pragma unroll
      for (int i = 0; i < K / 64; ++i) bulk_load_2d(dst + i * 64 * kC, &map, 64 * i, static_cast<int>(hc * kC), bar);
    };
    auto planes_of = [&](const CUtensorMap& map, uint16_t (&dst)[2][kC * kC], int64_t hc, uint64_t* bar) {
      mbarrier_arrive_expect_bytes(bar, kPlaneBytes * 2);
      for (int plane = 0; plane < 2; ++plane) bulk_load_2d(dst[plane], &map, kC * plane, static_cast<int>(hc * kC), bar);
    };
    auto load_keys = [&](int64_t step) {
      const int b = step % 2;
      const int64_t hc = chunk(step);
      uint64_t* bar = &sh.full_keys[b];
      mbarrier_arrive_expect_bytes(bar, kKeysBytes + 3 * kFactorBytes);
      rows_of(maps.keys, sh.keys[b], hc, bar);
      bulk_copy(sh.rows[b][0], p.a + hc * kC, kFactorBytes, bar);
      bulk_copy(sh.rows[b][1], p.b + hc * kC, kFactorBytes, bar);
      bulk_copy(sh.rows[b][2], p.q_factor + hc * kC, kFactorBytes, bar);
    };
    auto load_queries = [&](int64_t step) {
      mbarrier_arrive_expect_bytes(&sh.full_queries, kKeysBytes);
      rows_of(maps.queries, sh.queries, chunk(step), &sh.full_queries);
    };
    // `add` (and dO) into L2 a step ahead of the computing warps' loads of them.
    auto prefetch_rows = [&](int64_t step) {
      const int64_t hc = chunk(step);
      if (p.add_tokens) {
        int64_t run[2];
        fetch_run(p, hc - static_cast<int64_t>(h) * p.NC, run, true);
        for (int r = 0; r < run[1]; ++r)
          prefetch_l2(p.add_tokens + (run[0] + r) * p.add_token + h * p.add_head + v0, 2 * BV);
      } else {
        prefetch_l2(p.add + hc * kC * V, sizeof(float) * kC * V);
      }
      if constexpr (!kForward) prefetch_l2(p.dO + hc * kC * V, sizeof(float) * kC * V);
    };
    for (int64_t step = 1; step < n_chunks && step < 3; ++step) prefetch_rows(step);
    for (int64_t step = 0; step < n_chunks && step < 2; ++step) load_keys(step);
    if (n_chunks > 0) {
      load_queries(0);
      planes_of(maps.M, sh.M, chunk(0), &sh.full_M);
      if constexpr (kForward) planes_of(maps.QKG, sh.QKG, chunk(0), &sh.full_QKG);
    }
    // Each buffer refilled once step's computing warps are done with it, in the order they free them.
    for (int64_t step = 0; step + 1 < n_chunks; ++step) {
      const uint32_t parity = step & 1;
      if (step + 3 < n_chunks) prefetch_rows(step + 3);
      if constexpr (kForward) mbarrier_wait(&sh.empty_queries, parity), load_queries(step + 1);
      mbarrier_wait(&sh.empty_M, parity);
      planes_of(maps.M, sh.M, chunk(step + 1), &sh.full_M);
      if constexpr (!kForward) mbarrier_wait(&sh.empty_queries, parity), load_queries(step + 1);
      if constexpr (kForward) {
        mbarrier_wait(&sh.empty_QKG, parity);
        planes_of(maps.QKG, sh.QKG, chunk(step + 1), &sh.full_QKG);
      }
      if (step + 2 < n_chunks) {
        mbarrier_wait(&sh.empty_keys[step % 2], (step / 2) & 1);
        load_keys(step + 2);
      }
    }
    return;
  }

  auto pairs = [&](auto& d, int row0, int col0, auto f) { for_each_accumulator_pair(d, row0, col0, lane, f); };
  // This warp done with a buffer: an arrival once all its lanes' reads are in.
  auto release = [&](uint64_t* bar) {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(bar);
  };
  const int srow = 64 * wg + 16 * warp, xrow = 16 * warp, xcol = 32 * wg;

  float S[8][4];
  const int64_t state_base = (static_cast<int64_t>(n) * p.H + h) * K * V + v0;
  pairs(S, srow, 0, [&](int, int, int r, int c, float& s0, float& s1) {
    const float2 s = ld2(p.init + state_base + static_cast<int64_t>(r) * V + c);
    s0 = s.x, s1 = s.y;
    store_core_pair(sh.S[0], kSPlane, r, c, s0, s1);
  });
  fence_async_shared();
  named_barrier(1, 256);

  // Thread 128 w issues warpgroup w's bulk stores: rows 64 w .. of `before`, its columns' boxes of X and Y.
  const bool issues_stores = threadIdx.x % 128 == 0;
  // A step's global loads, issued a step ahead (after the Y stage before it) and used in its X stage:
  // this thread's pairs of `add` as raw words (bf16 pairs from the tokens in the first word of a
  // pair, zero past the chunk's run; float32 in both) and, reversed, of dO. Their uses waited on the
  // loads where they were issued at the step's top (a DRAM latency a step; kernel notes step 35).
  int64_t run[2] = {0, kC};  // the chunk's run (first token, tokens) with V from the tokens
  // In a layout of rows the runs step along the rows from the first chunk's (one division, where
  // token_of ran twice a step: about a tenth of a step's instructions, kernel notes step 35).
  const int64_t chunks_per_row = p.token_rows.chunks_per_row, first_chunk = n_chunks > 0 ? chunk(0) - h * p.NC : 0;
  Token next_token = p.add_tokens && !p.add_runs && n_chunks > 0
                         ? Token{first_chunk / chunks_per_row, first_chunk % chunks_per_row * kC}
                         : Token{0, 0};
  uint32_t add_words[4][4];
  float dO[4][4];
  const int row = xrow + g, col0 = v0 + xcol + 2 * (lane % 4);  // this thread's first pair's row and column
  auto load_rows = [&](int64_t hc) {
    if (p.add_runs) {
      run[0] = p.add_runs[2 * (hc - h * p.NC)], run[1] = p.add_runs[2 * (hc - h * p.NC) + 1];
    } else if (p.add_tokens) {
      const Token& at = next_token;
      run[0] = at.b * p.token_rows.T + at.t;
      run[1] = at.t >= p.token_rows.T ? 0 : min(static_cast<int64_t>(kC), p.token_rows.T - at.t);
      next_token.t += kC;  // the next chunk: further along this row, or the next row's first
      if (next_token.t >= p.token_rows.chunks_per_row * kC) next_token.t = 0, ++next_token.b;
    }
    const uint16_t* token_row = p.add_tokens ? p.add_tokens + (run[0] + row) * p.add_token + h * p.add_head + col0 : nullptr;
    const float* add_row = p.add_tokens ? nullptr : p.add + (hc * kC + row) * V + col0;
    const float* dO_row = kForward ? nullptr : p.dO + (hc * kC + row) * V + col0;
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (p.add_tokens) {
          add_words[j][2 * half] = row + 8 * half < run[1] ? *reinterpret_cast<const uint32_t*>(
                                                                 token_row + 8 * half * p.add_token + 8 * j)
                                                           : 0u;
        } else {
          const uint2 v = *reinterpret_cast<const uint2*>(add_row + 8 * half * V + 8 * j);
          add_words[j][2 * half] = v.x, add_words[j][2 * half + 1] = v.y;
        }
        if constexpr (!kForward) {
          const float2 d = ld2(dO_row + 8 * half * V + 8 * j);
          dO[j][2 * half] = d.x, dO[j][2 * half + 1] = d.y;
        }
      }
  };
  // The operands' descriptors at their fixed places (the keys' two buffers, K-major and transposed).
  const uint64_t keys_desc[2] = {k_major_descriptor(sh.keys[0]), k_major_descriptor(sh.keys[1])};
  const uint64_t keys_t_desc[2] = {transposed_descriptor(sh.keys[0], wg), transposed_descriptor(sh.keys[1], wg)};
  const uint64_t queries_desc = kForward ? k_major_descriptor(sh.queries) : transposed_descriptor(sh.queries, wg);
  const uint64_t S_desc = core_descriptor(reinterpret_cast<const char*>(sh.S[0]) + 128 * (xcol / 8), 1024, 128);
  const uint64_t X_desc = core_descriptor(reinterpret_cast<const char*>(sh.X[0]) + 128 * (xcol / 8), 1024, 128);
  const uint64_t bY_desc = core_descriptor(sh.bY[0], 1024, 128), D_desc = core_descriptor(sh.D_or_Y[0], 1024, 128);
  const uint64_t Y_desc = core_descriptor(reinterpret_cast<const char*>(sh.D_or_Y[0]) + 128 * (xcol / 8), 1024, 128);
  const uint64_t M_desc = k_major_descriptor(sh.M[0]), QKG_desc = k_major_descriptor(sh.QKG[0]);
  if (n_chunks > 0) load_rows(chunk(0));
  for (int64_t step = 0; step < n_chunks; ++step) {
    const int b = step % 2;
    const uint32_t parity = step & 1;
    const int64_t hc = chunk(step), c = hc - static_cast<int64_t>(h) * p.NC;
    const float *a = sh.rows[b][0], *bs = sh.rows[b][1], *e = sh.rows[b][2];
    float x[4][4];
    const float last = p.last[hc];
    // Forward: where this thread's two rows of o go (null: padding), in the tokens or the chunk layout.
    char* o_row[2] = {nullptr, nullptr};
    if constexpr (kForward) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = row + 8 * half;
        int64_t at = -1;
        if (!p.o_tokens) {
          o_row[half] = reinterpret_cast<char*>(p.O + (hc * kC + r) * V + v0);
          continue;
        }
        if (p.add_tokens) {
          if (r < run[1]) at = ((run[0] + r) * p.H + h) * V + v0;
        } else {
          const Token tok = token_of(p.token_rows, c * kC + r);
          if (tok.b >= 0) at = ((tok.b * p.token_rows.T + tok.t) * p.H + h) * V + v0;
        }
        if (at >= 0) o_row[half] = static_cast<char*>(p.o_tokens) + at * (p.o_bf16 ? 2 : 4);
      }
    }

    // X = diag(a) K S + add (forward: and q S beside it), this warpgroup's 32 columns.
    mbarrier_wait(&sh.full_keys[b], (step / 2) & 1);
    if constexpr (kForward) mbarrier_wait(&sh.full_queries, parity);
    float o[4][4];
    // K-major boxes: k-step ks at 8192 (ks / 4) + 32 (ks % 4); core-matrix planes: 2048 ks.
    auto k_step = [](int ks) { return 8192u * (ks / 4) + 32u * (ks % 4); };
    wgmma_fence();
#pragma unroll
    for (int plane = 0; plane < 2; ++plane)
#pragma unroll
      for (int ks = 0; ks < K / 16; ++ks)
        wgmma_bf16<4, 0, 1>(x, descriptor_plus(keys_desc[b], k_step(ks)),
                            descriptor_plus(S_desc, plane * kSPlane + 2048 * ks), plane + ks);
    if constexpr (kForward)
#pragma unroll
      for (int ks = 0; ks < K / 16; ++ks)
        wgmma_bf16<4, 0, 1>(o, descriptor_plus(queries_desc, k_step(ks)), descriptor_plus(S_desc, 2048 * ks), ks);
    wgmma_commit();
    if constexpr (!kForward) {  // D = diag(e) dO while the products run
      pairs(dO, xrow, xcol, [&](int, int, int r, int col, float& d0, float& d1) {
        store_core_pair(sh.D_or_Y[0], kXPlane, r, col, e[r] * d0, e[r] * d1);
      });
    }
    wgmma_wait<0>();
    wgmma_hold(x);
    if constexpr (kForward) {
      wgmma_hold(o);
      release(&sh.empty_queries);
    }
    pairs(x, xrow, xcol, [&](int j, int half, int r, int col, float& x0, float& x1) {
      const float2 v = p.add_tokens ? bf16x2_floats(add_words[j][2 * half])
                                    : make_float2(__uint_as_float(add_words[j][2 * half]),
                                                  __uint_as_float(add_words[j][2 * half + 1]));
      x0 = a[r] * x0 + v.x, x1 = a[r] * x1 + v.y;
      store_core_pair(sh.X[0], kXPlane, r, col, x0, x1);
      if (p.X) st2(sh.box_X + swizzled_box_index(kC, r, col), x0, x1);
    });
    if (p.before)
      pairs(S, srow, 0, [&](int, int, int r, int col, float& s0, float& s1) { st2(sh.box_before + swizzled_box_index(K, r, col), s0, s1); });
    if constexpr (kForward)
      pairs(o, xrow, xcol, [&](int, int, int r, int, float& o0, float& o1) { o0 *= e[r], o1 *= e[r]; });
    fence_async_shared();
    named_barrier(2 + wg, 128);  // this warpgroup's X planes complete (and its rows of before, columns of X)
    if (issues_stores) {
      const int before_row = static_cast<int>(hc * K) + 64 * wg;
      if (p.before)
#pragma unroll
        for (int box = 0; box < BV / 32; ++box)
          bulk_store_2d(&maps.stores.before, sh.box_before + (box * K + 64 * wg) * 32, v0 + 32 * box, before_row);
      if (p.X) bulk_store_2d(&maps.stores.X, sh.box_X + wg * kC * 32, v0 + 32 * wg, static_cast<int>(hc * kC));
      bulk_stores_commit();
    }

    // Y = M X, this warpgroup's columns: hi hi, hi lo, lo hi; keep diag(b) Y for the update.
    mbarrier_wait(&sh.full_M, parity);
    float y[4][4];
    {
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kC / 16; ++ks) {
        const uint64_t m_hi = descriptor_plus(M_desc, 32 * ks), m_lo = descriptor_plus(M_desc, kPlaneBytes + 32 * ks);
        const uint64_t x_hi = descriptor_plus(X_desc, 2048 * ks), x_lo = descriptor_plus(X_desc, kXPlane + 2048 * ks);
        wgmma_bf16<4, 0, 1>(y, m_hi, x_hi, ks);
        wgmma_bf16<4, 0, 1>(y, m_hi, x_lo, 1);
        wgmma_bf16<4, 0, 1>(y, m_lo, x_hi, 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_hold(y);
    }
    release(&sh.empty_M);
    pairs(y, xrow, xcol, [&](int, int, int r, int col, float& y0, float& y1) {
      store_core_pair(sh.bY[0], kXPlane, r, col, bs[r] * y0, bs[r] * y1);
      st2(sh.box_Y + swizzled_box_index(kC, r, col), y0, y1);
      if constexpr (kForward) store_core_pair(sh.D_or_Y[0], kXPlane, r, col, y0, y1, false);
    });
    fence_async_shared();
    named_barrier(1, 256);  // diag(b) Y (and D) complete, both halves
    if (issues_stores) {
      bulk_store_2d(&maps.stores.Y, sh.box_Y + wg * kC * 32, v0 + 32 * wg, static_cast<int>(hc * kC));
      bulk_stores_commit();
    }
    if (step + 1 < n_chunks) load_rows(chunk(step + 1));  // add and dO are this step's no more

    // S = last S + K^T diag(b) Y (reverse: + q^T D): A = K^T, MN-major on the keys (this
    // warpgroup's rows), B = the planes, all 64 columns. Forward: QKG Y for o beside it.
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) S[j][i] *= last;
    float qy[4][4];
    if constexpr (kForward) mbarrier_wait(&sh.full_QKG, parity);
    else mbarrier_wait(&sh.full_queries, parity);
    wgmma_fence();
    {
#pragma unroll
      for (int plane = 0; plane < 2; ++plane)
#pragma unroll
        for (int ks = 0; ks < kC / 16; ++ks) {
          wgmma_bf16<8, 1, 1>(S, descriptor_plus(keys_t_desc[b], 2048 * ks),
                              descriptor_plus(bY_desc, plane * kXPlane + 2048 * ks), 1);
          if constexpr (!kForward)
            wgmma_bf16<8, 1, 1>(S, descriptor_plus(queries_desc, 2048 * ks),
                                descriptor_plus(D_desc, plane * kXPlane + 2048 * ks), 1);
        }
      if constexpr (kForward)
#pragma unroll
        for (int plane = 0; plane < 2; ++plane)
#pragma unroll
          for (int ks = 0; ks < kC / 16; ++ks)
            wgmma_bf16<4, 0, 1>(qy, descriptor_plus(QKG_desc, plane * kPlaneBytes + 32 * ks),
                                descriptor_plus(Y_desc, 2048 * ks), plane + ks);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(S);
    release(&sh.empty_keys[b]);
    if constexpr (kForward) {
      wgmma_hold(qy);
      release(&sh.empty_QKG);
    } else {
      release(&sh.empty_queries);
    }
    pairs(S, srow, 0, [&](int, int, int r, int col, float& s0, float& s1) { store_core_pair(sh.S[0], kSPlane, r, col, s0, s1); });
    if constexpr (kForward) {  // o = s QKG Y + diag(e) q S
      const bool o_bf16 = p.o_tokens && p.o_bf16;
      pairs(qy, xrow, xcol, [&](int j, int half, int, int col, float& q0, float& q1) {
        const float o0 = p.output_scale * q0 + o[j][2 * half], o1 = p.output_scale * q1 + o[j][2 * half + 1];
        if (!o_row[half]) return;
        if (o_bf16) stg_bf16x2(reinterpret_cast<uint16_t*>(o_row[half]) + col, o0, o1);
        else stg2(reinterpret_cast<float*>(o_row[half]) + col, o0, o1);
      });
    }
    if (issues_stores) bulk_stores_wait_reads();  // the boxes free for the next chunk
    fence_async_shared();
    named_barrier(1, 256);  // S's planes complete for the next chunk's K S
  }
  if (issues_stores) bulk_stores_wait();
  pairs(S, srow, 0, [&](int, int, int r, int col, float& s0, float& s1) {
    stg2(p.final_state + state_base + static_cast<int64_t>(r) * V + col, s0, s1);
  });
}

}  // namespace
}  // namespace hybrid::ops::detail
