// The chunked delta rule's sequential state pass (src/ops/delta_state_pass.h) on CUDA, float32:
// for each chunk c of a sequence, in order or reversed, with S the K x BV state tile:
//   before[c] = S;  X = diag(a) K S + add;  Y = M X;  S = last S + extra[c] + K^T diag(b) Y
//
// Tensor cores: every product is mma.sync m16n8k16 on operands split into two bf16 each
// (bf16_split.cuh: 16 significant bits, three products), accumulated in float32; the state
// itself stays float32. A chunk step is latency-bound (kernel notes, step 6): with the operands
// stored split, fragments load with ldmatrix, where 3xTF32 spent most of a warp's instructions
// on per-element loads and splits. The keys and M arrive split already (split_rows_kernel, a
// pass over them before the state pass: splitting them in shared memory took a fifth of a step;
// the backward's M = T^T is split from T as it is transposed). With raw keys (bf16 inputs) the
// keys arrive exact in bf16 with their L2 norm's factors folded into a and b: one plane, and
// two products instead of three for K S and K^T (diag(b) Y).
//
// The raw queries q_raw (bf16 rows with their factors e = s gamma r_q, as the keys) serve two
// fusions, one a direction (Queries). The forward's (kOutput): the queries' share of the output,
// O = diag(e) q_raw S for the state entering the chunk, a second product beside K S in the X
// stage on the same fragments of S (warp_gemm_split_pair), written out as the pass's O; the
// batched product that read `before` back for it goes, and the intra-chunk share is added to O
// after the pass. The queries come with `add` (single-buffered: the X stage is their only user).
// kWholeOutput goes on to the whole output, o = s QKG Y + O, where the shared memory holds QKG
// (split rows, like M) and Y itself rounded to bf16 (diag(b) Y's planes cannot serve: b
// underflows to 0 for strongly decaying gates): one more C x C x BV product a step, off the
// state's chain, instead of the batched product that read O and Y back and wrote o.
// The output's products take S and Y rounded to bf16 (their hi planes), where the chain's take
// them split: o is an output (bf16 in training), and no error of these products reaches the state
// or a gradient, so o's error alone moves (about one more bf16 rounding), for 20 fewer of a warp's
// 120 mma a forward step at 48 columns (O one product where the split took two, QKG Y two where
// three). It goes
// straight into the tokens in o's dtype (o_tokens: each chunk row's token, chunk_tokens.cuh),
// where the layout kernel would read a float32 o back to cast and permute it.
// The forward's `add` (V) can come straight from the tokens (add_tokens: the bf16 rows in the
// float rows' place in shared memory, widened as the X stage reads them), for a layout of the
// batch's rows: the layout kernel's float32 copy of v, written for this pass alone, goes.
// The backward's `extra` = s (diag(gamma) Q)^T dO (K x V a chunk) can be computed in the pass
// instead of read (kExtra: the queries and dO):
// S += q_raw^T D with D = diag(e) dO, a second product of the update stage's form. This saves
// the batched product that wrote it and the pass's reads of it (K V floats a chunk against
// C V of dO). A thread loads its eight (BV = 32) or four elements of dO at the top of the step and
// writes D's split planes after the X stage; the queries arrive by cp.async by the Y barrier.
//
// With dot_with (the backward's S0), each block also adds up <S, dot_with[c]> over its tile of the
// state entering the chunk (the backward's dS_C, for the log-gates), from loads issued at the
// step's top: the finish kernel would otherwise read both K x V tensors again. In the reverse
// passes of the 32-column tiles alone on their SM (kStaged: K = 96 and 128) the producer copies
// those S0 and dO tiles a chunk ahead into shared memory instead, where the step's top reads them.
//
// Tiles: one block of 8 warps per (value tile of BV = 32 or 16 columns, head, sequence), or of 12
// and 16 warps for BV = 48 and 64 (value_tile); value tiles never talk. Warp w owns, for X and Y (C x BV,
// C = 64), rows 16 (w % 4) .. + 15 and the BV / (warps / 4) columns of column group w / 4; for
// the state (K x BV) the 16 x 8 tiles w, w + warps, ...: those stay in registers for
// the whole pass (the float32 master copy), and their split in shared memory feeds the next
// chunk's K S. Shared memory: the chunk's split keys (C x K, a row's hi then its lo bf16;
// double-buffered: the next chunk's arrive by cp.async while this one computes) and split M;
// `add`, a and b (float32); the next chunk's loaded as soon as this chunk is done with them, by
// cp.async, or for M, a, b (and QKG) in the wide forward tiles (kBulk) by bulk copies of thread 0
// on an mbarrier; the splits of the state, X and diag(b) Y. Row strides are odd multiples of 16
// bytes (ldmatrix without bank conflicts), except M's and QKG's: rows of 256 bytes, swizzled
// (bf16_split.cuh), so that a matrix is the same dense block in global and shared memory. At most
// 189 KB (K = 256, BV = 16), 112 KB at K = 96, BV = 32 (two blocks an SM); raw keys take half the
// keys' share (87 KB at K = 96, BV = 32; 133 KB at BV = 48 with the queries and D, one block an
// SM, 206 KB with the staged S0 and dO tiles; 184 KB at K = 128, BV = 64 with the queries, QKG and
// Y in bf16).
// Copies: the first 8 warps issue them between their products, except in the 48-column tiles and
// the 32-column ones alone on their SM (kAlone), whose block has one more warpgroup
// (producer_warps) that issues them all and computes nothing:
// its loop meets the computing warps' three barriers a step, its cp.async groups waited for before
// the barrier that publishes them, as the copying warps' were.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "bf16_split.cuh"
#include "chunk_tokens.cuh"
#include "cp_async.cuh"
#include "reductions.cuh"
#include "vector_access.cuh"

