// The CUDA state pass's host side: which value tile a shape takes (resident blocks, waves, the
// balance of blocks over SMs), the launch, and state_pass_cuda (src/ops/delta_state_pass.h). The
// kernel and its tiles: delta_state_pass_kernel.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "../src/ops/delta_state_pass.h"
#include "delta_state_pass_kernel.cuh"
#include "delta_state_pass_registers.cuh"
#include "split_rows.h"
#include "tensor_map.h"
#include "hybrid/util/host_to_device.h"

namespace hybrid::ops::detail {
namespace {

// The maps of the kept intermediates' bulk stores: boxes of 8 columns, unswizzled (the kernels'
// strips), float32 or (p.Y16) bf16.
StoreMaps store_maps(const Params& p) {
  const int64_t chunks = static_cast<int64_t>(p.H) * p.NC;
  auto map = [&](float* data, uint16_t* data16, int rows) {
    if (p.Y16)
      return bf16_tensor_map(data16, chunks * rows, p.V, 8, rows, CU_TENSOR_MAP_SWIZZLE_NONE, "state_pass_cuda");
    return float_tensor_map(data, chunks * rows, p.V, 8, rows, CU_TENSOR_MAP_SWIZZLE_NONE, "state_pass_cuda");
  };
  return StoreMaps{map(p.before, p.before16, p.K), map(p.X, p.X16, kC), map(p.Y, p.Y16, kC)};
}

template <int BV, bool kRawKeys, Queries kQ, int kK, bool kAlone = false, bool kKept16 = false>
void launch_instance(const Params& p, int N, cudaStream_t stream) {
  const size_t shared = shared_bytes(p.K, BV, kRawKeys, kQ, kAlone);
  StoreMaps maps{};
  if constexpr (kK != 0 && bulk_store_rows(kK, BV, kRawKeys, kQ, kAlone) > 0) maps = store_maps(p);
  auto* kernel = state_pass_kernel<BV, kRawKeys, kQ, kK, kAlone, kKept16>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  kernel<<<dim3(p.V / BV, p.H, N), threads_for(BV, kAlone), shared, stream>>>(p, maps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The instance keeping bf16 (p.Y16) at K = 96 or 128, where it boxes all three kept intermediates
// (mma_pass_boxes_kept; compiled for the op's two passes only); the reverse one reads dO in bf16.
template <int BV, Queries kQ, int kK, bool kAlone>
void launch_kept16(const Params& p, int N, cudaStream_t stream) {
  TORCH_CHECK(kQ != Queries::kExtra || p.dO16, "state_pass_cuda: the reverse bf16 instance reads dO in bf16");
  if constexpr (bulk_store_rows(kK, BV, true, kQ, kAlone) == kK + 2 * kC)
    launch_instance<BV, true, kQ, kK, kAlone, true>(p, N, stream);
  else
    TORCH_CHECK(false, "state_pass_cuda: bf16 kept intermediates only where the pass boxes them all");
}

// The instances compiled for K = kK (raw keys): the bf16-keeping one where the pass keeps bf16
// (p.Y16), `alone`: the 32-column tile with an SM to itself (kAlone).
template <int BV, Queries kQ, int kK>
void launch_compiled_k(const Params& p, int N, bool alone, cudaStream_t stream) {
  if constexpr (kQ == Queries::kExtra || kQ == Queries::kWholeOutput)
    if (p.Y16)
      return alone ? launch_kept16<BV, kQ, kK, BV == 32>(p, N, stream) : launch_kept16<BV, kQ, kK, false>(p, N, stream);
  return alone ? launch_instance<BV, true, kQ, kK, BV == 32>(p, N, stream)
               : launch_instance<BV, true, kQ, kK>(p, N, stream);
}

// Whether 32-column blocks are no more than the SMs, so that each has an SM to itself.
bool alone_at_32(int64_t V, int64_t H, int64_t N) {
  return (V / 32) * H * N <= at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Raw keys (the bf16 training path) at K = 96 or 128 take the instances compiled for that K; there
// 32-column blocks that each have an SM to themselves (no more blocks than SMs) take the instance
// with a producer warpgroup and the registers of one block an SM (kAlone).
template <int BV, bool kRawKeys, Queries kQ>
void launch(const Params& p, int N, cudaStream_t stream) {
  if constexpr (kRawKeys) {
    const bool alone = BV == 32 && alone_at_32(p.V, p.H, N);
    if (p.K == 96) return launch_compiled_k<BV, kQ, 96>(p, N, alone, stream);
    if (p.K == 128) return launch_compiled_k<BV, kQ, 128>(p, N, alone, stream);
  }
  launch_instance<BV, kRawKeys, kQ, 0>(p, N, stream);
}

// Blocks of one kind resident at once on the whole GPU (asked once per head dim); -1 for a kind
// whose shared memory is past the limit.
template <int BV, bool kRawKeys, Queries kQ = Queries::kNone>
int64_t resident_blocks(int K) {
  static int64_t known[256 / 16 + 1] = {};  // 0: not asked yet
  if (known[K / 16]) return known[K / 16];
  const size_t shared = shared_bytes(K, BV, kRawKeys, kQ);
  if (shared > 227 * 1024) return known[K / 16] = -1;
  auto* kernel = state_pass_kernel<BV, kRawKeys, kQ>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads_for(BV), shared));
  return known[K / 16] = static_cast<int64_t>(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// The pass is a chain of dependent chunks, so its time is the number of waves of blocks. Take
// the value tile with fewer waves; on a tie 16 columns (twice the SMs at work) only where each
// SM holds at most one of them: two blocks on one SM take about 1.5 times one alone (see
// use_wide_columns), so where 16-column blocks would share SMs, 32-column ones, one an SM
// (B2 T16384 H16 K128 V128: 128 blocks for 256).
template <bool kRawKeys>
bool use_32_columns(int64_t K, int64_t V, int64_t H, int64_t N) {
  const bool fits = (K / 16) * 4 <= warps_for(32) * kMaxStateTiles &&
                    shared_bytes(static_cast<int>(K), 32, kRawKeys, Queries::kNone) <= 227 * 1024;
  if (V % 32 != 0 || !fits) return false;
  const int64_t blocks32 = (V / 32) * H * N, blocks16 = 2 * blocks32;
  const int64_t slots32 = resident_blocks<32, kRawKeys>(static_cast<int>(K)),
                slots16 = resident_blocks<16, kRawKeys>(static_cast<int>(K));
  if (slots32 <= 0) return false;
  const int64_t waves32 = (blocks32 + slots32 - 1) / slots32, waves16 = (blocks16 + slots16 - 1) / slots16;
  if (waves32 != waves16) return waves32 < waves16;
  return blocks16 > at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Where 32-column blocks would share SMs (more blocks than SMs), wider ones, one an SM (12 or 16
// warps, each with a 32-column warp's share), in no more waves: 48 columns where V allows, else
// 64. Two 32-column blocks on one SM take about 1.5 times one block alone (Nsight Compute at the
// OLMo shape, 180 blocks on 132 SMs: SM active cycles 78% of the elapsed ones), so the doubled
// SMs set the pass's time. At K = 128 the 64-column tile also has the shared memory for the
// queries, which two 32-column blocks an SM do not: there the passes form `extra` and o
// themselves. Raw keys only (the bf16 training path), K up to 128 (at most four state tiles a
// warp).
template <int BV>
bool use_wide_columns(int64_t K, int64_t V, int64_t H, int64_t N) {
  const int k = static_cast<int>(K);
  if (V % BV != 0 || (K / 16) * (BV / 8) > warps_for(BV) * kMaxStateTiles ||
      shared_bytes(k, BV, true, Queries::kExtra) > 227 * 1024)
    return false;
  const int64_t blocks32 = (V / 32) * H * N, blocks_wide = (V / BV) * H * N;
  const int64_t slots32 = resident_blocks<32, true>(k), slots_wide = resident_blocks<BV, true>(k);
  if (slots32 <= 0 || slots_wide <= 0 || blocks32 <= at::cuda::getCurrentDeviceProperties()->multiProcessorCount)
    return false;
  return (blocks_wide + slots_wide - 1) / slots_wide <= (blocks32 + slots32 - 1) / slots32;
}

// The value tile (64, 48, 32 or 16 columns) the pass takes for a shape, with or without the fused extra.
int value_tile(bool raw, int64_t K, int64_t V, int64_t H, int64_t N) {
  if (!(raw ? use_32_columns<true>(K, V, H, N) : use_32_columns<false>(K, V, H, N))) return 16;
  if (!raw) return 32;
  if (use_wide_columns<48>(K, V, H, N)) return 48;
  return use_wide_columns<64>(K, V, H, N) ? 64 : 32;
}

// Whether a use of the raw queries costs a tile no waves over `blocks` blocks (its shared memory
// may take resident blocks where a wave holds fewer blocks than that anyway).
template <int BV, Queries kQ>
bool costs_no_waves(int K, int64_t blocks) {
  const int64_t with = resident_blocks<BV, true, kQ>(K), without = resident_blocks<BV, true>(K);
  return with > 0 && (blocks + with - 1) / with == (blocks + without - 1) / without;
}

// A use of the raw queries (raw keys only) where its shared memory costs no waves at the value
// tile the shape takes (K = 96: yes; K = 128 at BV = 32: only where one block an SM is enough).
template <Queries kQ>
bool fuses(int64_t K, int64_t V, int64_t H, int64_t N) {
  const int k = static_cast<int>(K), tile = value_tile(true, K, V, H, N);
  const int64_t blocks = V / tile * H * N;
  switch (tile) {
    case 64: return costs_no_waves<64, kQ>(k, blocks);
    case 48: return costs_no_waves<48, kQ>(k, blocks);
    case 32: return costs_no_waves<32, kQ>(k, blocks);
    default: return costs_no_waves<16, kQ>(k, blocks);
  }
}

// The passes with the state in registers (delta_state_pass_registers.cuh): kChains 64-column
// chains a block, every chunk operand by TMA boxes (`add` from the tokens as boxes of 64 tokens).
template <bool kForward, int K, int kChains>
void launch_registers_instance(const Params& p, int N, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.H) * p.NC * kC;
  auto bf16_rows = [&](const void* data, int cols, CUtensorMapSwizzle swizzle) {
    return bf16_tensor_map(data, rows, cols, 64, kC, swizzle, "state_pass_cuda");
  };
  auto float_boxes = [&](const float* data) {
    return float_tensor_map(data, rows, p.V, 32, kC, CU_TENSOR_MAP_SWIZZLE_128B, "state_pass_cuda");
  };
  // The tokens' values: B T rows of the heads' window ((H - 1) add_head + V columns), add_token apart.
  const CUtensorMap add =
      kForward && p.add_tokens
          ? bf16_tensor_map(p.add_tokens, p.token_rows.B * p.token_rows.T, (p.H - 1) * p.add_head + p.V, 64, kC,
                            CU_TENSOR_MAP_SWIZZLE_128B, "state_pass_cuda", p.add_token)
      : !kForward && p.add16 ? bf16_rows(p.add16, p.V, CU_TENSOR_MAP_SWIZZLE_128B)
                             : float_boxes(p.add);
  // A one-chain block's bulk stores of the kept intermediates in bf16: boxes of the chain's 64
  // values x K rows (the state entering each chunk) or x the chunk's 64 rows (X, Y).
  auto kept_boxes = [&](const uint16_t* data, int box_rows) {
    return kept_by_tiles<kChains>() && data
               ? bf16_tensor_map(data, static_cast<int64_t>(p.H) * p.NC * box_rows, p.V, kRegChain, box_rows,
                                 CU_TENSOR_MAP_SWIZZLE_128B, "state_pass_cuda")
               : CUtensorMap{};
  };
  RegisterPassMaps maps{bf16_rows(p.k, K, CU_TENSOR_MAP_SWIZZLE_128B),
                              bf16_rows(p.q, K, CU_TENSOR_MAP_SWIZZLE_128B),
                              bf16_rows(p.M, 2 * kC, CU_TENSOR_MAP_SWIZZLE_NONE), add,
                              kForward  ? bf16_rows(p.QKG, 2 * kC, CU_TENSOR_MAP_SWIZZLE_NONE)
                              : p.dO16 ? bf16_rows(p.dO16, p.V, CU_TENSOR_MAP_SWIZZLE_128B)
                                       : float_boxes(p.dO),
                              kept_boxes(p.before16, K), kept_boxes(p.X16, kC), kept_boxes(p.Y16, kC)};
  // o into the tokens by a bulk tensor store a chunk (the one-chain forward's o warpgroup: its
  // 4-byte stores, their shuffles and bounds were most of its step at the OLMo shape, kernel notes
  // step 57) where every chunk's 64 rows are tokens of one batch row (a layout of rows, T a multiple
  // of 64), o is bf16, and the values come from the tokens (whose bf16 boxes leave the stage's
  // `add` room for o's tile).
  const bool o_tiles = o_warpgroup<kForward, kChains>() && p.o_tokens && p.o_bf16 && p.add_tokens &&
                       !p.token_rows.gather && p.token_rows.T % kC == 0;
  const CUtensorMap o = o_tiles ? bf16_tensor_map(p.o_tokens, p.token_rows.B * p.token_rows.T,
                                                  static_cast<int64_t>(p.H) * p.V, kRegChain, kC,
                                                  CU_TENSOR_MAP_SWIZZLE_128B, "state_pass_cuda")
                                : CUtensorMap{};
  maps.o = o, maps.o_tiles = o_tiles;
  auto* kernel = state_pass_registers_kernel<kForward, K, kChains>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRegisterPassShared));
  const int block_columns = kChains * kRegChain;
  kernel<<<dim3((p.V + block_columns - 1) / block_columns, p.H, N), register_pass_threads<kForward, kChains>(),
           kRegisterPassShared, stream>>>(p, maps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which kernel takes a pass: the mma.sync one, or the registers one with blocks of two chains
// (pairs) or of one.
enum class PassKernel { kWarps, kRegisterPairs, kRegisterSingles };

template <bool kForward>
void launch_registers(const Params& p, int N, PassKernel kernel, cudaStream_t stream) {
  const bool pairs = kernel == PassKernel::kRegisterPairs;
  if (p.K == 96)
    return pairs ? launch_registers_instance<kForward, 96, 2>(p, N, stream)
                 : launch_registers_instance<kForward, 96, 1>(p, N, stream);
  pairs ? launch_registers_instance<kForward, 128, 2>(p, N, stream)
        : launch_registers_instance<kForward, 128, 1>(p, N, stream);
}

// Whether the registers' pass can take a pass: K = 96 or 128, V in 64-column chains, the queries'
// fusion of its direction (the backward's extra, the forward's whole output), no dot_with, where
// the mma.sync pass has one block an SM: its wide tiles (`tile`, value_tile's 64 or 48 columns)
// or 32 columns alone on their SMs (B2 T16384 H16 K128 V128). Where 32-column blocks share SMs
// the registers' blocks (one an SM) are not weighed against them.
bool registers_can_take(int64_t K, int64_t V, int tile, int64_t H, int64_t N, bool dot_with) {
  return (K == 96 || K == 128) && V % kRegChain == 0 && !dot_with &&
         (tile == 64 || tile == 48 || (tile == 32 && alone_at_32(V, H, N)));
}

// A chunk step of a block in microseconds, stores included, by direction: a pass's GPU time over
// its waves and its chunks (H200, the op's kept intermediates in bf16; fifty-first session, each
// kernel forced in turn by scripts/gpu/state_pass_kernels.sh). The mma.sync pass: 64 columns at
// B8 T4096 H16 K128 V128, 48 at the OLMo shape (K = 96), 32 alone on their SMs at B2 T16384 H16
// K128 V128 (other pairings take the nearest figure). The registers pass in blocks of two chains
// and of one at the OLMo shape (K = 96) and B8 T4096 H16 V128 (K = 128). The forward also forms
// and stores o (on a warpgroup of its own in blocks of one chain): its step is the longer.
double warps_step_us(int tile, bool forward) {
  if (tile == 64) return forward ? 6.7 : 6.8;
  if (tile == 48) return forward ? 4.5 : 4.45;
  return forward ? 3.7 : 3.65;
}
double registers_step_us(int64_t K, int chains, bool forward) {
  if (chains == 2) return K == 128 ? (forward ? 8.0 : 6.4) : (forward ? 6.4 : 5.35);
  return K == 128 ? (forward ? 3.1 : 2.65) : (forward ? 2.45 : 2.05);
}

// The fastest kernel for a pass by its waves of blocks (one block an SM for each) times the step.
PassKernel fastest_pass_kernel(int64_t K, int64_t V, int tile, int64_t H, int64_t N, bool forward) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto time = [&](int64_t blocks_a_head, double step) { return (blocks_a_head * H * N + sms - 1) / sms * step; };
  const double warps = time(V / tile, warps_step_us(tile, forward)),
               pairs = time((V + 2 * kRegChain - 1) / (2 * kRegChain), registers_step_us(K, 2, forward)),
               singles = time(V / kRegChain, registers_step_us(K, 1, forward));
  if (std::min(pairs, singles) >= warps) return PassKernel::kWarps;
  return pairs <= singles ? PassKernel::kRegisterPairs : PassKernel::kRegisterSingles;
}

// Which kernel takes a pass of these queries (kQ): the registers one only from raw keys, with the
// queries' fusion of the direction, and the forward writing o into the tokens exactly where `add`
// comes from them (their runs say where); then `kernel`'s choice.
PassKernel pass_kernel(bool raw_keys, Queries q, int64_t K, int64_t V, int64_t H, int64_t N, bool dot_with,
                        bool add_tokens, bool o_tokens, StatePassKernel kernel) {
  const int tile = value_tile(true, K, V, H, N);
  const bool can = raw_keys && (q == Queries::kExtra || (q == Queries::kWholeOutput && add_tokens == o_tokens)) &&
                   registers_can_take(K, V, tile, H, N, dot_with);
  if (!can || kernel == StatePassKernel::kWarps) return PassKernel::kWarps;
  if (kernel == StatePassKernel::kRegisters) return PassKernel::kRegisterPairs;
  if (kernel == StatePassKernel::kRegistersSingle) return PassKernel::kRegisterSingles;
  return fastest_pass_kernel(K, V, tile, H, N, q == Queries::kWholeOutput);
}

// Whether the mma.sync pass's instance for this shape boxes all three kept intermediates for its
// bulk stores (bulk_store_rows: K + 2 C rows), where it can keep them in bf16 (StatePassInputs::
// kept_bf16): the op's two passes (the queries' extra, the whole output) at K = 96 or 128 from raw keys,
// e.g. the 32-column tiles alone on their SM (B2 T16384) and the 48-column ones (the OLMo shape).
bool mma_pass_boxes_kept(bool raw_keys, Queries q, int64_t K, int64_t V, int64_t H, int64_t N) {
  if (!raw_keys || (K != 96 && K != 128) || (q != Queries::kExtra && q != Queries::kWholeOutput)) return false;
  const int tile = value_tile(true, K, V, H, N);
  return bulk_store_rows(static_cast<int>(K), tile, true, q, tile == 32 && alone_at_32(V, H, N)) == K + 2 * kC;
}

template <bool kRawKeys, Queries kQ>
void launch_for_shape(const Params& p, int64_t N, PassKernel kernel, cudaStream_t stream) {
  const int tile = value_tile(kRawKeys, p.K, p.V, p.H, N);
  if constexpr (kRawKeys && (kQ == Queries::kExtra || kQ == Queries::kWholeOutput))
    if (kernel != PassKernel::kWarps)
      return launch_registers<kQ == Queries::kWholeOutput>(p, static_cast<int>(N), kernel, stream);
  if constexpr (kRawKeys) {
    if (tile == 64) return launch<64, kRawKeys, kQ>(p, static_cast<int>(N), stream);
    if (tile == 48) return launch<48, kRawKeys, kQ>(p, static_cast<int>(N), stream);
  }
  if (tile == 32) launch<32, kRawKeys, kQ>(p, static_cast<int>(N), stream);
  else launch<16, kRawKeys, kQ>(p, static_cast<int>(N), stream);
}

}  // namespace

bool state_pass_cuda_takes_queries(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences,
                                   bool reverse) {
  const c10::cuda::CUDAGuard guard(device);
  if (K % 16 != 0 || K > 256 || V % 16 != 0 || V > 256) return false;
  return reverse ? fuses<Queries::kExtra>(K, V, H, sequences) : fuses<Queries::kOutput>(K, V, H, sequences);
}

bool state_pass_cuda_forms_output(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences) {
  const c10::cuda::CUDAGuard guard(device);
  if (K % 16 != 0 || K > 256 || V % 16 != 0 || V > 256) return false;
  // QKG and Y's split beside the queries at no cost in waves: the wide tiles (one block an SM), and
  // 32 or 16 columns where one block an SM is enough.
  return fuses<Queries::kOutput>(K, V, H, sequences) && fuses<Queries::kWholeOutput>(K, V, H, sequences);
}

bool state_pass_cuda_on_registers(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences,
                                  bool reverse) {
  const c10::cuda::CUDAGuard guard(device);
  if (K % 16 != 0 || K > 256 || V % 16 != 0 || V > 256) return false;
  return registers_can_take(K, V, value_tile(true, K, V, H, sequences), H, sequences, false) &&
         (reverse ? fuses<Queries::kExtra>(K, V, H, sequences)
                  : state_pass_cuda_forms_output(device, H, K, V, sequences));
}

int state_pass_cuda_value_tile(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences, bool raw_keys) {
  const c10::cuda::CUDAGuard guard(device);
  return value_tile(raw_keys, K, V, H, sequences);
}

StatePassOutputs state_pass_cuda(const StatePassInputs& in, bool want_x) {
  const c10::cuda::CUDAGuard guard(in.k.device());
  const int64_t H = in.k.size(0), NC = in.k.size(1), C = in.k.size(2), K = in.k.size(3), V = in.add.size(3);
  TORCH_CHECK(C == kC && K % 16 == 0 && K <= 256 && V % 16 == 0 && V <= 256 && NC < (int64_t{1} << 31),
              "state_pass_cuda: needs chunk 64, K and V multiples of 16 up to 256");
  // Batched ATen results can come back in other layouts (the triangular solve's are column-major).
  auto dense = [](const at::Tensor& t) {
    TORCH_CHECK(!t.defined() || t.scalar_type() == at::kFloat, "state_pass_cuda: float32 inputs");
    return t.defined() ? t.contiguous() : t;
  };
  // With add_tokens, `add` is a shape (never materialised: its stand-in may be a broadcast). The
  // reverse pass takes it in bf16 too (Params::add16).
  const bool values_from_tokens = in.add_tokens.defined();
  const bool add16 = !values_from_tokens && in.add.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!add16 || in.reverse, "state_pass_cuda: add in bf16 only for the reverse pass");
  const at::Tensor last = dense(in.last),
                   add = values_from_tokens ? at::Tensor() : add16 ? in.add.contiguous() : dense(in.add),
                   extra = dense(in.extra), init = dense(in.init);
  const std::vector<int64_t> chunk_matrices = {H, NC, C, C};
  TORCH_CHECK(in.M_split.defined() ? !in.M.defined() && in.M_split.scalar_type() == at::kInt &&
                                         in.M_split.sizes() == chunk_matrices
                                   : in.M.scalar_type() == at::kFloat && in.M.sizes() == chunk_matrices,
              "state_pass_cuda: M float32 [H, NC, C, C], or M_split int32 of that shape in its place");
  const at::Tensor M = in.M_split.defined() ? in.M_split.contiguous() : split_chunk_matrices(in.M);
  // Raw keys: k = diag(scale) raw with raw exact in bf16, the scale folded into a and b.
  const bool raw = in.k_raw.defined();
  TORCH_CHECK(!raw || (in.k_raw.scalar_type() == at::kBFloat16 && in.k_raw.sizes() == in.k.sizes() &&
                       in.k_scale.sizes() == in.a.sizes()),
              "state_pass_cuda: raw keys must be bf16 of k's shape, their scale of a's");
  const at::Tensor k = raw ? in.k_raw.contiguous() : split_rows(dense(in.k));
  const bool scale = raw && !in.scaled_by_keys;
  const at::Tensor a = scale ? dense(in.a * in.k_scale) : dense(in.a), b = scale ? dense(in.b * in.k_scale) : dense(in.b);
  const int64_t N = static_cast<int64_t>(in.chunk_offsets.size()) - 1;
  TORCH_CHECK(N >= 1 && N < 65536 && H < 65536, "state_pass_cuda: at most 65535 sequences and heads");
  const bool queries = in.q_raw.defined();
  TORCH_CHECK(!queries || (raw && state_pass_cuda_takes_queries(in.k.device(), H, K, V, N, in.reverse) &&
                           in.q_raw.scalar_type() == at::kBFloat16 && in.q_raw.sizes() == in.k.sizes() &&
                           in.q_factor.sizes() == in.a.sizes() &&
                           (in.reverse ? !in.extra.defined() && in.dO.sizes() == in.add.sizes() &&
                                             (in.dO.scalar_type() == at::kFloat ||
                                              in.dO.scalar_type() == at::kBFloat16)
                                       : !in.dO.defined())),
              "state_pass_cuda: q_raw and q_factor only where state_pass_takes_queries, as bf16 of k's shape and "
              "float32 of a's; reversed with dO (float32 or bf16) of add's shape and no extra, forward without dO");
  const at::Tensor q = queries ? in.q_raw.contiguous() : at::Tensor(), q_factor = dense(in.q_factor);
  const bool whole_output = in.QKG.defined();
  TORCH_CHECK(!whole_output || (queries && !in.reverse && in.QKG.scalar_type() == at::kFloat &&
                                in.QKG.sizes() == chunk_matrices && fuses<Queries::kWholeOutput>(K, V, H, N)),
              "state_pass_cuda: QKG only where state_pass_forms_output, forward with q_raw, float32 of M's shape");
  TORCH_CHECK(!in.QKG_split.defined() || (whole_output && in.QKG_split.scalar_type() == at::kInt &&
                                          in.QKG_split.sizes() == chunk_matrices),
              "state_pass_cuda: QKG_split only beside QKG, int32 of its shape");
  const at::Tensor QKG = !whole_output            ? at::Tensor()
                         : in.QKG_split.defined() ? in.QKG_split.contiguous()
                                                  : split_chunk_matrices(in.QKG);

  // Which kernel takes the pass. HYBRID_STATE_PASS=warps, =registers or =registers-single: that
  // kernel wherever it can take the pass, for timings of each in one build (StatePassInputs::kernel
  // says the same in code).
  static const StatePassKernel asked = state_pass_kernel_named(std::getenv("HYBRID_STATE_PASS"), "HYBRID_STATE_PASS");
  const Queries kind = queries && in.reverse ? Queries::kExtra
                       : whole_output        ? Queries::kWholeOutput
                       : queries             ? Queries::kOutput
                                             : Queries::kNone;
  const PassKernel kernel =
      pass_kernel(raw, kind, K, V, H, N, in.dot_with.defined(), values_from_tokens, in.o_tokens.wanted,
                  in.kernel != StatePassKernel::kFastest ? in.kernel : asked);
  const bool on_registers = kernel != PassKernel::kWarps;
  StatePassOutputs out;
  // The kept intermediates in bf16 where asked and the registers kernel stores them (its stores'
  // bytes set its time), or the mma.sync pass boxes them all (the forward only where it forms the
  // whole output: elsewhere o is formed from Y outside).
  // The reverse pass keeps them so only beside dO in bf16 (o's gradient, bf16 values: the op asks
  // for both together), which its bf16 instances read; bf16 dO goes to float32 elsewhere.
  const bool dO_bf16 = in.reverse && queries && in.dO.scalar_type() == at::kBFloat16;
  const bool kept16 = in.kept_bf16 && (!in.reverse || dO_bf16) &&
                      (on_registers || ((in.reverse || whole_output) && mma_pass_boxes_kept(raw, kind, K, V, H, N)));
  const bool dO16 = kept16 && dO_bf16;
  const at::Tensor dO = dO16 ? in.dO.contiguous() : dense(dO_bf16 ? in.dO.to(at::kFloat) : in.dO);
  // cp.async moves 16-byte pieces, and dO is read in them.
  for (const at::Tensor* x : {&k, &M, &add, &a, &b, &q, &q_factor, &dO, &QKG})
    TORCH_CHECK(!x->defined() || reinterpret_cast<uintptr_t>(x->data_ptr()) % 16 == 0,
                "state_pass_cuda: operands must be 16-byte aligned");
  const auto kept = in.add.options().dtype(kept16 ? at::kBFloat16 : at::kFloat);
  if (in.want_before) out.before = at::empty({H, NC, K, V}, kept);
  // Y unwanted: no float32 store a chunk on the registers kernel's chain (the mma.sync pass
  // stores it regardless).
  if (in.want_y || !on_registers) out.Y = at::empty({H, NC, C, V}, kept);
  if (want_x) out.X = at::empty({H, NC, C, V}, kept);
  const OutputTokens& tokens = in.o_tokens;
  TORCH_CHECK(!tokens.wanted || (whole_output && (tokens.dtype == at::kBFloat16 || tokens.dtype == at::kFloat) &&
                                 tokens.B >= 1 && tokens.B * tokens.T < (int64_t{1} << 32) &&
                                 (tokens.gather.defined() ? tokens.gather.scalar_type() == at::kLong &&
                                                                tokens.gather.device() == in.k.device() &&
                                                                tokens.gather.numel() == NC * C && tokens.B == 1
                                                          : NC % tokens.B == 0 && NC / tokens.B * C >= tokens.T)),
              "state_pass_cuda: o into the tokens only with QKG, in bf16 or float32, for a layout of these chunks");
  const at::Tensor& vt = in.add_tokens;
  const at::Tensor& runs = in.add_token_runs;
  const bool rows_layout = !runs.defined();
  TORCH_CHECK(!values_from_tokens ||
                  (!in.reverse && state_pass_takes_value_tokens(vt) && vt.device() == in.k.device() &&
                   vt.size(2) == H && vt.size(3) == V &&
                   (rows_layout ? NC % vt.size(0) == 0 && (NC / vt.size(0) - 1) * C < vt.size(1) &&
                                      vt.size(1) <= NC / vt.size(0) * C &&
                                      (!tokens.wanted || (!tokens.gather.defined() && tokens.B == vt.size(0) &&
                                                          tokens.T == vt.size(1)))
                                : vt.size(0) == 1 && runs.scalar_type() == at::kLong && runs.is_contiguous() &&
                                      runs.device() == in.k.device() && runs.sizes() == at::IntArrayRef{NC, 2} &&
                                      (!tokens.wanted || (tokens.gather.defined() && tokens.T == vt.size(1))))),
              "state_pass_cuda: add_tokens only forward, where state_pass_takes_value_tokens, [B, T, H, V] for the "
              "layout of these chunks (B rows, ceil(T / 64) chunks each; or one row of documents with their runs "
              "[NC, 2]), and with o into the same tokens");
  TORCH_CHECK(!runs.defined() || values_from_tokens, "state_pass_cuda: add_token_runs only with add_tokens");
  if (tokens.wanted) out.o = at::empty({tokens.B, tokens.T, H, V}, in.add.options().dtype(tokens.dtype));
  else if (whole_output) out.o = at::empty({H, NC, C, V}, in.add.options());
  else if (queries && !in.reverse) out.O = at::empty({H, NC, C, V}, in.add.options());
  out.final_state = at::empty({N, H, K, V}, in.add.options().dtype(at::kFloat));
  const at::Tensor dot_with = dense(in.dot_with);
  const std::vector<int64_t> state_sizes = {H, NC, K, V};
  TORCH_CHECK(!dot_with.defined() || dot_with.sizes() == state_sizes, "state_pass_cuda: dot_with must be [H, NC, K, V]");
  // A part a value tile; every chunk is some block's (chunk_offsets cover 0 .. NC).
  if (dot_with.defined())
    out.dots = at::empty({H, NC, V / value_tile(raw, K, V, H, N)}, in.add.options().dtype(at::kFloat));
  const at::Tensor& given_offsets = in.chunk_offsets_on_device;
  TORCH_CHECK(!given_offsets.defined() ||
                  (given_offsets.scalar_type() == at::kLong && given_offsets.device() == in.k.device() &&
                   given_offsets.is_contiguous() && given_offsets.numel() == N + 1),
              "state_pass_cuda: chunk_offsets_on_device must be int64 [N + 1] on the keys' device");
  const at::Tensor offsets =
      given_offsets.defined() ? given_offsets : util::to_device_async(in.chunk_offsets, in.k.device());

  // The token of each chunk row, for o and V in the tokens (the same layout where both are).
  ChunkTokens token_rows{tokens.gather.defined() ? tokens.gather.data_ptr<int64_t>() : nullptr, tokens.B, tokens.T,
                         tokens.wanted ? NC / tokens.B : 0};
  if (values_from_tokens && rows_layout) token_rows = ChunkTokens{nullptr, vt.size(0), vt.size(1), NC / vt.size(0)};
  auto split_data = [](const at::Tensor& x) { return reinterpret_cast<const float*>(x.data_ptr()); };
  auto data = [](const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; };
  Params p{split_data(k), data(a), data(b), data(last), add16 ? nullptr : data(add), split_data(M), data(extra),
           data(init),
           queries ? split_data(q) : nullptr, data(q_factor), dO16 ? nullptr : data(dO),
           data(dot_with),
           offsets.data_ptr<int64_t>(), kept16 ? nullptr : data(out.before), kept16 ? nullptr : data(out.X),
           kept16 ? nullptr : data(out.Y), data(out.final_state),
           data(out.dots), whole_output && !tokens.wanted ? data(out.o) : data(out.O),
           whole_output ? split_data(QKG) : nullptr, static_cast<float>(in.output_scale),
           tokens.wanted ? out.o.data_ptr() : nullptr,
           values_from_tokens ? reinterpret_cast<const uint16_t*>(vt.data_ptr<at::BFloat16>()) : nullptr,
           values_from_tokens ? vt.stride(1) : 0, values_from_tokens ? vt.stride(2) : 0,
           runs.defined() ? runs.data_ptr<int64_t>() : nullptr,
           token_rows,
           tokens.dtype == at::kBFloat16, static_cast<int>(H), static_cast<int>(NC), static_cast<int>(K),
           static_cast<int>(V), in.reverse, row_pieces(key_row_floats(static_cast<int>(K), raw))};
  if (kept16) {
    auto bf16 = [](const at::Tensor& x) {
      return x.defined() ? reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
    };
    p.before16 = bf16(out.before), p.X16 = bf16(out.X), p.Y16 = bf16(out.Y);
    if (dO16) p.dO16 = reinterpret_cast<const uint16_t*>(dO.data_ptr<at::BFloat16>());
  }
  // bf16 add where the pass keeps bf16 (the registers kernel, the kKept16 instances); the float32
  // instances take it widened.
  const at::Tensor add_float = add16 && !kept16 && !on_registers ? add.to(at::kFloat) : at::Tensor();
  if (add_float.defined()) p.add = add_float.data_ptr<float>();
  else if (add16) p.add16 = reinterpret_cast<const uint16_t*>(add.data_ptr<at::BFloat16>());
  if (in.chunk_ready.defined() && in.reverse && kernel == PassKernel::kRegisterSingles && p.X16) {
    TORCH_CHECK(in.chunk_ready.scalar_type() == at::kInt && in.chunk_ready.is_contiguous() &&
                    in.chunk_ready.numel() == H * NC + 1 && in.chunk_ready.device() == in.k.device(),
                "state_pass_cuda: chunk_ready must be int32 [H NC + 1] on the pass's device");
    p.chunk_ready = in.chunk_ready.data_ptr<int>(), p.blocks_started = p.chunk_ready + H * NC;
    out.ready_count = static_cast<int>(V / kRegChain), out.blocks = V / kRegChain * H * N;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  if (kind == Queries::kExtra) launch_for_shape<true, Queries::kExtra>(p, N, kernel, stream);
  else if (kind == Queries::kWholeOutput) launch_for_shape<true, Queries::kWholeOutput>(p, N, kernel, stream);
  else if (kind == Queries::kOutput) launch_for_shape<true, Queries::kOutput>(p, N, kernel, stream);
  else if (raw) launch_for_shape<true, Queries::kNone>(p, N, kernel, stream);
  else launch_for_shape<false, Queries::kNone>(p, N, kernel, stream);
  return out;
}

}  // namespace hybrid::ops::detail
