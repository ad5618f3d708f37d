// The state passes (delta_state_pass_kernel.cuh's step) with the state transposed in registers, at
// K = 96 or 128, for 64 value columns a warpgroup: the backward's reverse pass with `extra` formed
// from the queries (Queries::kExtra) and the forward with the whole output (kWholeOutput). With
// T = S^T (64 values x K keys, float32) and each chunk's operands as the other passes take them:
//   before = T^T;  X^T = T K^T diag(a) + add^T;  Y^T = X^T M^T;  T = last T + Y^T diag(b) K (+ D^T q)
//   forward: o^T = s Y^T QKG^T + T q^T diag(e) (T entering the chunk)    reverse: D = diag(e) dO
// Every product's A operand is a register fragment made from the accumulator before it (T, X^T,
// Y^T, D^T split into hi and lo bf16, the layout FlashAttention 3 passes its scores on in) and every
// B operand a chunk operand TMA wrote into shared memory: the keys (K-major for T K^T, MN-major for
// Y^T diag(b) K), M's and QKG's split rows (K-major), the queries (K-major for T q^T, MN-major for
// D^T q). The split products are the mma.sync pass's (bf16_split.cuh): T K^T two (T hi, lo; K
// exact), X^T M^T three (hi hi, lo hi, hi lo), each of Y^T diag(b) K and D^T q two; o's T q^T on
// T's hi plane and Y^T QKG^T on Y rounded to bf16 (QKG hi and lo), as there. Float32 accumulators.
//
// Why (kernel notes, steps 35 and 36): a pass on warpgroup products with the state in shared
// memory (the mma.sync pass's layout, built in step 35 and removed) spent its step on the state
// planes' stores, proxy fences and barriers between its two warpgroups, one chain an SM. Here a
// warpgroup's chain touches shared memory only to read (no fence, no barrier between the
// warpgroups), so a block can run two chains (two 64-column slices of one head's values, one
// sequence) whose products interleave on the SM's tensor cores, sharing each chunk's keys,
// queries, M and QKG; or one chain (kChains = 1), whose step is shorter where there are SMs
// enough for a chain each (kernel notes, step 45). A block whose head has a single 64-column
// slice left (V = 192 in blocks of two chains) runs that one alone.
//
// Block: 128 (kChains + 1) threads, and in the one-chain forward 128 more, one block an SM.
// Warpgroups 0 .. kChains - 1 compute (two chains, or the one-chain forward: 240 registers each
// after setmaxnreg, the producer 24, the o warpgroup 168; the one-chain reverse: up to 255 for
// every thread, no setmaxnreg; T is K / 2 floats a thread, its fragments as many again). In the
// one-chain forward o is off the chain: the chain hands each chunk's T hi and Y bf16 fragments to
// warpgroup 2 through shared memory (tile_T, tile_Y) and goes on to the next chunk, and
// warpgroup 2 forms and stores o (o_products, qy_products, store_o). o's operands (the queries,
// QKG, e) come and go on barriers of their own (full_o, empty_o), so that the chain's (keys, M,
// add, a, b) are copied anew as soon as the chain is done with them, not once o is: with one
// barrier a stage, the copies of the chunk two ahead started o's products' time later (kernel
// notes, step 49). The hand-off's tiles are laid out as the kept intermediates' TMA boxes (bf16
// rows of the chain's 64 values, 128-byte swizzled; the chain writes its fragments transposed by
// stmatrix, the o warpgroup reads them back by ldmatrix), so that one thread of the o warpgroup
// stores them (before, X, Y) with one bulk tensor copy each, where 128 threads' shuffles and
// 4-byte stores had made it the grad forward's slowest warpgroup (kernel notes, step 50).
// Warpgroup kChains's first thread issues every copy into two stages
// (a chunk each): the keys and queries (bf16 [H NC C, K], two boxes of 64 rows x 64 keys, 128-byte
// swizzle; at K = 96 TMA fills the second box's last 32 keys with zeros, which no product reads),
// M's and QKG's split rows (64 x 64 boxes, their own
// swizzle the 128-byte one), `add` (float32 [H NC C, V] in boxes of 64 rows x 32 columns, or bf16
// in boxes of 64 tokens or rows x 64 columns: from the tokens, or the reverse's p.add16; all
// 128-byte swizzled), dO (as `add`'s
// float32, or with the kept intermediates in bf16 as bf16 boxes of 64 rows x 64 columns: p.dO16)
// and a, b, e (bulk copies). A stage's full mbarrier counts its bytes, its empty one an
// arrival from each computing warp after its last product on the stage. o and the kept
// intermediates go straight from the accumulators to global memory (a warp's store: 4 rows x 32
// bytes), the kept ones in float32 or, where the backward's readers take them so (kept_in_bf16 in
// src/ops/delta_rule_chunked.cpp), in bf16: their bytes set these passes' time (kernel notes, step
// 37). In bf16 a block of one chain stores them from tiles instead (kept_by_tiles), in both
// directions: the stage's unused halves hold them as TMA boxes and one thread copies each out.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>

#include "bf16_split.cuh"
#include "chunk_ready.cuh"
#include "chunk_tokens.cuh"
#include "cp_async.cuh"
#include "delta_state_pass_kernel.cuh"
#include "wgmma.cuh"

