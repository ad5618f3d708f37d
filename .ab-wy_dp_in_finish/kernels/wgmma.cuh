// Hopper's warpgroup products (wgmma, sm_90a): four warps issue one asynchronous product whose
// operands the tensor cores read from shared memory through descriptors, where mma.sync needs
// each warp to load, round and hold its fragments (for a slice of the finish kernel's products:
// six instructions a warp in place of about 200, kernel notes step 32).
//
// Layout without swizzle: an operand is made of 8 x 16-byte "core matrices" (8 rows of 16
// contiguous bytes, 128 bytes together); its descriptor gives the start address and two strides,
// LBO between core matrices along k and SBO between groups of 8 rows (m or n), for both majors
// (scripts/gpu/wgmma_probe.cu's answer on the H200). Swizzled K-major (rows of 64 or 128 bytes of
// k as TMA writes them with that swizzle, 8-row groups 512 or 1024 bytes apart, aligned to that):
// SBO the 8-row groups' distance, LBO unused, and a k-step further in the row is the start
// address plus its unswizzled byte offset. Swizzled MN-major (bf16, 128-byte swizzle: atoms of 64
// elements along m or n by 8 rows of k): LBO the distance between atoms along m or n, SBO between
// 8-row groups along k (the registers passes' keys as n = 128 over two atoms 8 KB apart, or n = 96
// over one atom and half the next, checked by their test against the mma.sync pass). TF32 operands are K-major only.
//
// The accumulators of m64nNk8 (f32): warp w of the warpgroup holds rows 16 w .. 16 w + 15, n8
// tile j in d[j][0..3] as an mma.sync m16n8 D fragment: (g, 2t), (g, 2t + 1), (g + 8, 2t),
// (g + 8, 2t + 1) for lane 4 g + t.
#pragma once

#include <cstdint>

namespace hybrid::ops::detail {

// A descriptor for shared address addr with strides lbo and sbo in bytes (multiples of 16):
// start, LBO and SBO in 16-byte units, no base offset; `swizzle` 0 for none, 1 for 128-byte rows
// (TMA's CU_TENSOR_MAP_SWIZZLE_128B), 2 for 64-byte, 3 for 32-byte.
__device__ __forceinline__ uint64_t wgmma_descriptor(uint32_t addr, uint32_t lbo, uint32_t sbo, uint32_t swizzle = 0) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32 | static_cast<uint64_t>(swizzle) << 62;
}

// The descriptor of a K-major operand that TMA wrote as dense rows of row_bytes (32, 64 or 128)
// with the swizzle of that width: from row first_row (a multiple of 8), k-step k_step of 32 bytes
// into the row (8 TF32, 16 bf16).
__device__ __forceinline__ uint64_t swizzled_rows_descriptor(const void* rows, uint32_t row_bytes, int first_row,
                                                            int k_step) {
  const uint32_t start = static_cast<uint32_t>(__cvta_generic_to_shared(rows)) + row_bytes * first_row + 32 * k_step;
  return wgmma_descriptor(start, 16, 8 * row_bytes, row_bytes == 128 ? 1 : row_bytes == 64 ? 2 : 3);
}
// The first float of shared memory at or after x on a swizzle's 1024-byte repeat, where swizzled
// TMA boxes go (the caller's allocation holds 1024 bytes more).
__device__ __forceinline__ float* swizzle_aligned(float* x) {
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(x)) % 1024;
  return x + (1024 - misalign) % 1024 / sizeof(float);
}

// Before a warpgroup's first product on accumulators that other instructions wrote. Operands
// that TMA wrote are ready once their mbarrier's phase completes; operands written by st.shared
// or cp.async need their writers' fence_async_shared (cp_async.cuh) and a barrier first.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Until at most kPending of the warpgroup's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving uses of accumulators across a wait: each register read and
// written here, after wgmma_wait.
template <int kTiles>
__device__ __forceinline__ void wgmma_hold(float (&d)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// f(j, half, r, c, x0, x1) for each pair of an m64nN accumulator (kTiles n8 tiles) the calling
// thread holds (lane = 4 g + t): rows row0 + g + 8 half, columns col0 + 8 j + 2 t (+ 1), the pair
// d[j][2 half], d[j][2 half + 1] (references).
template <int kTiles, class F>
__device__ __forceinline__ void for_each_accumulator_pair(float (&d)[kTiles][4], int row0, int col0, int lane, F&& f) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      f(j, half, row0 + g + 8 * half, col0 + 8 * j + 2 * t, d[j][2 * half], d[j][2 * half + 1]);
}

#define HYBRID_WGMMA_TILE(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
// An m64n64 accumulator (eight n8 tiles): its 32 registers in the instruction, and as operands.
#define HYBRID_WGMMA_D64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define HYBRID_WGMMA_TILES8                                                              \
  HYBRID_WGMMA_TILE(0), HYBRID_WGMMA_TILE(1), HYBRID_WGMMA_TILE(2), HYBRID_WGMMA_TILE(3), \
      HYBRID_WGMMA_TILE(4), HYBRID_WGMMA_TILE(5), HYBRID_WGMMA_TILE(6), HYBRID_WGMMA_TILE(7)
// The same for an m64n48 accumulator (six n8 tiles, 24 registers).
#define HYBRID_WGMMA_D48 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23}, "
// And for an m64n32 accumulator (four n8 tiles, 16 registers).
#define HYBRID_WGMMA_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
#define HYBRID_WGMMA_TILES4 \
  HYBRID_WGMMA_TILE(0), HYBRID_WGMMA_TILE(1), HYBRID_WGMMA_TILE(2), HYBRID_WGMMA_TILE(3)
