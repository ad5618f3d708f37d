// Copies from global to shared memory that leave the warps' instruction stream (cp.async, sm_80+):
// 16-byte pieces in groups, committed and waited for per thread (a barrier then publishes them to
// the block). Shared by the kernels that prefetch the next operands while they compute.
#pragma once

#include <cstdint>

namespace hybrid::ops::detail {

__device__ __forceinline__ void cp_async16(uint32_t smem, const float* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
// Until at most kPending of this thread's most recent groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory"); }

// rows x cols floats (cols a multiple of 4, 16-byte aligned rows) from global (row stride src_ld)
// to shared (row stride ld), by a block of kCopyWarps warps: warp w the rows w, w + 8, ..., lane l
// a row's 16-byte pieces l, l + 32, ... (a pointer step a piece: a division and a remainder a
// piece were about a tenth of a state-pass step's instructions).
constexpr int kCopyWarps = 8;
__device__ __forceinline__ void copy_async(float* dst, int ld, const float* src, int src_ld, int rows, int cols,
                                           int warp, int lane) {
  for (int c = 4 * lane; c < cols; c += 128) {
    uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst + warp * ld + c));
    const float* from = src + static_cast<int64_t>(warp) * src_ld + c;
    for (int r = warp; r < rows; r += kCopyWarps, d += 4 * kCopyWarps * ld, from += int64_t{kCopyWarps} * src_ld)
      cp_async16(d, from);
  }
}

}  // namespace hybrid::ops::detail