namespace hybrid::ops::detail {
namespace {

// A stage holds two 64-key boxes of keys and of queries (K = 96 or 128) and up to two chains'
// value columns.
constexpr int kRegKeyBoxes = 128, kRegChain = 64, kRegColumns = 2 * kRegChain;

// `second`: dO (reverse) or QKG (forward). before, X, Y: the kept intermediates in bf16 (a
// one-chain block's bulk stores, in both directions; boxes of K or 64 rows x 64 values, 128-byte
// swizzle), where kept.
// o: the one-chain forward's output in the tokens, [B T, H V] bf16 in boxes of 64 rows x 64 values
// (128-byte swizzle), where o_tiles (o_by_tiles).
struct RegisterPassMaps {
  CUtensorMap keys, queries, M, add, second, before, X, Y, o;
  int o_tiles;
};

struct RegisterPassStage {
  alignas(1024) uint16_t keys[kC * kRegKeyBoxes];  // two boxes of 64 rows x 64 keys, 128-byte swizzled
  alignas(1024) uint16_t queries[kC * kRegKeyBoxes];
  alignas(1024) uint16_t M[2][kC * kC];           // hi, lo: 128-byte swizzled rows
  alignas(1024) float add[kRegColumns * kC];  // float32 [columns / 32][rows][32], or bf16 [columns / 64][rows][64]
  alignas(1024) float dO[kRegColumns * kC];   // reverse (bf16: its first 16 KB); forward: QKG's hi and lo planes there
};
struct RegisterPassShared {
  RegisterPassStage stage[2];
  float rows[2][3][kC];  // a, b, e of each stage's chunk
  uint64_t full[2], empty[2];
  // A block of one chain (split_stage): M, add, the reverse's dO and the rows on full_mid, released
  // by the chain once its Y stage is done with them (empty_mid); the reverse's queries on full_q;
  // the keys alone on full.
  uint64_t full_mid[2], empty_mid[2], full_q[2];
  // The one-chain forward: o's operands (queries, QKG, e) copied and released apart from the
  // chain's, and the hand-off's ring (written by the chain, read by the o warpgroup).
  uint64_t full_o[2], empty_o[2], handed[2], taken[2];
};
static_assert(sizeof(RegisterPassStage) == 3 * 2 * kC * kRegKeyBoxes + 2 * sizeof(float) * kC * kRegColumns,
              "dense boxes");
constexpr size_t kRegisterPassShared = sizeof(RegisterPassShared) + 1024;

// The one-chain forward's hand-off to its o warpgroup: a stage's `add` and second-operand space
// past the chain's 64 columns (16 KB each, which no copy writes in a block of one chain) holds the
// chunk's T hi (K rows: `before`), and X hi and Y bf16 (64 rows each), each a tile of rows of the
// chain's 64 values in bf16 (128 bytes, 128-byte swizzled, 1024-byte aligned): a TMA box of the
// kept intermediate as it is in global memory.
constexpr int kHandOffBytes = sizeof(float) * kC * kRegChain, kHandOffRow = 2 * kRegChain;  // a tile's row: 64 bf16
__device__ __forceinline__ char* tile_T(RegisterPassStage& st) { return reinterpret_cast<char*>(st.add) + kHandOffBytes; }
__device__ __forceinline__ char* tile_Y(RegisterPassStage& st) { return reinterpret_cast<char*>(st.dO) + kHandOffBytes; }
__device__ __forceinline__ char* tile_X(RegisterPassStage& st) { return tile_Y(st) + kC * kHandOffRow; }
// The one-chain forward's o (o_by_tiles), a tile of the same form: the stage's `add` past the 64
// bf16 columns of values from the tokens, before the hand-off's T.
__device__ __forceinline__ char* tile_O(RegisterPassStage& st) {
  return reinterpret_cast<char*>(st.add) + kC * kHandOffRow;
}
static_assert(sizeof(RegisterPassStage::add) == 2 * kHandOffBytes && sizeof(RegisterPassStage::dO) == 2 * kHandOffBytes &&
                  128 * kHandOffRow <= kHandOffBytes && 2 * kC * kHandOffRow <= kHandOffBytes &&
                  kHandOffBytes % 1024 == 0 && kC * kHandOffRow % 1024 == 0 && 2 * kC * kHandOffRow <= kHandOffBytes,
              "the hand-off's tiles (and o's) fit the columns a one-chain block leaves, aligned for the swizzle");

// A tile of rows of 64 bf16 (128 bytes, 128-byte swizzled, 1024-byte aligned: a TMA box's layout)
// whose row c holds column c of a chain's A fragments (rows: the chain's 64 values, v0 = 16 warp
// a warp's 16; columns 16 ks + 2 t (+ 1) (+ 8)): where lane 8 j + r points stmatrix / ldmatrix
// (x4, transposed) for k-step ks, row 16 ks + 8 (j / 2) + r, its 16-byte unit 2 warp + j % 2.
__device__ __forceinline__ uint32_t tile_row_address(const char* tile, int ks, int warp, int lane) {
  const int j = lane / 8, r = lane % 8, row = 16 * ks + 8 * (j / 2) + r;
  return shared_address(tile) + row * 128 + (((2 * warp + j % 2) ^ r) << 4);
}
template <int kSteps>
__device__ __forceinline__ void fragments_to_tile(const uint32_t (&f)[kSteps][4], char* tile, int warp, int lane) {
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks) stsm_x4_trans(tile_row_address(tile, ks, warp, lane), f[ks]);
}
template <int kSteps>
__device__ __forceinline__ void fragments_from_tile(uint32_t (&f)[kSteps][4], const char* tile, int warp, int lane) {
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks) ldsm_x4_trans(f[ks], tile_row_address(tile, ks, warp, lane));
}
static_assert(kRegisterPassShared <= 227 * 1024, "the register pass's shared memory");

