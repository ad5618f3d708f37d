// The backward's reverse state pass (delta_state_pass_kernel.cuh's step with Queries::kExtra) with
// the state transposed in registers, at K = 128, for 64 value columns a warpgroup. With T = S^T
// (64 values x 128 keys, float32) and each chunk's operands as the other passes take them:
//   before = T^T;  X^T = T K^T diag(a) + add^T;  Y^T = X^T M^T;
//   T = last T + Y^T diag(b) K + D^T q,  D = diag(e) dO.
// Every product's A operand is then a register fragment made from the accumulator before it (T,
// X^T, Y^T and D^T split into hi and lo bf16, the layout FlashAttention 3 passes its scores on in)
// and every B operand a chunk operand TMA wrote into shared memory: the keys (K-major for T K^T,
// MN-major for Y^T diag(b) K), M's split rows (K-major) and the queries (MN-major). The split
// products are the mma.sync pass's (bf16_split.cuh): T K^T two (T hi, lo; K exact), X^T M^T three
// (hi hi, lo hi, hi lo), each of Y^T diag(b) K and D^T q two, float32 accumulators.
//
// Why (kernel notes, step 36): the warpgroup pass with the state in shared memory
// (delta_state_pass_wgmma.cuh) spends its step on the planes' stores, proxy fences and barriers
// between its two warpgroups, one chain an SM. Here a warpgroup's chain touches shared memory only
// to read (no fence, no barrier between the warpgroups), so the block runs two chains (the two
// 64-column halves of 128 value columns, one head, one sequence) whose products interleave on the
// SM's tensor cores, and the chains share each chunk's keys, queries and M.
//
// Block: 384 threads, one block an SM. Warpgroups 0 and 1 compute (232 registers each after
// setmaxnreg: T is 64 floats a thread, its fragments 64 more); warpgroup 2's first thread issues
// every copy into two stages (a chunk each): the keys and queries (bf16 [H NC C, K], boxes of 64
// rows x 64 keys, 128-byte swizzle), M's split rows (two 64 x 64 boxes, their own swizzle the
// 128-byte one), `add` and dO (float32 [H NC C, V], boxes of 64 rows x 32 columns, 128-byte
// swizzle) and a, b, e (bulk copies). A stage's full mbarrier counts its bytes, its empty one an
// arrival from each computing warp after its last product on the stage. The kept intermediates go
// straight from the accumulators to global memory (a warp's store: 4 rows x 32 bytes).
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>

#include "bf16_split.cuh"
#include "cp_async.cuh"
#include "delta_state_pass_kernel.cuh"
#include "wgmma.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kRegK = 128, kRegChain = 64, kRegColumns = 2 * kRegChain, kRegThreads = 384;

struct RegisterPassMaps {
  CUtensorMap keys, queries, M, add, dO;
};

struct RegisterPassStage {
  alignas(1024) uint16_t keys[kC * kRegK];  // two boxes of 64 rows x 64 keys, 128-byte swizzled
  alignas(1024) uint16_t queries[kC * kRegK];
  alignas(1024) uint16_t M[2][kC * kC];           // hi, lo: 128-byte swizzled rows
  alignas(1024) float add[kRegColumns * kC];      // [columns / 32][rows][32], 128-byte swizzled
  alignas(1024) float dO[kRegColumns * kC];
};
struct RegisterPassShared {
  RegisterPassStage stage[2];
  float rows[2][3][kC];  // a, b, e of each stage's chunk
  uint64_t full[2], empty[2];
};
constexpr uint32_t kRegStageBytes = sizeof(RegisterPassStage) + 3 * sizeof(float) * kC;
static_assert(sizeof(RegisterPassStage) == 3 * 2 * kC * kRegK + 2 * sizeof(float) * kC * kRegColumns, "dense boxes");
constexpr size_t kRegisterPassShared = sizeof(RegisterPassShared) + 1024;
static_assert(kRegisterPassShared <= 227 * 1024, "the register pass's shared memory");

// Float (r, c) of boxes of 32 columns with the 128-byte swizzle, `rows` rows each.
__device__ __forceinline__ int swizzled_float(int rows, int r, int c) {
  return (c / 32) * rows * 32 + r * 32 + ((((c % 32) / 4) ^ (r % 8)) * 4) + c % 4;
}

// The hi and lo bf16 fragments (wgmma_bf16_registers' A) of every k-step of an m64nN accumulator.
template <int kTiles>
__device__ __forceinline__ void split_fragments(const float (&d)[kTiles][4], uint32_t (&hi)[kTiles / 2][4],
                                                uint32_t (&lo)[kTiles / 2][4]) {
#pragma unroll
  for (int ks = 0; ks < kTiles / 2; ++ks) {
    accumulator_fragment(d, ks, hi[ks], [](float x0, float x1) { return bf16x2(x0, x1); });
    accumulator_fragment(d, ks, lo[ks], [](float x0, float x1) { return split_pair(x0, x1).lo; });
  }
}