namespace hybrid::ops::detail {
namespace {


constexpr int kC = 64;  // chunk length
// Warps a block for a value tile: 8, or 12 and 16 for the 48- and 64-column tiles, so that each
// warp's share of X, Y and the state is the same at every tile width (the wide tiles are one
// block an SM doing 1.5 and 2 times a 32-column block's work; see value_tile): the computing warps.
// copy_async runs on the first kCopyThreads threads whatever the block's size, or on the producer's.
__host__ __device__ constexpr int warps_for(int BV) { return BV == 48 ? 12 : BV == 64 ? 16 : kCopyWarps; }
// The 48-column tiles, and the 32-column ones where each block has an SM to itself (`alone`),
// add a producer warpgroup (4 warps) that issues every copy of a step, so that the computing
// warps issue none (a step follows its instruction count, kernel notes step 21): registers moved
// between the warpgroups with setmaxnreg, kProducerRegisters for the producer and
// consumer_registers for the others, within the block's pool at launch (48 columns: 512 threads
// at 128, 3 x 128 x 152 + 128 x 40 <= 65,536; 32 alone: 384 at 168, 256 x 200 + 128 x 40 <= 64,512,
// where the block compiled for two an SM got 128 and spilled at K = 128).
__host__ __device__ constexpr int producer_warps(int BV, bool alone = false) { return BV == 48 || alone ? 4 : 0; }
__host__ __device__ constexpr int threads_for(int BV, bool alone = false) {
  return 32 * (warps_for(BV) + producer_warps(BV, alone));
}
constexpr int kProducerRegisters = 40;
__host__ __device__ constexpr int consumer_registers(int BV) { return BV == 48 ? 152 : 200; }
// Register reallocation between warpgroups (sm_90, all of a warpgroup's warps): a producer gives
// registers back, the computing warpgroups take them, within the block's allocation (launch bounds
// of one block an SM make it known to ptxas). Also the registers passes'.
template <int kRegisters>
__device__ __forceinline__ void registers_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void registers_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
constexpr int kMaxStateTiles = 4;  // 16 x 8 state tiles per warp: K * BV <= 4096
// A chunk's M (or QKG) in split rows, swizzled (split_chunk_matrices): dense, in global memory as
// in shared memory, so one bulk copy moves it.
constexpr uint32_t kMatrixBytes = sizeof(float) * kC * kC;

// M (and QKG) point at swizzled split rows (split_chunk_matrices); k at split rows,
// or, with raw keys, at rows of K bf16 exact keys (then a and b carry the keys' row scales).
struct Params {
  const float *k, *a, *b, *last, *add, *M, *extra, *init;
  const float *q, *q_factor, *dO;  // kExtra and kOutput: q_raw rows (as raw keys), e; kExtra: dO
  const float* dot_with;           // or null: dots[hc][tile] = <before[hc], dot_with[hc]> over the tile
  const int64_t* chunk_offsets;
  float *before, *X, *Y, *final_state, *dots;
  float* O;  // kOutput: [H, NC, C, V], the queries' share; kWholeOutput: o
  const float* QKG;  // kWholeOutput: [H, NC, C, C] swizzled split rows (as M), and o's scale s
  float output_scale;
  void* o_tokens;  // kWholeOutput, or null: o into [B, T, H, V] (bf16 with o_bf16, else float32), not O
  // Or null: `add` straight from the tokens, bf16 [B, T, H, V] with token b T + t at element
  // b T add_token + t add_token (a column window of the packed qkv too). A chunk's rows are
  // consecutive tokens, then padding: of one batch row (a layout of rows: token_rows), or with
  // add_runs (documents, B = 1) each chunk's run [NC][2]: its first token and its number of tokens.
  const uint16_t* add_tokens;
  int64_t add_token, add_head;
  const int64_t* add_runs;
  ChunkTokens token_rows;  // with o_tokens or add_tokens: the token of each chunk row
  bool o_bf16;
  int H, NC, K, V;
  bool reverse;
  RowPieces key_pieces;  // the keys' and queries' rows, for copy_async (a kernel argument: no register)
  // Or null: before, X and Y in bf16 here (StatePassInputs::kept_bf16: the registers passes, and
  // the instances here that box all three for bulk stores; before, X and Y null then).
  uint16_t *before16 = nullptr, *X16 = nullptr, *Y16 = nullptr;
  // Or null: the reverse pass's dO in bf16 here (o's gradient, bf16 values), dO null, where the
  // pass keeps bf16 (the same instances).
  const uint16_t* dO16 = nullptr;
  // Or null: the reverse pass's `add` in bf16 [H, NC, C, V] here (output_grad rounds it so beside
  // dO in bf16), add null; widened where the X stage reads it, as add_tokens' values. Read by the
  // kKept16 instances alone (the op's reverse pass where it keeps bf16; the host widens add for
  // the others): in the float32 kExtra instances the check changed ptxas's register allocation,
  // with spills.
  const uint16_t* add16 = nullptr;
  // Or null: the reverse registers pass of one chain a block counts each chunk's dV' (X16) into
  // chunk_ready[hc] once stored, and each block into *blocks_started as it starts (chunk_ready.cuh).
  int *chunk_ready = nullptr, *blocks_started = nullptr;
};
// Where the kept intermediates go out by bulk tensor stores (bulk_store_rows): before, X and Y as 2D
// tensors [H NC K, V] and [H NC C, V], boxes of K or C rows by 8 columns. An argument of its own:
// in Params, their 64-byte alignment changed the register allocation of instances that take none
// (a 64-column reverse pass spilled 20 bytes in its loop).
struct StoreMaps {
  CUtensorMap before, X, Y;
};

// Row strides: keys in floats (split: 4K + 16 bytes, an odd number of 16-byte units as K % 8 ==
// 0; raw bf16: 2K + 16 bytes, odd as K % 16 == 0); the split planes of the state, X and diag(b) Y
// in bf16 (2 BV + 16 bytes); `add` in floats.
__host__ __device__ constexpr int key_row_floats(int K, bool raw) { return raw ? K / 2 : K; }
__host__ __device__ constexpr int keys_stride(int K, bool raw) { return key_row_floats(K, raw) + 4; }
__host__ __device__ constexpr int plane_stride(int BV) { return BV + 8; }
__host__ __device__ constexpr int add_stride(int BV) { return BV + 4; }

// What the pass does with raw queries: nothing, the backward's extra, the forward's output share
// O = diag(e) q_raw S, or the forward's whole output o = s QKG Y + O.
enum class Queries { kNone, kExtra, kOutput, kWholeOutput };

// With queries, also the chunk's raw queries (rows like raw keys); for kExtra D's split planes;
// for kWholeOutput QKG (as M) and Y's hi plane.
// The last 48 bytes: two chunks' runs of tokens where V comes from the tokens (copy_values_async),
// then the mbarriers of M's and QKG's bulk copies.
constexpr size_t kRunsBytes = 2 * 2 * sizeof(int64_t), kTailBytes = kRunsBytes + 2 * sizeof(uint64_t);
// The reverse pass of the 32-column tiles alone on their SM (kAlone) stages the tiles a step's top
// reads (S0 for the dots, dO for D) a chunk ahead in shared memory: two buffers of K + C rows of
// BV floats, in the instances compiled for K = 96 and 128 (raw keys). Measured (twenty-ninth
// session, H200): -78 us of 1,178 for that pass at B2 T16384 K128, but +14 us of 674 for the
// 48-column tiles (whose producer then also staged) at the OLMo shape: those read from global
// memory as before. Rows BV + 8 floats apart:
// a half-warp's 8-byte reads of four rows (the state tiles' g) then fall on distinct banks.
__host__ __device__ constexpr int staged_stride(int BV) { return BV + 8; }
__host__ __device__ constexpr size_t staged_bytes(int K, int BV) {
  return 2 * sizeof(float) * (K + kC) * staged_stride(BV);
}
__host__ __device__ constexpr size_t unstaged_shared_bytes(int K, int BV, bool raw, Queries queries) {
  const size_t planes = 2 * sizeof(uint16_t) * kC * plane_stride(BV);
  const size_t d_planes = queries == Queries::kExtra ? planes : 0;
  const size_t whole_output = queries == Queries::kWholeOutput ? sizeof(float) * kC * kC + planes / 2 : 0;
  return sizeof(float) * (2 * kC * keys_stride(K, raw) + kC * kC + kC * add_stride(BV) + 2 * kC) +
         2 * sizeof(uint16_t) * (K + 2 * kC) * plane_stride(BV) +
         (queries != Queries::kNone ? sizeof(float) * kC * keys_stride(K, true) + d_planes + whole_output : 0) +
         kTailBytes;
}
__host__ __device__ constexpr bool stages_step_loads(int K, int BV, bool raw, Queries queries, bool alone) {
  return raw && (K == 96 || K == 128) && alone && queries == Queries::kExtra &&
         unstaged_shared_bytes(K, BV, raw, queries) + staged_bytes(K, BV) <= 227 * 1024;
}
// The kept intermediates (the state entering the chunk, X, Y) by bulk tensor stores from shared
// memory, issued by the producer, where the computing warps stored them to global memory
// themselves: their stores' registers were read only after the shared-memory traffic queued before
// them, and the next instructions writing those registers waited (long-scoreboard stalls, +100 us
// a pass at the OLMo shape; kernel notes, step 31). Boxes of 8 columns: a tile's rows in strips of
// 8 floats, so that a warp's 8-byte writes of an mma tile fill 256 consecutive bytes (no bank
// conflicts, where rows of 48 floats put four of a warp's eight rows on the same banks); `rows`
// rows of BV floats and 128 bytes for the boxes' alignment.
__host__ __device__ constexpr size_t bulk_store_bytes(int rows, int BV) { return sizeof(float) * rows * BV + 128; }
// The rows boxed at K = 96 and 128 (raw keys): K + 2 C (before, X and Y) where they fit, in the
// tiles with a producer (48 columns, 32 alone: all fit) and in the 64-column forward passes, whose
// computing thread 0 issues the stores (no producer there: 16 computing warps take the register
// file); there 2 C (X and Y alone) where before's box does not fit beside the queries (K = 128:
// -24 us of 869 at B8 T4096, thirty-fourth session). Not the 64-column reverse pass: +36 us there
// (12 bytes spilled). 0: plain stores.
__host__ __device__ constexpr int bulk_store_rows(int K, int BV, bool raw, Queries queries, bool alone) {
  const bool computing_thread_stores = producer_warps(BV, alone) == 0;
  if (!raw || (K != 96 && K != 128) || (computing_thread_stores && (BV != 64 || queries == Queries::kExtra))) return 0;
  const size_t base = unstaged_shared_bytes(K, BV, raw, queries) +
                      (stages_step_loads(K, BV, raw, queries, alone) ? staged_bytes(K, BV) : 0);
  if (base + bulk_store_bytes(K + 2 * kC, BV) <= 227 * 1024) return K + 2 * kC;
  return computing_thread_stores && base + bulk_store_bytes(2 * kC, BV) <= 227 * 1024 ? 2 * kC : 0;
}
__host__ __device__ constexpr size_t shared_bytes(int K, int BV, bool raw, Queries queries, bool alone = false) {
  const int boxed = bulk_store_rows(K, BV, raw, queries, alone);
  return unstaged_shared_bytes(K, BV, raw, queries) +
         (stages_step_loads(K, BV, raw, queries, alone) ? staged_bytes(K, BV) : 0) +
         (boxed ? bulk_store_bytes(boxed, BV) : 0);
}

// An operand the kernel splits itself into shared memory: a hi plane of `rows` rows of ld bf16,
// its lo plane right after it. One description for the writes and for ldmatrix's reads.
struct SplitPlanes {
  uint16_t* hi;
  int ld, rows;
  // The pair (r, c), (r, c + 1), split and written.
  __device__ __forceinline__ void store(int r, int c, float x0, float x1) const {
    const SplitPair s = split_pair(x0, x1);
    *reinterpret_cast<uint32_t*>(hi + r * ld + c) = s.hi;
    *reinterpret_cast<uint32_t*>(hi + rows * ld + r * ld + c) = s.lo;
  }
  // The pair rounded to bf16, into the hi plane alone (for products that take it alone).
  __device__ __forceinline__ void store_hi(int r, int c, float x0, float x1) const {
    *reinterpret_cast<uint32_t*>(hi + r * ld + c) = bf16x2(x0, x1);
  }
  __device__ __forceinline__ SplitOperand operand() const {
    return SplitOperand{static_cast<uint32_t>(__cvta_generic_to_shared(hi)), 2 * ld, 2 * rows * ld};
  }
};

// `add` for a chunk of head h from the tokens (p.add_tokens): BV bf16 a row from column v0, into
// shared memory at ld floats a row (the bf16 row in the float row's first half); the chunk's run
// (run[0] its first token, b T + t, run[1] its number of tokens), then padding rows of zeros;
// copy_async's order of pieces (rp for BV / 2 floats a row).
__device__ __forceinline__ void copy_values_async(float* dst, int ld, const Params& p, const int64_t (&run)[2], int h,
                                                  int v0, RowPieces rp, uint32_t copier) {
  const uint32_t t = copier, row = __umulhi(t, rp.inverse), piece = t - row * rp.pieces;
  if (row >= rp.rows_per_round) return;
  const uint16_t* src = p.add_tokens + run[0] * p.add_token + h * p.add_head + v0 + 8 * piece;
  const uint32_t rows = static_cast<uint32_t>(run[1]);
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst)) + 4u * (row * static_cast<uint32_t>(ld)) + 16u * piece;
#pragma unroll 1
  for (uint32_t r = row; r < static_cast<uint32_t>(kC); r += rp.rows_per_round) {
    const bool valid = r < rows;
    cp_async16_or_zeros(d + 4u * (r - row) * static_cast<uint32_t>(ld), valid ? src + r * p.add_token : p.add_tokens,
                        valid);
  }
}