// Element (r, c) of boxes of 128-byte rows with the 128-byte swizzle (each 16-byte unit of row r
// at unit ^ (r % 8)), 64 rows each, for elements of kBytes (4: 32 floats a row, 2: 64 bf16).
template <int kBytes>
__device__ __forceinline__ int swizzled_element(int r, int c) {
  constexpr int kRow = 128 / kBytes, kUnit = 16 / kBytes;
  return (c / kRow) * kC * kRow + r * kRow + (((c % kRow) / kUnit) ^ (r % 8)) * kUnit + c % kUnit;
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

// Two values of one row of a transposed accumulator: the lanes of rows v and v + 1 (lane ^ 4) of
// its pair (v, c), (v, c + 1) trade one, so that the even row's lane holds (v, c), (v + 1, c) and
// the odd row's (v - 1, c + 1), (v, c + 1): output row c + row, columns v - row and v - row + 1.
struct TradedPair {
  int row;
  float first, second;
};
__device__ __forceinline__ TradedPair traded_pair(float x0, float x1, bool odd_row) {
  const float other = __shfl_xor_sync(0xffffffffu, odd_row ? x0 : x1, 4);
  return odd_row ? TradedPair{1, other, x1} : TradedPair{0, x0, other};
}

// Stores bf16 fragments (accumulator_fragment's layout of an m64 accumulator's bf16 rounding:
// rows v = v0 + g (+ 8), columns 16 ks + 2 t (+ 8), pairs of adjacent columns) transposed, (v, c)
// to out[c stride + v], 4 bytes a store: the lanes of rows v and v + 1 (lane ^ 4) trade their pair,
// the even row's lane then holding (v, c), (v + 1, c) and the odd row's (v - 1, c + 1), (v, c + 1)
// (traded_pair's rows, on bf16 halves). Fragments are written by conversions, not by products, so
// their stores can run while products that read them as operands are in flight (ptxas waits for
// the products before an instruction reads an accumulator they might write).
template <int kSteps>
__device__ __forceinline__ void store_fragments_transposed(const uint32_t (&f)[kSteps][4], uint16_t* out,
                                                           int64_t stride, int v0, int lane) {
  const int g = lane / 4, t = lane % 4, odd = g & 1;
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int v = v0 + g + 8 * (i & 1), c = 16 * ks + 8 * (i >> 1) + 2 * t;
      const uint32_t mine = f[ks][i], other = __shfl_xor_sync(0xffffffffu, mine, 4);
      const uint32_t two = odd ? __byte_perm(other, mine, 0x7632) : __byte_perm(mine, other, 0x5410);
      *reinterpret_cast<uint32_t*>(out + (c + odd) * stride + v - odd) = two;
    }
}

