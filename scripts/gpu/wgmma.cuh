// Hopper's wgmma for the standalone programs in scripts/gpu (wgmma_probe.cu, which found the
// descriptor strides, and update_stage_bench.cu): m64n32k16, bf16 in, float32 accumulators, A
// from registers (the mma.sync m16n8k16 A fragment, warp w of the warpgroup rows 16w ..), B from
// shared memory through a descriptor.
#pragma once

#include <cstdint>

#include "../../kernels/wgmma.cuh"  // wgmma_descriptor: the strides this probe found

using hybrid::ops::detail::wgmma_descriptor;

// d = A B (accumulate 0) or d += A B (accumulate 1); kTransB 1: B MN-major, 0: K-major. scale-d
// is a predicate, set from accumulate.
template <int kTransB>
__device__ __forceinline__ void wgmma_m64n32k16(float (&d)[16], const uint32_t (&a)[4], uint64_t desc,
                                                int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "{%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(kTransB));
}
