// Chunks handed from a state pass to a kernel on another stream as the pass finishes them (the
// reverse pass's dV' to wy_backward, which then runs on the SMs the pass leaves idle instead of
// after it). The pass's thread that issued a chunk's bulk tensor stores waits for them to complete,
// orders them before its generic accesses (proxy fence) and adds 1 to the chunk's counter with
// release semantics; the reader's thread waits for the count it expects (a chain a block of
// columns) with acquire semantics and orders that before its own bulk tensor loads. The counters
// are zeroed before the pass; blocks_started counts the pass's blocks as they start, so that the
// reader launches only once every pass block holds its SM (wait_for_pass_kernel), never taking SMs a
// pass block still needs while it waits on that block's chunks. And the kernel that waits is
// launched after the kernel it waits on, in host order: streams share a few hardware queues, and
// where the two land in one, a waiting kernel launched first holds the other behind it (a form of
// the chunk terms beside the forward pass hung so: kernel notes, step 55).
#pragma once

#include <cstdint>

#include "cp_async.cuh"

namespace hybrid::ops::detail {
namespace {

// The bulk tensor stores committed before the newest kPending groups are complete, and ordered
// before this thread's later generic accesses.
template <int kPending>
__device__ __forceinline__ void bulk_stores_complete() {
  bulk_stores_wait<kPending>();
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

__device__ __forceinline__ void signal_chunk(int* counter) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(counter) : "memory");
}

__device__ __forceinline__ int load_acquire(const int* counter) {
  int value;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(counter) : "memory");
  return value;
}

// Waits until *counter reaches `count`; then this thread's bulk tensor loads see what the signalling
// threads' stores wrote.
__device__ __forceinline__ void wait_for_chunk(const int* counter, int count) {
  while (load_acquire(counter) < count) __nanosleep(256);
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

}  // namespace
}  // namespace hybrid::ops::detail