// x, which the compiler cannot see through (nor hoist out of a loop).
__device__ __forceinline__ int opaque(int x) {
  int r;
  asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

// Where a chunk's `add` rows start in the tokens (values from the tokens) and how many of its 64
// rows are tokens of its sequence (the mma.sync pass's fetch_run, loaded now).
struct ChunkRun {
  int64_t first;
  int tokens;
};
__device__ __forceinline__ ChunkRun run_of(const Params& p, int64_t c) {
  int64_t run[2];
  fetch_run(p, c, run, /*now=*/true);
  return {run[0], static_cast<int>(run[1])};
}

// Whether a block's o is formed by a warpgroup of its own (the one-chain forward) rather than on
// the chain: o's products and stores were 1.05 us of the forward's chunk step at the OLMo shape
// (kernel notes, step 49), time a lone chain spent off its recurrence.
template <bool kForward, int kChains>
constexpr bool o_warpgroup() {
  return kForward && kChains == 1;
}

// Whether a block's kept intermediates in bf16 go out by bulk tensor copies of the hand-off's tiles
// (a block of one chain, whose stage leaves the tiles' space): the forward's o warpgroup stores
// them; the reverse's chain, one of its threads once all have written the chunk's tiles. The
// reverse's 4-byte stores (and the registers they held) were an eighth of its stall samples at the
// OLMo shape (kernel notes, step 50).
template <int kChains>
constexpr bool kept_by_tiles() {
  return kChains == 1;
}

// Whether a block's stage is filled in two parts: the one-chain reverse waited on its stage's copies
// for 12% of its chain's time at the OLMo shape, the forward for 6% (Nsight Compute, kernel notes
// step 57), each chunk's copies issued only once the chain's step two back had ended. M, add, the
// reverse's dO and the rows are read by the middle of a step (the Y stage), so the chunk two ahead's
// can be issued from there, half a step earlier, and the step's first wait is for the keys alone
// (the reverse's queries are read at its end, by the update; the forward's are the o warpgroup's).
template <int kChains>
constexpr bool split_stage() {
  return kChains == 1;
}

template <bool kForward, int kChains>
constexpr int register_pass_threads() {
  return 128 * (kChains + 1 + o_warpgroup<kForward, kChains>());
}

// The reverse chain's kept intermediates out (kept_by_tiles), by one thread of the producer
// warpgroup off the chain: each chunk's tiles as the chain hands them over (handed), one bulk
// tensor copy each; the chain may write the stage's tiles again once the copies have read them
// (taken). With chunk_ready, each chunk is then counted there once its copies are complete, a
// chunk behind: waits the chain itself would have made (its thread 0 storing and counting cost the
// reverse pass 0.8 us a step at B8 T4096 H16 K128 V128: kernel notes, step 54).
template <int K, class Chunk>
__device__ __forceinline__ void store_tiles(const Params& p, const RegisterPassMaps& maps, RegisterPassShared& sh,
                                         int64_t n_chunks, int block_v0, const Chunk& chunk) {
  for (int64_t step = 0; step < n_chunks; ++step) {
    const int s = step % 2;
    const int64_t hc = chunk(step);
    RegisterPassStage& at = sh.stage[s];
    mbarrier_wait(&sh.handed[s], (step / 2) & 1);
    if (p.before16) bulk_store_2d(&maps.before, tile_T(at), block_v0, static_cast<int>(hc * K));
    if (p.X16) bulk_store_2d(&maps.X, tile_X(at), block_v0, static_cast<int>(hc * kC));
    if (p.Y16) bulk_store_2d(&maps.Y, tile_Y(at), block_v0, static_cast<int>(hc * kC));
    bulk_stores_commit();
    bulk_stores_wait_reads();
    mbarrier_arrive(&sh.taken[s]);
    if (p.chunk_ready && step >= 1) bulk_stores_complete<1>(), signal_chunk(p.chunk_ready + chunk(step - 1));
  }
  bulk_stores_complete<0>();
  if (p.chunk_ready && n_chunks >= 1) signal_chunk(p.chunk_ready + chunk(n_chunks - 1));
}

template <bool kForward, int K, int kChains>
__global__ void __launch_bounds__(register_pass_threads<kForward, kChains>(), 1)
    state_pass_registers_kernel(const Params p, const __grid_constant__ RegisterPassMaps maps) {
  static_assert((K == 96 || K == 128) && (kChains == 1 || kChains == 2), "K 96 or 128, one or two chains a block");
  constexpr bool kSideO = o_warpgroup<kForward, kChains>();
  constexpr bool kChainTiles = kept_by_tiles<kChains>() && !kSideO;  // the reverse's chain stores its tiles
  constexpr bool kSplitStage = split_stage<kChains>();
  // The warpgroups past the producer's 24 registers: a chain's 240 where a block has three.
  constexpr bool kRebalance = kChains == 2 || kSideO;
  constexpr int kKeyTiles = K / 8;  // T's n8 tiles
  extern __shared__ __align__(1024) char smem_raw[];
  RegisterPassShared& sh = *reinterpret_cast<RegisterPassShared*>(
      smem_raw + (1024 - shared_address(smem_raw) % 1024) % 1024);
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0), warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int h = blockIdx.y, n = blockIdx.z, V = p.V, block_v0 = kChains * kRegChain * blockIdx.x;
  const int chains = min(kChains, (V - block_v0) / kRegChain), columns = chains * kRegChain;  // this block's
  const int64_t begin = p.chunk_offsets[n], n_chunks = p.chunk_offsets[n + 1] - begin;
  auto chunk = [&](int64_t step) {
    return static_cast<int64_t>(h) * p.NC + (kForward ? begin + step : begin + n_chunks - 1 - step);
  };
  const bool values_from_tokens = kForward && p.add_tokens;
  // `add` in bf16 boxes of 64 rows x 64 columns: the tokens' values, or the reverse's bf16 add.
  const bool add_bf16 = values_from_tokens || (!kForward && p.add16);
  const bool dO_bf16 = !kForward && p.dO16;  // boxes of 64 rows x 64 bf16, as `add` from the tokens
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(&sh.full[s], 1), mbarrier_init(&sh.empty[s], 4 * chains);
      mbarrier_init(&sh.full_o[s], 1), mbarrier_init(&sh.empty_o[s], 4);
      mbarrier_init(&sh.handed[s], 128), mbarrier_init(&sh.taken[s], kSideO ? 128 : 1);
      mbarrier_init(&sh.full_mid[s], 1), mbarrier_init(&sh.empty_mid[s], 4 * chains), mbarrier_init(&sh.full_q[s], 1);
    }
  }
  __syncthreads();
  if (kChainTiles && p.blocks_started && threadIdx.x == 0) atomicAdd(p.blocks_started, 1);

  if (wg == kChains) {  // the producer: its first thread fills each stage a chunk ahead of its use
    if constexpr (kRebalance) registers_decrease<24>();
    if constexpr (kChainTiles)
      if (threadIdx.x == 128 * kChains + 32) return store_tiles<K>(p, maps, sh, n_chunks, block_v0, chunk);
    if (threadIdx.x != 128 * kChains) return;
    const uint32_t add_bytes = (add_bf16 ? 2 : 4) * kC * columns;
    const uint32_t second_bytes = kForward ? 4 * kC * kC : (dO_bf16 ? 2 : 4) * kC * columns;
    // Whole boxes: TMA counts a box's zero-filled keys past K too. With an o warpgroup the
    // queries, QKG and e are o's, on barriers of their own.
    constexpr uint32_t kBoxes = 2 * kC * kRegKeyBoxes;  // the keys', the queries' or M's bytes
    const uint32_t o_bytes = kBoxes + second_bytes + sizeof(float) * kC;
    const uint32_t stage_bytes = 3 * kBoxes + add_bytes + second_bytes + 3 * sizeof(float) * kC;
    // The chunk's keys (and queries) on `keys` (`queries`); M, add, the second operand and the rows
    // on `mid`.
    auto load_keys = [&](RegisterPassStage& at, int row, uint64_t* keys, uint64_t* queries) {
      for (int i = 0; i < kRegKeyBoxes / 64; ++i) {
        bulk_load_2d(at.keys + i * 64 * kC, &maps.keys, 64 * i, row, keys);
        if constexpr (!kSideO) bulk_load_2d(at.queries + i * 64 * kC, &maps.queries, 64 * i, row, queries);
      }
    };
    auto load_mid = [&](RegisterPassStage& at, int s, int64_t hc, int row, uint64_t* bar) {
      for (int plane = 0; plane < 2; ++plane) bulk_load_2d(at.M[plane], &maps.M, kC * plane, row, bar);
      if (values_from_tokens) {
        const int first = static_cast<int>(run_of(p, hc - static_cast<int64_t>(h) * p.NC).first);
        for (int box = 0; box < columns / 64; ++box)
          bulk_load_2d(reinterpret_cast<uint16_t*>(at.add) + box * kC * 64, &maps.add,
                       static_cast<int>(h * p.add_head) + block_v0 + 64 * box, first, bar);
      } else if (add_bf16) {
        for (int box = 0; box < columns / 64; ++box)
          bulk_load_2d(reinterpret_cast<uint16_t*>(at.add) + box * kC * 64, &maps.add, block_v0 + 64 * box, row, bar);
      } else {
        for (int box = 0; box < columns / 32; ++box)
          bulk_load_2d(at.add + box * kC * 32, &maps.add, block_v0 + 32 * box, row, bar);
      }
      if constexpr (kForward) {
        if constexpr (!kSideO)
          for (int plane = 0; plane < 2; ++plane)
            bulk_load_2d(reinterpret_cast<uint16_t*>(at.dO) + plane * kC * kC, &maps.second, kC * plane, row, bar);
      } else if (dO_bf16) {
        for (int box = 0; box < columns / 64; ++box)
          bulk_load_2d(reinterpret_cast<uint16_t*>(at.dO) + box * kC * 64, &maps.second, block_v0 + 64 * box, row,
                       bar);
      } else {
        for (int box = 0; box < columns / 32; ++box)
          bulk_load_2d(at.dO + box * kC * 32, &maps.second, block_v0 + 32 * box, row, bar);
      }
      bulk_copy(sh.rows[s][0], p.a + hc * kC, sizeof(float) * kC, bar);
      bulk_copy(sh.rows[s][1], p.b + hc * kC, sizeof(float) * kC, bar);
      if constexpr (!kSideO) bulk_copy(sh.rows[s][2], p.q_factor + hc * kC, sizeof(float) * kC, bar);
    };
    for (int64_t step = 0; step < n_chunks; ++step) {
      const int s = step % 2;
      const uint32_t two_back = ((step - 2) / 2) & 1;  // the phase of the chunk two back's release
      RegisterPassStage& at = sh.stage[s];
      const int64_t hc = chunk(step);
      const int row = static_cast<int>(hc * kC);
      uint64_t* bar = &sh.full[s];
      if constexpr (kSplitStage) {
        if (step >= 2) mbarrier_wait(&sh.empty_mid[s], two_back);
        // (the keys', and the queries' or o's operands' bytes apart)
        mbarrier_arrive_expect_bytes(&sh.full_mid[s], stage_bytes - kBoxes - (kSideO ? o_bytes : kBoxes));
        load_mid(at, s, hc, row, &sh.full_mid[s]);
        if (step >= 2) mbarrier_wait(&sh.empty[s], two_back);
        mbarrier_arrive_expect_bytes(bar, kBoxes);
        if constexpr (!kSideO) mbarrier_arrive_expect_bytes(&sh.full_q[s], kBoxes);
        load_keys(at, row, bar, &sh.full_q[s]);
      } else {
        if (step >= 2) mbarrier_wait(&sh.empty[s], two_back);
        mbarrier_arrive_expect_bytes(bar, stage_bytes - (kSideO ? o_bytes : 0));
        load_keys(at, row, bar, bar);
        load_mid(at, s, hc, row, bar);
      }
      if constexpr (kSideO) {  // o's operands, once the o warpgroup is done with the chunk two back
        if (step >= 2) mbarrier_wait(&sh.empty_o[s], ((step - 2) / 2) & 1);
        uint64_t* o_bar = &sh.full_o[s];
        mbarrier_arrive_expect_bytes(o_bar, o_bytes);
        for (int i = 0; i < kRegKeyBoxes / 64; ++i)
          bulk_load_2d(at.queries + i * 64 * kC, &maps.queries, 64 * i, row, o_bar);
        for (int plane = 0; plane < 2; ++plane)
          bulk_load_2d(reinterpret_cast<uint16_t*>(at.dO) + plane * kC * kC, &maps.second, kC * plane, row, o_bar);
        bulk_copy(sh.rows[s][2], p.q_factor + hc * kC, sizeof(float) * kC, o_bar);
      }
    }
    return;
  }
  // This thread's pairs: rows (values) v = 16 warp + g (+ 8) of its chain's 64, columns (keys or
  // chunk rows) 8 j + 2 t (+ 1).
  auto pairs = [&](auto& d, auto f) { for_each_accumulator_pair(d, 16 * warp, 0, lane, f); };

  // The operands' descriptors: K-major keys, queries, M and QKG (a k-step of 16 columns at 8192
  // (ks / 4) + 32 (ks % 4) bytes); the keys and queries MN-major (n = the K keys over two 64-key
  // boxes 8192 bytes apart, LBO; 8-row groups 1024 apart, SBO; a k-step of 16 rows 2048 bytes on).
  // Stage 0's, and stage s's s stages further (the address field counts 16 bytes).
  const RegisterPassStage& stage0 = sh.stage[0];
  const uint64_t keys_desc = swizzled_rows_descriptor(stage0.keys, 128, 0, 0),
                 queries_desc = swizzled_rows_descriptor(stage0.queries, 128, 0, 0),
                 M_desc = swizzled_rows_descriptor(stage0.M[0], 128, 0, 0),
                 QKG_desc = swizzled_rows_descriptor(stage0.dO, 128, 0, 0),
                 keys_mn_desc = wgmma_descriptor(shared_address(stage0.keys), 8192, 1024, 1),
                 queries_mn_desc = wgmma_descriptor(shared_address(stage0.queries), 8192, 1024, 1);
  constexpr uint32_t kStageUnits = sizeof(RegisterPassStage) >> 4, kPlaneUnits = (2 * kC * kC) >> 4;
  auto k_step = [](int ks) { return (8192u * (ks / 4) + 32u * (ks % 4)) >> 4; };

  // The forward's o^T = s Y^T QKG^T + T q^T diag(e): T q^T on T's hi plane (entering the chunk),
  // Y^T QKG^T on Y in bf16 (QKG's hi and lo planes); issued here, committed by the caller.
  auto o_products = [&](float (&o)[8][4], const uint32_t (&t_hi)[K / 16][4], uint32_t stage_units) {
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks)
      wgmma_bf16_registers<8, 0>(o, t_hi[ks], queries_desc + stage_units + k_step(ks), ks);
  };
  auto qy_products = [&](float (&qy)[8][4], const uint32_t (&y_bf16)[4][4], uint32_t stage_units) {
#pragma unroll
    for (int plane = 0; plane < 2; ++plane)
#pragma unroll
      for (int ks = 0; ks < kC / 16; ++ks)
        wgmma_bf16_registers<8, 0>(qy, y_bf16[ks], QKG_desc + stage_units + plane * kPlaneUnits + k_step(ks),
                                   plane + ks);
  };
  // o's stores, two adjacent values of one row at a time (traded_pair: 4 bytes in bf16, 8 in
  // float32). The forward of two chains at K = 128 (240 registers) spilled 52 bytes with the trade
  // (ptxas), so it stores one value at a time.
  constexpr bool kTrade = !(kForward && K == 128 && kChains == 2);
  const bool odd_row = lane & 4;
  // o = s QKG Y + diag(e) q S (o holding diag(e) q S already), into the tokens or the chunk layout:
  // row c of o at first + c stride, token run.first + c's head h (rows of the run only), or the
  // chunk layout's row.
  auto store_o = [&](float (&o)[8][4], float (&qy)[8][4], int64_t hc, const ChunkRun& run, int64_t v_global) {
    const bool into_tokens = p.o_tokens != nullptr, o_bf16 = into_tokens && p.o_bf16;
    const int64_t stride = opaque(into_tokens ? p.H * V : V),
                  first = (into_tokens ? run.first * stride + h * V : hc * kC * V) + v_global;
    float* o_float = into_tokens ? static_cast<float*>(p.o_tokens) : p.O;
    pairs(qy, [&](int j, int half, int v, int c, float& q0, float& q1) {
      const float out[2] = {p.output_scale * q0 + o[j][2 * half], p.output_scale * q1 + o[j][2 * half + 1]};
      if constexpr (kTrade) {  // two adjacent values of o's row: 4 bytes in bf16, 8 in float32
        const TradedPair two = traded_pair(out[0], out[1], odd_row);
        if (c + two.row >= run.tokens) return;
        const int64_t at_o = first + (c + two.row) * stride + v - two.row;
        if (o_bf16) *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(p.o_tokens) + at_o) = bf16x2(two.first, two.second);
        else *reinterpret_cast<float2*>(o_float + at_o) = make_float2(two.first, two.second);
      } else {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          if (c + i >= run.tokens) continue;
          const int64_t at_o = first + (c + i) * stride + v;
          if (o_bf16) reinterpret_cast<__nv_bfloat16*>(p.o_tokens)[at_o] = __float2bfloat16_rn(out[i]);
          else o_float[at_o] = out[i];
        }
      }
    });
  };
  // Values from the tokens: the chunk's rows past its run are other sequences' (or none).
  auto run_at = [&](int64_t hc) {
    return values_from_tokens ? run_of(p, hc - static_cast<int64_t>(h) * p.NC) : ChunkRun{0, kC};
  };

  if constexpr (kSideO) {
    if (wg == kChains + 1) {  // the o warpgroup: each chunk's o from the chain's hand-off
      const int tid = threadIdx.x % 128;
      for (int64_t step = 0; step < n_chunks; ++step) {
        const int s = step % 2;
        const int64_t hc = chunk(step);
        RegisterPassStage& at = sh.stage[s];
        const ChunkRun run = run_at(hc);
        mbarrier_wait(&sh.full_o[s], (step / 2) & 1);
        mbarrier_wait(&sh.handed[s], (step / 2) & 1);
        // The kept intermediates in bf16: the hand-off's tiles as they are (the chain fenced its
        // writes for the async proxy before handing them over).
        const bool issues = tid == 0;
        if (issues) {
          if (p.before16) bulk_store_2d(&maps.before, tile_T(at), block_v0, static_cast<int>(hc * K));
          if (p.X16) bulk_store_2d(&maps.X, tile_X(at), block_v0, static_cast<int>(hc * kC));
          if (p.Y16) bulk_store_2d(&maps.Y, tile_Y(at), block_v0, static_cast<int>(hc * kC));
          bulk_stores_commit();
        }
        uint32_t t_hi[K / 16][4], y_bf16[4][4];
        fragments_from_tile(t_hi, tile_T(at), warp, lane);
        fragments_from_tile(y_bf16, tile_Y(at), warp, lane);
        if (!issues) mbarrier_arrive(&sh.taken[s]);  // the chain may write the chunk two ahead's hand-off
        float o[8][4], qy[8][4];
        wgmma_fence();
        o_products(o, t_hi, s * kStageUnits);
        qy_products(qy, y_bf16, s * kStageUnits);
        wgmma_commit();
        if (issues) {  // once the stores have read the tiles, while o's products run
          bulk_stores_wait_reads();
          mbarrier_arrive(&sh.taken[s]);
        }
        wgmma_wait<0>();
        wgmma_hold(o);
        wgmma_hold(qy);
        const float* e = sh.rows[s][2];
        pairs(o, [&](int, int, int, int c, float& o0, float& o1) { o0 *= e[c], o1 *= e[c + 1]; });
        __syncwarp();
        if (lane == 0) mbarrier_arrive(&sh.empty_o[s]);  // this warp's reads of o's operands are done
        if (maps.o_tiles) {  // o = s qy + o in bf16 into the stage's o tile, then one bulk tensor store
          pairs(o, [&](int j, int half, int, int, float& o0, float& o1) {
            o0 += p.output_scale * qy[j][2 * half], o1 += p.output_scale * qy[j][2 * half + 1];
          });
          uint32_t o_bf16[4][4];
#pragma unroll
          for (int ks = 0; ks < kC / 16; ++ks)
            accumulator_fragment(o, ks, o_bf16[ks], [](float x0, float x1) { return bf16x2(x0, x1); });
          // The tile two steps back has been read: this thread's barrier of the step before came
          // after the issuing thread's wait for its bulk stores' reads.
          fragments_to_tile(o_bf16, tile_O(at), warp, lane);
          fence_async_shared();  // the bulk store reads the tile through the async proxy
          asm volatile("bar.sync 1, 128;" ::: "memory");  // every thread's part of the tile is written
          if (issues) {
            bulk_store_2d(&maps.o, tile_O(at), static_cast<int>(h * V) + block_v0, static_cast<int>(run.first));
            bulk_stores_commit();
          }
        } else {
          store_o(o, qy, hc, run, block_v0);
        }
      }
      if (tid == 0) bulk_stores_wait();
      return;
    }
  }
  if (wg >= chains) return;  // the second chain of a head's last, single slice
  if constexpr (kRebalance) registers_increase<240>();

  const int chain_v0 = kRegChain * wg;  // in the block's columns
  const int64_t v_global = block_v0 + chain_v0;
  // Stores an accumulator transposed: its (v, c) to out[c V + v] (float32). V through an opaque
  // move at each call: with V known loop-invariant, the compiler hoisted the 64-bit addresses of a
  // thread's rows out of the chunk loop (64 registers more, and spills).
  auto store_transposed = [&](auto& d, float* out) {
    const int64_t stride = opaque(V);
    pairs(d, [&](int, int, int v, int c, float& x0, float& x1) {
      out[c * stride + v] = x0;
      out[(c + 1) * stride + v] = x1;
    });
  };

  float T[kKeyTiles][4];  // S^T: this chain's 64 values x the K keys
  const int64_t state_base = (static_cast<int64_t>(n) * p.H + h) * K * V + v_global;
  pairs(T, [&](int, int, int v, int k, float& t0, float& t1) {  // no init: the state starts at zero
    t0 = p.init ? p.init[state_base + static_cast<int64_t>(k) * V + v] : 0.f;
    t1 = p.init ? p.init[state_base + static_cast<int64_t>(k + 1) * V + v] : 0.f;
  });

  for (int64_t step = 0; step < n_chunks; ++step) {
    const int s = step % 2;
    const int64_t hc = chunk(step);
    RegisterPassStage& at = sh.stage[s];
    const uint32_t stage_units = s * kStageUnits;
    const float *a = sh.rows[s][0], *bs = sh.rows[s][1], *e = sh.rows[s][2];
    if (p.before) store_transposed(T, p.before + hc * K * V + v_global);
    const ChunkRun run = run_at(hc);

    // X^T = T K^T diag(a) + add^T (forward on the chain: T q^T beside it, on T's hi plane)
    uint32_t t_hi[K / 16][4], t_lo[K / 16][4];
    split_fragments(T, t_hi, t_lo);
    mbarrier_wait(&sh.full[s], (step / 2) & 1);
    float X[8][4], o[8][4];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      wgmma_bf16_registers<8, 0>(X, t_hi[ks], keys_desc + stage_units + k_step(ks), ks);
      wgmma_bf16_registers<8, 0>(X, t_lo[ks], keys_desc + stage_units + k_step(ks), 1);
    }
    if constexpr (kForward && !kSideO) o_products(o, t_hi, stage_units);
    wgmma_commit();
    // The hand-off's tiles, written once the o warpgroup (or the storer) has taken the chunk two
    // back's. The kept intermediates in bf16 go out from the fragments of the products that read
    // them, while those products run (T's hi plane is its bf16 rounding, as X's and Y's are).
    if constexpr (kSideO || kChainTiles) {
      if (step >= 2) mbarrier_wait(&sh.taken[s], ((step - 2) / 2) & 1);
      if (kSideO || p.before16) fragments_to_tile(t_hi, tile_T(at), warp, lane);
    }
    if (!kSideO && !kChainTiles && p.before16)
      store_fragments_transposed(t_hi, p.before16 + hc * K * V + v_global, opaque(V), 16 * warp, lane);
    // add^T's bf16 pairs in fragment order (as ldmatrix reads them from the chain's box), while
    // the products run.
    uint32_t add_t[4][4];
    if constexpr (kSplitStage) mbarrier_wait(&sh.full_mid[s], (step / 2) & 1);  // M, add, dO, the rows
    if (add_bf16) fragments_from_tile(add_t, reinterpret_cast<const char*>(at.add) + chain_v0 / 64 * kC * 128, warp, lane);
    wgmma_wait<0>();
    wgmma_hold(X);
    if constexpr (kForward && !kSideO) wgmma_hold(o);
    pairs(X, [&](int j, int half, int v, int c, float& x0, float& x1) {
      float add0, add1;
      if (add_bf16) {  // run.tokens: C where the values are not the tokens'
        const float2 pair = bf16x2_floats(add_t[j / 2][2 * (j % 2) + half]);
        add0 = c < run.tokens ? pair.x : 0.f;
        add1 = c + 1 < run.tokens ? pair.y : 0.f;
      } else {
        add0 = at.add[swizzled_element<4>(c, chain_v0 + v)], add1 = at.add[swizzled_element<4>(c + 1, chain_v0 + v)];
      }
      x0 = a[c] * x0 + add0, x1 = a[c + 1] * x1 + add1;
    });
    if (p.X) store_transposed(X, p.X + hc * kC * V + v_global);

    // Y^T = X^T M^T: hi hi, lo hi, hi lo
    uint32_t x_hi[4][4], x_lo[4][4];
    split_fragments(X, x_hi, x_lo);
    float Y[8][4];
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kC / 16; ++ks) {
      const uint64_t m_hi = M_desc + stage_units + k_step(ks), m_lo = m_hi + kPlaneUnits;
      wgmma_bf16_registers<8, 0>(Y, x_hi[ks], m_hi, ks);
      wgmma_bf16_registers<8, 0>(Y, x_lo[ks], m_hi, 1);
      wgmma_bf16_registers<8, 0>(Y, x_hi[ks], m_lo, 1);
    }
    wgmma_commit();
    if (!kSideO && !kChainTiles && p.X16)
      store_fragments_transposed(x_hi, p.X16 + hc * kC * V + v_global, opaque(V), 16 * warp, lane);
    if ((kSideO || kChainTiles) && p.X16) fragments_to_tile(x_hi, tile_X(at), warp, lane);
    // While the products run: reverse, D^T = (diag(e) dO)^T and its fragments; forward on the
    // chain, o's first term T q^T diag(e).
    uint32_t d_hi[4][4], d_lo[4][4];
    if constexpr (kForward) {
      if constexpr (!kSideO) pairs(o, [&](int, int, int, int c, float& o0, float& o1) { o0 *= e[c], o1 *= e[c + 1]; });
    } else {
      if (dO_bf16) {  // dO^T's fragments in bf16 as ldmatrix reads them from the chain's box, then diag(e)
        uint32_t dO_t[4][4];
        fragments_from_tile(dO_t, reinterpret_cast<const char*>(at.dO) + chain_v0 / 64 * kC * 128, warp, lane);
#pragma unroll
        for (int ks = 0; ks < kC / 16; ++ks)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int c = 16 * ks + 8 * (i >> 1) + 2 * (lane % 4);
            const float2 x = bf16x2_floats(dO_t[ks][i]);
            const SplitPair d = split_pair(e[c] * x.x, e[c + 1] * x.y);
            d_hi[ks][i] = d.hi, d_lo[ks][i] = d.lo;
          }
      } else {
        float D[8][4];
        pairs(D, [&](int, int, int v, int c, float& d0, float& d1) {
          d0 = e[c] * at.dO[swizzled_element<4>(c, chain_v0 + v)];
          d1 = e[c + 1] * at.dO[swizzled_element<4>(c + 1, chain_v0 + v)];
        });
        split_fragments(D, d_hi, d_lo);
      }
    }
    wgmma_wait<0>();
    wgmma_hold(Y);
    if (p.Y) store_transposed(Y, p.Y + hc * kC * V + v_global);

    // T = last T + Y^T diag(b) K (reverse: + D^T q); forward on the chain: Y^T QKG^T beside it, on
    // Y in bf16 (which is also what the bf16 Y stored is: formed in the reverse for that alone)
    uint32_t y_bf16[4][4];
    if (kForward || p.Y16)