__global__ void __launch_bounds__(kRegThreads, 1)
    reverse_pass_registers_kernel(const Params p, const __grid_constant__ RegisterPassMaps maps) {
  constexpr int K = kRegK;
  extern __shared__ __align__(1024) char smem_raw[];
  RegisterPassShared& sh = *reinterpret_cast<RegisterPassShared*>(
      smem_raw + (1024 - shared_address(smem_raw) % 1024) % 1024);
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0), warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int h = blockIdx.y, n = blockIdx.z, V = p.V, block_v0 = kRegColumns * blockIdx.x;
  const int64_t begin = p.chunk_offsets[n], n_chunks = p.chunk_offsets[n + 1] - begin;
  auto chunk = [&](int64_t step) { return static_cast<int64_t>(h) * p.NC + begin + n_chunks - 1 - step; };
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) mbarrier_init(&sh.full[s], 1), mbarrier_init(&sh.empty[s], 8);
  }
  __syncthreads();

  if (wg == 2) {  // the producer: its first thread fills each stage a chunk ahead of its use
    registers_decrease<40>();
    if (threadIdx.x != 256) return;
    for (int64_t step = 0; step < n_chunks; ++step) {
      const int s = step % 2;
      if (step >= 2) mbarrier_wait(&sh.empty[s], ((step - 2) / 2) & 1);
      RegisterPassStage& at = sh.stage[s];
      const int64_t hc = chunk(step);
      const int row = static_cast<int>(hc * kC);
      uint64_t* bar = &sh.full[s];
      mbarrier_arrive_expect_bytes(bar, kRegStageBytes);
      for (int i = 0; i < K / 64; ++i) {
        bulk_load_2d(at.keys + i * 64 * kC, &maps.keys, 64 * i, row, bar);
        bulk_load_2d(at.queries + i * 64 * kC, &maps.queries, 64 * i, row, bar);
      }
      for (int plane = 0; plane < 2; ++plane) bulk_load_2d(at.M[plane], &maps.M, kC * plane, row, bar);
      for (int box = 0; box < kRegColumns / 32; ++box) {
        bulk_load_2d(at.add + box * kC * 32, &maps.add, block_v0 + 32 * box, row, bar);
        bulk_load_2d(at.dO + box * kC * 32, &maps.dO, block_v0 + 32 * box, row, bar);
      }
      bulk_copy(sh.rows[s][0], p.a + hc * kC, sizeof(float) * kC, bar);
      bulk_copy(sh.rows[s][1], p.b + hc * kC, sizeof(float) * kC, bar);
      bulk_copy(sh.rows[s][2], p.q_factor + hc * kC, sizeof(float) * kC, bar);
    }
    return;
  }
  registers_increase<232>();

  // This thread's pairs: rows (values) v = 16 warp + g (+ 8) of its chain's 64, columns (keys or
  // chunk rows) 8 j + 2 t (+ 1).
  const int chain_v0 = kRegChain * wg;  // in the block's columns
  const int64_t v_global = block_v0 + chain_v0;
  auto pairs = [&](auto& d, auto f) { for_each_accumulator_pair(d, 16 * warp, 0, lane, f); };
  // Stores an accumulator of `rows`-row tiles transposed: its (v, c) to out[c V + v] (float32).
  auto store_transposed = [&](auto& d, float* out) {
    pairs(d, [&](int, int, int v, int c, float& x0, float& x1) {
      out[static_cast<int64_t>(c) * V + v] = x0;
      out[static_cast<int64_t>(c + 1) * V + v] = x1;
    });
  };

  float T[16][4];  // S^T: this chain's 64 values x the 128 keys
  const int64_t state_base = (static_cast<int64_t>(n) * p.H + h) * K * V + v_global;
  pairs(T, [&](int, int, int v, int k, float& t0, float& t1) {
    t0 = p.init[state_base + static_cast<int64_t>(k) * V + v];
    t1 = p.init[state_base + static_cast<int64_t>(k + 1) * V + v];
  });

  // The operands' descriptors (each stage's): K-major keys and M for T K^T and X^T M^T (a k-step of
  // 16 columns at 8192 (ks / 4) + 32 (ks % 4) bytes); the keys and queries MN-major (n = the 128
  // keys over two 64-key boxes 8192 bytes apart, LBO; 8-row groups 1024 apart, SBO; a k-step of
  // 16 rows 2048 bytes on) for Y^T diag(b) K and D^T q.
  // Stage 0's, and stage s's s stages further (the address field counts 16 bytes).
  const uint64_t keys_desc = swizzled_rows_descriptor(sh.stage[0].keys, 128, 0, 0),
                 M_desc = swizzled_rows_descriptor(sh.stage[0].M[0], 128, 0, 0),
                 keys_mn_desc = wgmma_descriptor(shared_address(sh.stage[0].keys), 8192, 1024, 1),
                 queries_mn_desc = wgmma_descriptor(shared_address(sh.stage[0].queries), 8192, 1024, 1);
  constexpr uint32_t kStageUnits = sizeof(RegisterPassStage) >> 4;
  auto k_step = [](int ks) { return (8192u * (ks / 4) + 32u * (ks % 4)) >> 4; };
  constexpr uint32_t kMPlane = (2 * kC * kC) >> 4;

  for (int64_t step = 0; step < n_chunks; ++step) {
    const int s = step % 2;
    const int64_t hc = chunk(step);
    const RegisterPassStage& at = sh.stage[s];
    const uint32_t stage_units = s * kStageUnits;
    const float *a = sh.rows[s][0], *bs = sh.rows[s][1], *e = sh.rows[s][2];
    if (p.before) store_transposed(T, p.before + hc * K * V + v_global);

    // X^T = T K^T diag(a) + add^T
    uint32_t t_hi[8][4], t_lo[8][4];
    split_fragments(T, t_hi, t_lo);
    mbarrier_wait(&sh.full[s], (step / 2) & 1);
    float X[8][4];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      wgmma_bf16_registers<8, 0>(X, t_hi[ks], keys_desc + stage_units + k_step(ks), ks);
      wgmma_bf16_registers<8, 0>(X, t_lo[ks], keys_desc + stage_units + k_step(ks), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(X);
    pairs(X, [&](int, int, int v, int c, float& x0, float& x1) {
      x0 = a[c] * x0 + at.add[swizzled_float(kC, c, chain_v0 + v)];
      x1 = a[c + 1] * x1 + at.add[swizzled_float(kC, c + 1, chain_v0 + v)];
    });
    if (p.X) store_transposed(X, p.X + hc * kC * V + v_global);

    // Y^T = X^T M^T: hi hi, lo hi, hi lo
    uint32_t x_hi[4][4], x_lo[4][4];
    split_fragments(X, x_hi, x_lo);
    float Y[8][4];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kC / 16; ++ks) {
      const uint64_t m_hi = M_desc + stage_units + k_step(ks), m_lo = m_hi + kMPlane;
      wgmma_bf16_registers<8, 0>(Y, x_hi[ks], m_hi, ks);
      wgmma_bf16_registers<8, 0>(Y, x_lo[ks], m_hi, 1);
      wgmma_bf16_registers<8, 0>(Y, x_hi[ks], m_lo, 1);
    }
    wgmma_commit();
    // D^T = (diag(e) dO)^T while the products run: in the accumulator layout, then its fragments.
    float D[8][4];
    pairs(D, [&](int, int, int v, int c, float& d0, float& d1) {
      d0 = e[c] * at.dO[swizzled_float(kC, c, chain_v0 + v)];
      d1 = e[c + 1] * at.dO[swizzled_float(kC, c + 1, chain_v0 + v)];
    });
    uint32_t d_hi[4][4], d_lo[4][4];
    split_fragments(D, d_hi, d_lo);
    wgmma_wait<0>();
    wgmma_hold(Y);
    store_transposed(Y, p.Y + hc * kC * V + v_global);

    // T = last T + Y^T diag(b) K + D^T q
    pairs(Y, [&](int, int, int, int c, float& y0, float& y1) { y0 *= bs[c], y1 *= bs[c + 1]; });
    uint32_t y_hi[4][4], y_lo[4][4];
    split_fragments(Y, y_hi, y_lo);
    const float last = p.last[hc];
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) T[j][i] *= last;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kC / 16; ++ks) {
      const uint32_t rows16 = (2048u * ks) >> 4;
      wgmma_bf16_registers<16, 1>(T, y_hi[ks], keys_mn_desc + stage_units + rows16, 1);
      wgmma_bf16_registers<16, 1>(T, y_lo[ks], keys_mn_desc + stage_units + rows16, 1);
      wgmma_bf16_registers<16, 1>(T, d_hi[ks], queries_mn_desc + stage_units + rows16, 1);
      wgmma_bf16_registers<16, 1>(T, d_lo[ks], queries_mn_desc + stage_units + rows16, 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(T);
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&sh.empty[s]);  // this warp's reads of the stage are done
  }
  pairs(T, [&](int, int, int v, int k, float& t0, float& t1) {
    p.final_state[state_base + static_cast<int64_t>(k) * V + v] = t0;
    p.final_state[state_base + static_cast<int64_t>(k + 1) * V + v] = t1;
  });
}

}  // namespace
}  // namespace hybrid::ops::detail