// Chunk c's (of a head) run into `run`, by one thread: with documents (add_runs) by cp.async in
// the caller's group, or as a plain load (`now`); in a layout of rows by token_of's arithmetic.
__device__ __forceinline__ void fetch_run(const Params& p, int64_t c, int64_t (&run)[2], bool now) {
  if (p.add_runs && now) {
    run[0] = p.add_runs[2 * c], run[1] = p.add_runs[2 * c + 1];
  } else if (p.add_runs) {
    cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(run)), reinterpret_cast<const float*>(p.add_runs + 2 * c));
  } else {
    const Token first = token_of(p.token_rows, c * kC);
    run[0] = first.b * p.token_rows.T + first.t;
    run[1] = first.b < 0 ? 0 : min(static_cast<int64_t>(kC), p.token_rows.T - first.t);
  }
}

// kK: the key head dim fixed at compile time (0: p.K). The common ones (OLMo Hybrid's 96, 128)
// get their own instances: the k-loops then unroll with constant shared-memory offsets and each
// warp's set of state tiles is known, where with K at run time every step recomputed addresses
// and loop bounds (about a tenth of a step's instructions, ncu's source page, sixteenth session).
// kAlone: a 32-column block with an SM to itself (chosen in launch), with the producer warpgroup.
// kKept16: before, X and Y kept in bf16 (p.before16, X16, Y16), in the instances that box all
// three for bulk stores (host: mma_pass_boxes_kept); the reverse one reads dO in bf16 (p.dO16).
template <int BV, bool kRawKeys, Queries kQ, int kK = 0, bool kAlone = false, bool kKept16 = false>
__global__ void __launch_bounds__(threads_for(BV, kAlone), BV >= 48 || kAlone ? 1 : 2)
    state_pass_kernel(const Params p, const __grid_constant__ StoreMaps maps) {
  static_assert(!kKept16 || (kK != 0 && bulk_store_rows(kK, BV, kRawKeys, kQ, kAlone) == kK + 2 * kC),
                "bf16 kept intermediates: the instances that box all three");
  constexpr bool kFusedExtra = kQ == Queries::kExtra, kWholeOutput = kQ == Queries::kWholeOutput;
  constexpr bool kFusedOutput = kQ == Queries::kOutput || kWholeOutput;
  // M, a, b and QKG by bulk copies (cp_async.cuh) in the forward passes with queries at the wide
  // tiles (one block an SM, registers to spare: 137 instead of 168 at the OLMo shape's 48 columns):
  // the copying warps' instructions for them go, about -6% on the forward pass (kernel notes, step
  // 22). Not in the reverse pass (+4% measured with them: fewer instructions, yet longer waits on
  // dot_with's loads), nor at 32 and 16 columns (128 registers: the code around the copy spilled).
  constexpr bool kBulk = kFusedOutput && BV >= 48;
  static_assert(kRawKeys || kQ == Queries::kNone, "raw queries come with raw keys");
  static_assert(!kAlone || BV == 32, "a producer alone on its SM: the 32-column tile");
  constexpr int kWarps = warps_for(BV), kThreads = 32 * kWarps;
  constexpr int kXT = BV / (2 * kWarps);  // 8-column tiles per warp in X and Y (kWarps / 4 column groups)
  static_assert(kXT == 1 || kXT == 2, "a warp's X and Y columns: one or two 8-column tiles");
  constexpr int kStateCols = BV / 8;  // 8-column tiles across the state
  static_assert(kWarps % kStateCols == 0, "a warp's state tiles share their columns (the update stage)");
  constexpr int ldp = plane_stride(BV), lda = add_stride(BV);
  extern __shared__ __align__(16) float smem[];
  __shared__ float dot_parts[kWarps];
  const int K = kK ? kK : p.K, V = p.V, ldk = keys_stride(K, kRawKeys), key_row = key_row_floats(K, kRawKeys);
  // Who copies: the producer warpgroup's threads (copier 0 .. kCopiers - 1 after the computing
  // warps' threads), or the first kCopyThreads threads of the block; copier 0 issues the bulk copies.
  constexpr bool kProducer = producer_warps(BV, kAlone) > 0;
  constexpr int kCopiers = kProducer ? 32 * producer_warps(BV, kAlone) : kCopyThreads;
  const uint32_t copier = threadIdx.x - (kProducer ? 32 * kWarps : 0);
  const RowPieces key_pieces = kK          ? row_pieces(key_row_floats(kK, kRawKeys), kCopiers)
                               : kProducer ? row_pieces(key_row, kCopiers)
                                           : p.key_pieces;
  float* keys = smem;                // [2][C][ldk]: two buffers of split rows
  float* Ms = keys + 2 * kC * ldk;   // [C][C], swizzled split rows
  float* adds = Ms + kC * kC;        // [C][lda]
  float* as = adds + kC * lda;       // [C]
  float* bs = as + kC;               // [C]
  uint16_t* Sp = reinterpret_cast<uint16_t*>(bs + kC);  // [2][K][ldp]: hi plane, lo plane
  uint16_t* Xp = Sp + 2 * K * ldp;   // [2][C][ldp]
  uint16_t* Yp = Xp + 2 * kC * ldp;  // [2][C][ldp], diag(b) Y
  uint16_t* Dp = Yp + 2 * kC * ldp;  // kFusedExtra: [2][C][ldp], D = diag(e) dO
  float* Qs = reinterpret_cast<float*>(Dp + (kFusedExtra ? 2 * kC * ldp : 0));  // [C][ldk], raw queries
  float* QKGs = Qs + kC * ldk;                                  // kWholeOutput: [C][C], as M
  uint16_t* Yup = reinterpret_cast<uint16_t*>(QKGs + kC * kC);  // kWholeOutput: [C][ldp], Y in bf16
  const SplitPlanes S_planes{Sp, ldp, K}, X_planes{Xp, ldp, kC}, Y_planes{Yp, ldp, kC}, D_planes{Dp, ldp, kC};
  const SplitPlanes Yu_planes{Yup, ldp, kC};
  const SplitOperand S_op = S_planes.operand(), X_op = X_planes.operand(), Y_op = Y_planes.operand();
  const SplitOperand M_op{shared_address(Ms), 4 * kC, 2 * kC, true};
  const SplitOperand Q_op{shared_address(Qs), 4 * ldk, 0}, D_op = D_planes.operand();
  const SplitOperand QKG_op{shared_address(QKGs), 4 * kC, 2 * kC, true}, Yu_op = Yu_planes.operand();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  // This warp's rows and columns of X and Y, and its state tiles.
  const int xr = 16 * (warp % 4), xc = (warp / 4) * 8 * kXT;
  const int state_tiles = (K / 16) * kStateCols;
  auto state_row = [&](int r) { return 16 * ((warp + kWarps * r) / kStateCols); };
  auto state_col = [&](int r) { return 8 * ((warp + kWarps * r) % kStateCols); };
  auto owns = [&](int r) { return warp + kWarps * r < state_tiles; };

  // The state, in registers: tile r, element e at row state_row(r) + g + 8 (e / 2), column
  // state_col(r) + 2t + e % 2.
  float Sreg[kMaxStateTiles][4];
  const int64_t state_base = (static_cast<int64_t>(n) * p.H + h) * K * V + v0;
#pragma unroll
  for (int r = 0; r < kMaxStateTiles; ++r) {
    if (!owns(r) || (kProducer && warp >= kWarps)) continue;  // the producer's warps hold no state
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = state_row(r) + g + 8 * half, col = state_col(r) + 2 * t;
      // No init: the state starts at zero.
      const float2 s = p.init ? ld2(p.init + state_base + static_cast<int64_t>(row) * V + col) : make_float2(0.f, 0.f);
      Sreg[r][2 * half] = s.x, Sreg[r][2 * half + 1] = s.y;
      S_planes.store(row, col, s.x, s.y);
    }
  }

  const int64_t begin = p.chunk_offsets[n], n_chunks = p.chunk_offsets[n + 1] - begin;
  auto chunk = [&](int64_t step) {
    return static_cast<int64_t>(h) * p.NC + (p.reverse ? begin + n_chunks - 1 - step : begin + step);
  };
  // The widths of the other tiles copied every step by cp.async: `add` (BV), M, a and b (C).
  constexpr RowPieces add_pieces = row_pieces(BV, kCopiers), chunk_pieces = row_pieces(kC, kCopiers),
                      value_pieces = row_pieces(BV / 2, kCopiers);
  // What a chunk needs besides its keys, loaded as soon as the previous chunk is done with it:
  // `add` and a once X is out, M and b once Y is.
  // With V from the tokens (forward passes only), the runs of the chunks whose values come next,
  // each fetched by thread 0 with the values before it: no load or token arithmetic waits on the
  // chain, and the copying threads read two numbers.
  // At the end of the dynamic shared memory (a static array would shift every operand by its size).
  int64_t(*runs)[2] = reinterpret_cast<int64_t(*)[2]>(
      reinterpret_cast<char*>(smem) + shared_bytes(K, BV, kRawKeys, kQ, kAlone) - kTailBytes);
  // kStaged (the reverse pass alone on its SM): the tiles a step's top reads, S0 for the dots and
  // dO for D, copied by the producer a chunk ahead into two buffers right before the tail, where
  // the computing warps read them from global memory at the step's top and waited on them (the
  // pass's longest stall, kernel notes steps 16, 22 and 27: L2 hits waited as long as DRAM).
  constexpr bool kStaged = kK != 0 && stages_step_loads(kK, BV, kRawKeys, kQ, kAlone);
  constexpr int lds = staged_stride(BV);
  float* staged = reinterpret_cast<float*>(reinterpret_cast<char*>(runs) - (kStaged ? staged_bytes(K, BV) : 0));
  float* staged_dO = staged + 2 * K * lds;  // [2][C][lds] after the S0 tiles' [2][K][lds]
  // kBulkStores: the boxes of the kept intermediates below the staged tiles, 128-byte aligned:
  // [BV / 8][K][8] for the state entering the chunk, [BV / 8][C][8] for X, then for Y; element
  // (row, col) of a tile at (col / 8, row, col % 8).
  // kBoxedBefore: the state entering the chunk boxed too (bulk_store_rows).
  constexpr int kBoxedRows = kK != 0 ? bulk_store_rows(kK, BV, kRawKeys, kQ, kAlone) : 0;
  constexpr bool kBulkStores = kBoxedRows > 0, kBoxedBefore = kBoxedRows == kK + 2 * kC;
  float *box_before = nullptr, *box_X = nullptr, *box_Y = nullptr;
  if constexpr (kBulkStores) {
    char* start = reinterpret_cast<char*>(staged) - bulk_store_bytes(kBoxedRows, BV);
    box_before = reinterpret_cast<float*>(start + (128 - shared_address(start) % 128) % 128);
    box_X = box_before + (kBoxedBefore ? K * BV : 0), box_Y = box_X + kC * BV;
  }
  // The producer's first thread's part: the boxes written before the X barrier out after it, Y's after the Y
  // barrier, and their reads of shared memory waited for before the next chunk's first barrier.
  // kKept16: the boxes hold bf16, half their bytes used, and go out as bf16.
  // (Asked of the parameters at each use: values held across the chunk loop cost registers.)
  constexpr int box_bytes = kKept16 ? 2 : 4;
  auto keeps_before = [&] { return kKept16 ? p.before16 != nullptr : p.before != nullptr; };
  auto keeps_X = [&] { return kKept16 ? p.X16 != nullptr : p.X != nullptr; };
  auto store_strips = [&](const CUtensorMap& map, const float* box, int rows, int64_t hc) {
#pragma unroll
    for (int s = 0; s < BV / 8; ++s)
      bulk_store_2d(&map, reinterpret_cast<const char*>(box) + s * rows * 8 * box_bytes, v0 + 8 * s,
                    static_cast<int>(hc * rows));
  };
  // The pair (row, col), (row, col + 1) of a tile of `rows` rows into its box, in strips of 8 columns.
  auto box_store = [&](float* box, int rows, int row, int col, float x0, float x1) {
    const int at = ((col / 8) * rows + row) * 8 + col % 8;
    if constexpr (kKept16) *reinterpret_cast<uint32_t*>(reinterpret_cast<uint16_t*>(box) + at) = bf16x2(x0, x1);
    else st2(box + at, x0, x1);
  };
  auto store_x_boxes = [&](int64_t hc) {
    if (kBoxedBefore && keeps_before()) store_strips(maps.before, box_before, K, hc);
    if (keeps_X()) store_strips(maps.X, box_X, kC, hc);
    bulk_stores_commit();
  };
  auto store_y_box = [&](int64_t hc) {
    store_strips(maps.Y, box_Y, kC, hc);
    bulk_stores_commit();
  };
  // With kBulk, the bulk copies (thread 0 issues them) complete a phase of their mbarrier a chunk
  // step, step s waiting for parity s % 2: chunk_bar's a, M and b (a with the X operands, then an
  // arrival with M and b: the phase cannot complete before them), QKG_bar's QKG.
  uint64_t* chunk_bar = reinterpret_cast<uint64_t*>(runs + 2);
  uint64_t* QKG_bar = chunk_bar + 1;
  if constexpr (kBulk) {
    if (threadIdx.x == 0) mbarrier_init(chunk_bar, 1), mbarrier_init(QKG_bar, 1);
    __syncthreads();
  }
  constexpr uint32_t kRowBytes = sizeof(float) * kC;  // a's and b's for a chunk
  auto load_x_operands = [&](int64_t hc) {
    if (p.add_tokens) {  // forward: the chunks in order, runs[its step's parity]
      const int64_t c = hc - static_cast<int64_t>(h) * p.NC, step = c - begin;
      copy_values_async(adds, lda, p, runs[step % 2], h, v0, value_pieces, copier);
      if (copier == 0 && step + 1 < n_chunks) fetch_run(p, c + 1, runs[(step + 1) % 2], false);
    } else if (kKept16 && p.add16) {  // a row's BV bf16 as BV / 2 floats, in the float row's first half
      copy_async(adds, lda, reinterpret_cast<const float*>(p.add16 + hc * kC * V + v0), V / 2, kC, value_pieces,
                 copier);
    } else {
      copy_async(adds, lda, p.add + hc * kC * V + v0, V, kC, add_pieces, copier);
    }
    if (!kBulk) {
      copy_async(as, kC, p.a + hc * kC, kC, 1, chunk_pieces, copier);
    } else if (copier == 0) {
      mbarrier_expect_bytes(chunk_bar, kRowBytes);
      bulk_copy(as, p.a + hc * kC, kRowBytes, chunk_bar);
    }
    if constexpr (kFusedOutput) copy_async(Qs, ldk, p.q + hc * kC * key_row, key_row, kC, key_pieces, copier);
    cp_async_commit();
  };
  auto load_y_operands = [&](int64_t hc) {
    if (!kBulk) {
      copy_async(Ms, kC, p.M + hc * kC * kC, kC, kC, chunk_pieces, copier);
      copy_async(bs, kC, p.b + hc * kC, kC, 1, chunk_pieces, copier);
      cp_async_commit();
    } else if (copier == 0) {
      mbarrier_arrive_expect_bytes(chunk_bar, kMatrixBytes + kRowBytes);
      bulk_copy(Ms, p.M + hc * kC * kC, kMatrixBytes, chunk_bar);
      bulk_copy(bs, p.b + hc * kC, kRowBytes, chunk_bar);
    }
  };
  // kStaged: chunk `step`'s S0 and dO tiles into buffer step % 2, in the caller's group.
  auto stage_step_loads = [&](int64_t step) {
    const int64_t hc = chunk(step);
    if (p.dot_with)
      copy_async(staged + (step % 2) * K * lds, lds, p.dot_with + hc * K * V + v0, V, K, add_pieces, copier);
    if constexpr (kKept16)  // a row's BV bf16 as BV / 2 floats
      copy_async(staged_dO + (step % 2) * kC * lds, lds, reinterpret_cast<const float*>(p.dO16 + hc * kC * V + v0),
                 V / 2, kC, value_pieces, copier);
    else
      copy_async(staged_dO + (step % 2) * kC * lds, lds, p.dO + hc * kC * V + v0, V, kC, add_pieces, copier);
  };
  // The copies issued after a step's first barrier: with kFusedExtra the chunk's queries (the
  // oldest group in flight at the Y barrier, which waits for it), with kWholeOutput QKG (used after
  // the Y barrier), the next chunk's keys, and with kStaged its S0 and dO tiles (waited for at the
  // next step's top, a whole step later).
  auto copies_at_top = [&](int64_t step, int64_t hc) {
    if constexpr (kFusedExtra) {
      copy_async(Qs, ldk, p.q + hc * kC * key_row, key_row, kC, key_pieces, copier);
      cp_async_commit();
    }
    if constexpr (kWholeOutput && !kBulk) {
      copy_async(QKGs, kC, p.QKG + hc * kC * kC, kC, kC, chunk_pieces, copier);
      cp_async_commit();
    }
    if (kWholeOutput && kBulk && copier == 0) {
      mbarrier_arrive_expect_bytes(QKG_bar, kMatrixBytes);
      bulk_copy(QKGs, p.QKG + hc * kC * kC, kMatrixBytes, QKG_bar);
    }
    if (step + 1 < n_chunks) {
      copy_async(keys + ((step + 1) % 2) * kC * ldk, ldk, p.k + chunk(step + 1) * kC * key_row, key_row, kC,
                 key_pieces, copier);
      cp_async_commit();
      if constexpr (kStaged) {
        stage_step_loads(step + 1);
        cp_async_commit();
      }
    }
  };
  // Before the Y barrier: the queries' (QKG's) group in; the next keys', staged tiles' and X
  // operands' may stay.
  auto wait_before_y = [&](int64_t step) {
    if constexpr (kFusedExtra || (kWholeOutput && !kBulk)) {
      if (step + 1 < n_chunks) cp_async_wait<kStaged ? 3 : 2>();
      else cp_async_wait_all();
    }
  };
  if (n_chunks > 0) {
    copy_async(keys, ldk, p.k + chunk(0) * kC * key_row, key_row, kC, key_pieces, copier);
    if constexpr (kStaged) stage_step_loads(0);  // in load_x_operands' group
    if (p.add_tokens) {  // the first chunk's run, once
      if (copier == 0) fetch_run(p, chunk(0) - static_cast<int64_t>(h) * p.NC, runs[0], true);
      __syncthreads();
    }
    load_x_operands(chunk(0));
    load_y_operands(chunk(0));
  }
  // The producer: the copies of every step between the block's three barriers a step (the same
  // barriers as the computing warps', reached from this loop), then nothing more.
  if constexpr (kProducer) {
    if (warp >= kWarps) {
      registers_decrease<kProducerRegisters>();
      const bool issues_stores = kBulkStores && copier == 0;
      for (int64_t step = 0; step < n_chunks; ++step) {
        const int64_t hc = chunk(step);
        if (issues_stores) bulk_stores_wait_reads();  // the boxes free for this chunk's rows
        cp_async_wait_all();
        __syncthreads();  // this chunk's operands are in
        copies_at_top(step, hc);
        __syncthreads();  // X complete
        if (issues_stores) store_x_boxes(hc);
        if (step + 1 < n_chunks) load_x_operands(chunk(step + 1));
        wait_before_y(step);
        __syncthreads();  // diag(b) Y complete
        if (issues_stores) store_y_box(hc);
        if (step + 1 < n_chunks) load_y_operands(chunk(step + 1));
      }
      if (issues_stores) bulk_stores_wait();
      return;
    }
    registers_increase<consumer_registers(BV)>();
  }
  // Without a producer, the computing block's first thread issues the bulk stores, as the
  // producer's first thread does: a step after their boxes were written, so that its wait for
  // their reads at the next step's top finds them done.
  const bool issues_stores = kBulkStores && !kProducer && threadIdx.x == 0;
  for (int64_t step = 0; step < n_chunks; ++step) {
    const int64_t hc = chunk(step);  // (head, chunk) index
    float* kc = keys + (step % 2) * kC * ldk;
    if constexpr (!kProducer) cp_async_wait_all();
    if constexpr (kBulk) mbarrier_wait(chunk_bar, static_cast<uint32_t>(step) & 1u);
    if (issues_stores) bulk_stores_wait_reads();  // the boxes free for this chunk's rows
    __syncthreads();  // this chunk's operands are in; everyone is done with the previous chunk
    if constexpr (!kProducer) copies_at_top(step, hc);
    const SplitOperand K_op{shared_address(kc), 4 * ldk, kRawKeys ? 0 : 2 * K};
    // kFusedExtra: this chunk's queries (in by the Y barrier), and this thread's piece of dO: row
    // d_row, columns d_col .. + BV / 4 - 1, with the row's factor.
    constexpr int kRowThreads = kThreads / kC, kDCols = BV / kRowThreads, kD4 = kDCols / 4;  // float4 pieces a thread
    static_assert(kRowThreads * kC == kThreads && kD4 * 4 * kRowThreads == BV, "dO's pieces cover the C x BV tile");
    const int d_row = threadIdx.x / kRowThreads, d_col = (threadIdx.x % kRowThreads) * kDCols;
    float4 d_piece[kD4];
    float d_factor = 0.f, o_factor[2] = {};  // kFusedOutput: e of this thread's two rows of O
    if constexpr (kFusedOutput) o_factor[0] = p.q_factor[hc * kC + xr + g], o_factor[1] = p.q_factor[hc * kC + xr + g + 8];
    // kWholeOutput into the tokens: where this thread's two rows of o go (-1: padding).
    // With V from the tokens, o's tokens are V's (state_pass_cuda checks): the chunk's run gives
    // them (first token, count), where token_of's arithmetic ran for both rows every step.
    [[maybe_unused]] int64_t o_at[2] = {-1, -1};
    if constexpr (kWholeOutput) {
      if (p.o_tokens) {
        const int64_t* run = p.add_tokens ? runs[step % 2] : nullptr;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = xr + g + 8 * half;
          if (run) {
            if (row < run[1]) o_at[half] = ((run[0] + row) * p.H + h) * V + v0;
            continue;
          }
          const Token tok = token_of(p.token_rows, (hc - static_cast<int64_t>(h) * p.NC) * kC + row);
          if (tok.b >= 0) o_at[half] = ((tok.b * p.token_rows.T + tok.t) * p.H + h) * V + v0;
        }
      }
    }
    if constexpr (kFusedExtra && kKept16) {  // bf16: four values in 8 bytes (staged: rows lds floats apart)
      const uint16_t* d_at =
          kStaged ? reinterpret_cast<const uint16_t*>(staged_dO + (step % 2) * kC * lds + d_row * lds) + d_col
                  : p.dO16 + hc * kC * V + v0 + d_row * V + d_col;
#pragma unroll
      for (int i = 0; i < kD4; ++i) d_piece[i] = bf16x4_floats(*reinterpret_cast<const uint2*>(d_at + 4 * i));
      d_factor = p.q_factor[hc * kC + d_row];
    } else if constexpr (kFusedExtra) {
      const float* d_at = kStaged ? staged_dO + (step % 2) * kC * lds + d_row * lds + d_col
                                  : p.dO + hc * kC * V + v0 + d_row * V + d_col;
#pragma unroll
      for (int i = 0; i < kD4; ++i) d_piece[i] = *reinterpret_cast<const float4*>(d_at + 4 * i);
      d_factor = p.q_factor[hc * kC + d_row];
    }

    // `extra` in (used at the end of the chunk), loads issued first; none when it is computed here.
    const float last = p.last[hc];
    float extra[kMaxStateTiles][4] = {};
    // Per-chunk pointers, 32-bit offsets inside the chunk (K V and C V are at most 2^16).
    float* before = p.before ? p.before + hc * K * V + v0 : nullptr;
    // Neither is read by a pass that takes the queries in the forward (or computes extra itself).
    const float* chunk_extra = p.extra && kQ == Queries::kNone ? p.extra + hc * K * V + v0 : nullptr;
    float *X = p.X ? p.X + hc * kC * V + v0 : nullptr, *Y = kKept16 ? nullptr : p.Y + hc * kC * V + v0;
    auto state_at = [&](int r, int half) { return (state_row(r) + g + 8 * half) * V + state_col(r) + 2 * t; };
    const float* chunk_dot_with = p.dot_with && !kFusedOutput ? p.dot_with + hc * K * V + v0 : nullptr;
    float dot_with[kMaxStateTiles][4];
    // This thread's elements of a K x BV tile laid out as the state (from null: nothing), rows V
    // apart in global memory or (kStaged) lds apart in shared memory.
    auto load_state_tile = [&](const float* from, float (&to)[kMaxStateTiles][4], auto in_shared) {
#pragma unroll
      for (int r = 0; r < kMaxStateTiles; ++r) {
        if (!owns(r) || !from) continue;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int at = in_shared ? (state_row(r) + g + 8 * half) * lds + state_col(r) + 2 * t : state_at(r, half);
          const float2 x = ld2(from + at);
          to[r][2 * half] = x.x, to[r][2 * half + 1] = x.y;
        }
      }
    };
    if constexpr (kStaged) {  // S0's tile from its buffer (a pointer into shared memory, never null)
      if (chunk_dot_with) load_state_tile(staged + (step % 2) * K * lds, dot_with, std::true_type{});
    } else {
      load_state_tile(chunk_dot_with, dot_with, std::false_type{});
    }
    load_state_tile(chunk_extra, extra, std::false_type{});

    // Global stores are issued after the products they sit beside and after the shared-memory
    // writes the next stage waits for: issued first, they held up the chain of ldmatrix, mma and
    // barriers a chunk step is made of (timing the pass without them took 0.38 ms off a fwd+bwd).
    // X = diag(a) K S + add (and with kFusedOutput O = diag(e) q_raw S beside it: stored, or with
    // kWholeOutput kept for o at the step's end)
    [[maybe_unused]] float o_part[kXT][2][2];
    {
      float acc[kXT][2][4] = {}, acc_o[kXT][2][4] = {};
      if constexpr (kFusedOutput) warp_gemm_split_pair<kXT, false>(K_op, Q_op, xr, S_op, xc, K / 16, lane, acc, acc_o);
      else warp_gemm_split<kXT, false, !kRawKeys>(K_op, xr, S_op, xc, K / 16, lane, acc);
      float x[kXT][2][2];
      for_each_pair<kXT>(xr, xc, g, t, [&](int n, int half, int i, int j) {
        const float2 kS = pair_sum(acc[n], half),
                     add = p.add_tokens || (kKept16 && p.add16) ? bf16x2_floats(*reinterpret_cast<const uint32_t*>(
                                                         reinterpret_cast<const uint16_t*>(adds + i * lda) + j))
                                                   : ld2(adds + i * lda + j);
        x[n][half][0] = as[i] * kS.x + add.x, x[n][half][1] = as[i] * kS.y + add.y;
        X_planes.store(i, j, x[n][half][0], x[n][half][1]);
      });
      // The state entering the chunk, then X.
      if (kKept16 ? keeps_before() : before != nullptr) {
#pragma unroll
        for (int r = 0; r < kMaxStateTiles; ++r) {
          if (!owns(r)) continue;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = state_row(r) + g + 8 * half, col = state_col(r) + 2 * t;
            if constexpr (kBoxedBefore) box_store(box_before, K, row, col, Sreg[r][2 * half], Sreg[r][2 * half + 1]);
            else stg2(before + state_at(r, half), Sreg[r][2 * half], Sreg[r][2 * half + 1]);
          }
        }
      }
      if (kKept16 ? keeps_X() : X != nullptr)
        for_each_pair<kXT>(xr, xc, g, t, [&](int n, int half, int i, int j) {
          if constexpr (kBulkStores) box_store(box_X, kC, i, j, x[n][half][0], x[n][half][1]);
          else stg2(X + i * V + j, x[n][half][0], x[n][half][1]);
        });
      if (kBulkStores && ((kBoxedBefore && keeps_before()) || keeps_X())) fence_async_shared();
      if constexpr (kFusedOutput) {
        float* O = p.O + hc * kC * V + v0;
        for_each_pair<kXT>(xr, xc, g, t, [&](int n, int half, int i, int j) {
          const float2 qS = pair_sum(acc_o[n], half);
          o_part[n][half][0] = o_factor[half] * qS.x, o_part[n][half][1] = o_factor[half] * qS.y;
          if constexpr (!kWholeOutput) stg2(O + i * V + j, o_part[n][half][0], o_part[n][half][1]);
        });
      }
    }
    // The uses of the step's global loads (dot_with's and dO's, issued at its top): this warp's share
    // of <S, dot_with> (added up over warps after the next barrier) and D = diag(e) dO for the
    // update stage. Without a producer they come after the Y products: before the X barrier a warp
    // stalled there on the loads' arrival (the reverse pass's most sampled instruction) and held
    // the barrier up (64 columns at K = 128: -51 us a reverse pass); with the producer warpgroup
    // the early place measured faster (48 columns, OLMo shape: +21 us late; kernel notes step 24).
    // S is the state entering the chunk in both places.
    constexpr bool kLateLoadUses = !kProducer;
    auto use_step_loads = [&] {
      if (chunk_dot_with) {  // this warp's share of <S, dot_with>, added up over warps after the barrier
        float part = 0.f;
#pragma unroll
        for (int r = 0; r < kMaxStateTiles; ++r) {
          if (!owns(r)) continue;
#pragma unroll
          for (int e = 0; e < 4; ++e) part += Sreg[r][e] * dot_with[r][e];
        }
        part = warp_sum(part);
        if (lane == 0) dot_parts[warp] = part;
      }
      if constexpr (kFusedExtra) {  // D = diag(e) dO, split, for the update stage
#pragma unroll
        for (int i = 0; i < kD4; ++i) {
          const float4 d = d_piece[i];
          D_planes.store(d_row, d_col + 4 * i, d_factor * d.x, d_factor * d.y);
          D_planes.store(d_row, d_col + 4 * i + 2, d_factor * d.z, d_factor * d.w);
        }
      }
    };
    auto store_dot = [&] {
      if (chunk_dot_with && threadIdx.x == 0) {  // in a fixed order: deterministic
        float dot = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) dot += dot_parts[w];
        p.dots[hc * gridDim.x + blockIdx.x] = dot;
      }
    };
    if constexpr (!kLateLoadUses) use_step_loads();
    __syncthreads();  // X complete; `add` and a are free for the next chunk's
    if (!kProducer && step + 1 < n_chunks) load_x_operands(chunk(step + 1));
    if (issues_stores) store_x_boxes(hc);
    if constexpr (!kLateLoadUses) store_dot();

    // Y = M X; keep diag(b) Y for the state update
    {
      float acc[kXT][2][4] = {};
      warp_gemm_split<kXT, false>(M_op, xr, X_op, xc, kC / 16, lane, acc);
      for_each_pair<kXT>(xr, xc, g, t, [&](int n, int half, int i, int j) {
        const float2 y = pair_sum(acc[n], half);
        Y_planes.store(i, j, bs[i] * y.x, bs[i] * y.y);
        if constexpr (kWholeOutput) Yu_planes.store_hi(i, j, y.x, y.y);
      });
      for_each_pair<kXT>(xr, xc, g, t, [&](int n, int half, int i, int j) {
        const float2 y = pair_sum(acc[n], half);
        if constexpr (kBulkStores) box_store(box_Y, kC, i, j, y.x, y.y);
        else stg2(Y + i * V + j, y.x, y.y);
      });
      if constexpr (kBulkStores) fence_async_shared();
    }
    if constexpr (kLateLoadUses) use_step_loads();
    if constexpr (!kProducer) wait_before_y(step);
    if constexpr (kWholeOutput && kBulk) mbarrier_wait(QKG_bar, static_cast<uint32_t>(step) & 1u);
    __syncthreads();  // diag(b) Y complete (and D, the queries); M and b are free for the next chunk's
    if (!kProducer && step + 1 < n_chunks) load_y_operands(chunk(step + 1));
    if (issues_stores) store_y_box(hc);
    if constexpr (kLateLoadUses) store_dot();

    // S = last S + extra + K^T (diag(b) Y): K^T read from the keys transposed; extra read, or
    // q_raw^T D from the queries transposed. A warp's state tiles sit in one column block, so a
    // k-step loads diag(b) Y's (and D's) fragments once for all of them and the tiles' mma chains
    // interleave (a tile at a time reloaded them and ran one chain after another).
    {
      float acc[kMaxStateTiles][1][2][4] = {};  // parity 0 only: the tiles' chains interleave instead
#pragma unroll
      for (int ks = 0; ks < kC / 16; ++ks) {
        uint32_t y_hi[4], y_lo[4], d_hi[4], d_lo[4];
        load_b<1>(Y_op, state_col(0), 16 * ks, lane, y_hi, y_lo);
        if constexpr (kFusedExtra) load_b<1>(D_op, state_col(0), 16 * ks, lane, d_hi, d_lo);
#pragma unroll
        for (int r = 0; r < kMaxStateTiles; ++r) {
          if (!owns(r)) continue;
          uint32_t a_hi[4], a_lo[4];
          load_a<true, !kRawKeys>(K_op, state_row(r), 16 * ks, lane, a_hi, a_lo);
          mma_split<1, !kRawKeys>(acc[r], 0, a_hi, a_lo, y_hi, y_lo);
          if constexpr (kFusedExtra) {
            load_a<true, false>(Q_op, state_row(r), 16 * ks, lane, a_hi, a_lo);
            mma_split<1, false>(acc[r], 0, a_hi, a_lo, d_hi, d_lo);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kMaxStateTiles; ++r) {
        if (!owns(r)) continue;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float extra_e = kFusedExtra ? 0.f : extra[r][e];
          Sreg[r][e] = last * Sreg[r][e] + extra_e + acc[r][0][0][e];
        }
#pragma unroll
        for (int half = 0; half < 2; ++half)
          S_planes.store(state_row(r) + g + 8 * half, state_col(r) + 2 * t, Sreg[r][2 * half], Sreg[r][2 * half + 1]);
      }
    }

    // kWholeOutput: o = s QKG Y + O, this warp's rows and columns as for Y, after the state's split
    // is written (the next step's chain waits for that, not for o).
    if constexpr (kWholeOutput) {
      float acc[kXT][2][4] = {};
      warp_gemm_split<kXT, false, true, false>(QKG_op, xr, Yu_op, xc, kC / 16, lane, acc);
      float* o = p.O + hc * kC * V + v0;
      for_each_pair<kXT>(xr, xc, g, t, [&](int n, int half, int i, int j) {
        const float2 qy = pair_sum(acc[n], half);
        const float o0 = p.output_scale * qy.x + o_part[n][half][0], o1 = p.output_scale * qy.y + o_part[n][half][1];
        if (!p.o_tokens) stg2(o + i * V + j, o0, o1);
        else if (o_at[half] >= 0 && p.o_bf16) stg_bf16x2(static_cast<uint16_t*>(p.o_tokens) + o_at[half] + j, o0, o1);
        else if (o_at[half] >= 0) stg2(static_cast<float*>(p.o_tokens) + o_at[half] + j, o0, o1);
      });
    }
  }

  if (issues_stores) bulk_stores_wait();
#pragma unroll
  for (int r = 0; r < kMaxStateTiles; ++r) {
    if (!owns(r)) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half)
      stg2(p.final_state + state_base + static_cast<int64_t>(state_row(r) + g + 8 * half) * V + state_col(r) + 2 * t,
          Sreg[r][2 * half], Sreg[r][2 * half + 1]);
  }
}

}  // namespace
}  // namespace hybrid::ops::detail