#pragma unroll
      for (int ks = 0; ks < kC / 16; ++ks)
        accumulator_fragment(Y, ks, y_bf16[ks], [](float y0, float y1) { return bf16x2(y0, y1); });
    pairs(Y, [&](int, int, int, int c, float& y0, float& y1) { y0 *= bs[c], y1 *= bs[c + 1]; });
    if constexpr (kSplitStage) {  // this warp's reads of M, add, the reverse's dO and the rows are done
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&sh.empty_mid[s]);
    }
    uint32_t y_hi[4][4], y_lo[4][4];
    split_fragments(Y, y_hi, y_lo);
    const float last = p.last[hc];
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) T[j][i] *= last;
    float qy[8][4];
    if constexpr (kSplitStage && !kForward) mbarrier_wait(&sh.full_q[s], (step / 2) & 1);  // the update's queries
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kC / 16; ++ks) {
      const uint32_t rows16 = (2048u * ks) >> 4;
      wgmma_bf16_registers<kKeyTiles, 1>(T, y_hi[ks], keys_mn_desc + stage_units + rows16, 1);
      wgmma_bf16_registers<kKeyTiles, 1>(T, y_lo[ks], keys_mn_desc + stage_units + rows16, 1);
      if constexpr (!kForward) {
        wgmma_bf16_registers<kKeyTiles, 1>(T, d_hi[ks], queries_mn_desc + stage_units + rows16, 1);
        wgmma_bf16_registers<kKeyTiles, 1>(T, d_lo[ks], queries_mn_desc + stage_units + rows16, 1);
      }
    }
    if constexpr (kForward && !kSideO) qy_products(qy, y_bf16, stage_units);
    wgmma_commit();
    if (!kSideO && !kChainTiles && p.Y16)
      store_fragments_transposed(y_bf16, p.Y16 + hc * kC * V + v_global, opaque(V), 16 * warp, lane);
    if constexpr (kChainTiles) {  // the chunk's tiles to the storer
      if (p.Y16) fragments_to_tile(y_bf16, tile_Y(at), warp, lane);
      fence_async_shared();  // the storer's bulk stores read the tiles through the async proxy
      mbarrier_arrive(&sh.handed[s]);
    }
    if constexpr (kSideO) {  // the rest of the hand-off: Y; the o warpgroup may start
      fragments_to_tile(y_bf16, tile_Y(at), warp, lane);
      fence_async_shared();  // the o warpgroup's bulk stores read the tiles through the async proxy
      mbarrier_arrive(&sh.handed[s]);
    }
    wgmma_wait<0>();
    wgmma_hold(T);
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&sh.empty[s]);  // this warp's reads of the stage are done
    if constexpr (kForward && !kSideO) {
      wgmma_hold(qy);
      store_o(o, qy, hc, run, v_global);
    }
  }
  store_transposed(T, p.final_state + state_base);
}

}  // namespace
}  // namespace hybrid::ops::detail