#define HYBRID_WGMMA_TILES6                                                              \
  HYBRID_WGMMA_TILE(0), HYBRID_WGMMA_TILE(1), HYBRID_WGMMA_TILE(2), HYBRID_WGMMA_TILE(3), \
      HYBRID_WGMMA_TILE(4), HYBRID_WGMMA_TILE(5)
// d += A B for A (64 x 8) and B (8 x N) TF32 from shared memory (K-major both), N = 8 kN8
// (48 or 64), d as the first kN8 tiles of the array.
template <int kN8, int kTiles>
__device__ __forceinline__ void wgmma_tf32_accumulate(float (&d)[kTiles][4], uint64_t a, uint64_t b) {
  static_assert((kN8 == 6 || kN8 == 8) && kTiles >= kN8, "m64n48k8 and m64n64k8 only");
  if constexpr (kN8 == 8) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
        HYBRID_WGMMA_D64
        "%32, %33, p, 1, 1;\n}"
        : HYBRID_WGMMA_TILES8
        : "l"(a), "l"(b), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %26, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n48k8.f32.tf32.tf32 "
        HYBRID_WGMMA_D48
        "%24, %25, p, 1, 1;\n}"
        : HYBRID_WGMMA_TILES6
        : "l"(a), "l"(b), "r"(1));
  }
}
// d (+)= A B for bf16 A (64 x 16) from registers and B (16 x N) from shared memory, N = 8 kN8 (64,
// 96 or 128). A's fragment is an mma.sync m16n8k16 A fragment for warp w's rows 16 w .. 16 w + 15:
// (g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..) for lane 4 g + t, bf16 pairs (the
// lower column in the low half); accumulator_fragment makes it from an accumulator's columns.
// kTransposeB: B MN-major. A's registers are read until the product's wgmma_wait: written by other
// instructions, they need a wgmma_fence between those writes and the product.
template <int kN8, int kTransposeB, int kTiles>
__device__ __forceinline__ void wgmma_bf16_registers(float (&d)[kTiles][4], const uint32_t (&a)[4], uint64_t b,
                                                     int accumulate) {
  static_assert((kN8 == 8 || kN8 == 12 || kN8 == 16) && kTiles >= kN8, "m64n64k16, m64n96k16 and m64n128k16 only");
  if constexpr (kN8 == 8) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        HYBRID_WGMMA_D64
        "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}"
        : HYBRID_WGMMA_TILES8
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(kTransposeB));
  } else if constexpr (kN8 == 12) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, "
        "{%48, %49, %50, %51}, %52, p, 1, 1, %54;\n}"
        : HYBRID_WGMMA_TILES8, HYBRID_WGMMA_TILE(8), HYBRID_WGMMA_TILE(9), HYBRID_WGMMA_TILE(10), HYBRID_WGMMA_TILE(11)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(kTransposeB));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}"
        : HYBRID_WGMMA_TILES8,
          HYBRID_WGMMA_TILE(8), HYBRID_WGMMA_TILE(9), HYBRID_WGMMA_TILE(10), HYBRID_WGMMA_TILE(11),
          HYBRID_WGMMA_TILE(12), HYBRID_WGMMA_TILE(13), HYBRID_WGMMA_TILE(14), HYBRID_WGMMA_TILE(15)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(kTransposeB));
  }
}
// d (+)= A B for bf16 A (64 x 16) and B (16 x N), both K-major from shared memory, N = 8 kN8 (32,
// 48 or 64), d as the first kN8 tiles of the array.
template <int kN8, int kTiles>
__device__ __forceinline__ void wgmma_bf16_shared(float (&d)[kTiles][4], uint64_t a, uint64_t b, int accumulate) {
  static_assert((kN8 == 4 || kN8 == 6 || kN8 == 8) && kTiles >= kN8, "m64n32k16, m64n48k16 and m64n64k16 only");
  if constexpr (kN8 == 4) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        HYBRID_WGMMA_D32
        "%16, %17, p, 1, 1, 0, 0;\n}"
        : HYBRID_WGMMA_TILES4
        : "l"(a), "l"(b), "r"(accumulate));
  } else if constexpr (kN8 == 8) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        HYBRID_WGMMA_D64
        "%32, %33, p, 1, 1, 0, 0;\n}"
        : HYBRID_WGMMA_TILES8
        : "l"(a), "l"(b), "r"(accumulate));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %26, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n48k16.f32.bf16.bf16 "
        HYBRID_WGMMA_D48
        "%24, %25, p, 1, 1, 0, 0;\n}"
        : HYBRID_WGMMA_TILES6
        : "l"(a), "l"(b), "r"(accumulate));
  }
}
#undef HYBRID_WGMMA_TILES4
#undef HYBRID_WGMMA_D32
#undef HYBRID_WGMMA_TILES6
#undef HYBRID_WGMMA_D48
#undef HYBRID_WGMMA_TILES8
#undef HYBRID_WGMMA_D64
#undef HYBRID_WGMMA_TILE

// The A fragment of k-step ks (columns 16 ks .. 16 ks + 15) of an m64nN accumulator, as pairs
// f(x0, x1) makes of two adjacent columns' values (e.g. the hi and lo planes of a split): the
// accumulator layout's tiles 2 ks and 2 ks + 1 are the fragment's halves (the layout FlashAttention
// 3 passes its scores on in).
template <int kTiles, class Pair>
__device__ __forceinline__ void accumulator_fragment(const float (&d)[kTiles][4], int ks, uint32_t (&a)[4], Pair&& f) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    a[2 * i] = f(d[2 * ks + i][0], d[2 * ks + i][1]);
    a[2 * i + 1] = f(d[2 * ks + i][2], d[2 * ks + i][3]);
  }
}

}  // namespace hybrid::ops::detail
