// Copies from global to shared memory that leave the warps' instruction stream (cp.async, sm_80+):
// 16-byte pieces in groups, committed and waited for per thread (a barrier then publishes them to
// the block). Shared by the kernels that prefetch the next operands while they compute.
#pragma once

#include <cstdint>

namespace hybrid::ops::detail {

__device__ __forceinline__ void cp_async16(uint32_t smem, const float* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(gmem));
}
// The same, or 16 zero bytes where `valid` is false (gmem is then not read).
__device__ __forceinline__ void cp_async16_or_zeros(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}
// This thread's writes of shared memory (st.shared) made visible to the async proxy, through which
// bulk tensor stores read it; a barrier then publishes them. (Its MEMBAR.ALL.CTA also waits for the
// thread's loads in flight, cp.async's included.)
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
// Until at most kPending of this thread's most recent groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory"); }

// Bulk copies (cp.async.bulk, sm_90): one thread moves a whole contiguous tile (bytes and both
// addresses multiples of 16), completing on an mbarrier that counts the bytes. For tiles laid out
// in global memory as in shared memory (the state pass's swizzled C x C matrices): a tile is then a
// few instructions of one thread, where cp.async costs every copying thread about nine a 16-byte
// piece.
// Per-row bulk copies do not pay: the copy takes uniform operands, and a warp's 32 rows compile to
// a loop over the lanes (kernel notes, step 21).
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))),
               "r"(arrivals));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// The issuing thread's arrival, announcing the bytes its bulk copies will complete on `bar`.
__device__ __forceinline__ void mbarrier_arrive_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(bar))),
               "r"(bytes)
               : "memory");
}
// A plain arrival (a consumer done with a buffer); its earlier reads of shared memory happen before.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
               : "memory");
}
// More bytes for the current phase, without arriving (copies issued before the arrival).
__device__ __forceinline__ void mbarrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(bar))),
               "r"(bytes)
               : "memory");
}
// bytes from global to shared memory, counted on `bar`. Issued after a block barrier that follows
// the block's last reads of dst (as TMA pipelines release a buffer: no proxy fence, whose
// MEMBAR.ALL.CTA would wait for the issuing thread's outstanding stores).
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
      "l"(src), "r"(bytes), "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
      : "memory");
}
// bytes of global memory into L2 ahead of a block's loads of them (cp.async.bulk.prefetch, sm_90;
// address and bytes multiples of 16): nothing to wait for, the loads then hit in L2. For operands a
// block reads after a phase of compute that its other loads cannot overlap.
__device__ __forceinline__ void prefetch_l2(const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}
// Until `bar`'s phase of this parity has completed (its copies' bytes are visible to this thread).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(at), "r"(parity)
        : "memory");
}

// Bulk tensor stores (TMA, sm_90): a box of a 2D tensor from shared memory (dense rows, 128-byte
// aligned) to global memory, one instruction of one thread. The tensor's CUtensorMap is a
// __grid_constant__ kernel argument (`map` its address there). Every thread that wrote the box
// fences its writes for the async proxy (fence_async_shared) before the barrier after which the
// store is issued; the issuing thread commits its stores in groups and waits for their reads of
// shared memory before the box is written again, and for the stores themselves before the block
// exits.
__device__ __forceinline__ void bulk_store_2d(const void* map, const void* box, int col, int row) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(map),
               "r"(static_cast<uint32_t>(__cvta_generic_to_shared(box))), "r"(col), "r"(row)
               : "memory");
}
// The box at (col, row) of a 2D tensor into shared memory (laid out, and swizzled, as the map says;
// a swizzled box aligned to its swizzle's repeat: 512 bytes for 64-byte rows, 1024 for 128),
// counted on `bar` like bulk_copy.
__device__ __forceinline__ void bulk_load_2d(void* box, const void* map, int col, int row, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          static_cast<uint32_t>(__cvta_generic_to_shared(box))),
      "l"(map), "r"(col), "r"(row), "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
      : "memory");
}
__device__ __forceinline__ void bulk_stores_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
__device__ __forceinline__ void bulk_stores_wait_reads() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}
// The bulk stores committed before the newest kPending groups complete (their writes done).
template <int kPending = 0>
__device__ __forceinline__ void bulk_stores_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
}

constexpr int kCopyWarps = 8;
constexpr int kCopyThreads = 32 * kCopyWarps;

// A tile's rows as 16-byte pieces: `pieces` a row, ceil(2^32 / pieces) (a thread's row is then
// one multiply-high, exact for thread indices times `pieces` below 2^32) and the rows a round of
// `threads` copying threads (kCopyThreads unless said) covers. Made once, outside the loops that
// copy a tile every step.
struct RowPieces {
  uint32_t pieces, inverse, rows_per_round;
};
__host__ __device__ constexpr RowPieces row_pieces(int cols, int threads = kCopyThreads) {
  const uint32_t pieces = static_cast<uint32_t>(cols / 4);
  return RowPieces{pieces, 0xffffffffu / pieces + 1u, static_cast<uint32_t>(threads) / pieces};
}

// rows x cols floats (cols a multiple of 4, at most 4 threads; 16-byte aligned rows) from global
// (row stride src_ld) to shared (row stride ld), by the rp's copying threads, `copier` the
// caller's index among them (threadIdx.x unless said; any other index copies nothing): thread
// t copies piece t % P of rows t / P, then R rows further each round (P pieces a row, R =
// threads / P rows a round; threads past R P idle), so a warp's pieces are consecutive and
// a piece costs the copy, two pointer steps and the loop test. (A warp a row, lane l its pieces
// l, l + 32, ..., left most lanes idle at these widths, and its loop nest with 64-bit pointer
// steps was 40% of a state-pass step's instructions, ncu's source counters, sixteenth session.)
__device__ __forceinline__ void copy_async(float* dst, int ld, const float* src, int src_ld, int rows, RowPieces rp,
                                           uint32_t copier = threadIdx.x) {
  const uint32_t t = copier, row = __umulhi(t, rp.inverse), col = 4u * (t - row * rp.pieces);
  if (row >= rp.rows_per_round) return;  // past R P: those pieces are another thread's
  uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst)) + 4u * (row * static_cast<uint32_t>(ld) + col);
  const float* from = src + (row * static_cast<uint32_t>(src_ld) + col);
  const uint32_t d_step = 4u * rp.rows_per_round * static_cast<uint32_t>(ld);
  const uint32_t from_step = rp.rows_per_round * static_cast<uint32_t>(src_ld);
#pragma unroll 1
  for (uint32_t r = row; r < static_cast<uint32_t>(rows); r += rp.rows_per_round, d += d_step, from += from_step)
    cp_async16(d, from);
}

}  // namespace hybrid::ops::detail
