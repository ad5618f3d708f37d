// Tensor-core products at float32 accuracy, shared by the delta-rule kernels: mma.sync
// m16n8k8 TF32 in the "3xTF32" form, x = hi + lo with hi and lo TF32,
// a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi (the dropped a_lo b_lo is below float32 rounding).
// Plain TF32 keeps 10 mantissa bits, which the delta rule's accuracy thresholds forbid inside
// the recurrence; warp_gemm<NT, false> takes it (operands rounded to nearest, one mma) for the
// products that DeltaRuleArgs::tf32_products allows it, as cuBLAS's TF32 products do.
//
// Fragments of one warp (lane = 4 g + t): a = A(g, t), A(g + 8, t), A(g, t + 4), A(g + 8, t + 4);
// b = B(t, g), B(t + 4, g); d = D(g, 2t), D(g, 2t + 1), D(g + 8, 2t), D(g + 8, 2t + 1).
#pragma once

#include <cstdint>

#include "accumulator_pairs.cuh"

namespace hybrid::ops::detail {

// TF32 keeps the top 10 mantissa bits of a float32 (the tensor core ignores the low 13), so
// x = hi + lo splits exactly by masking, and lo's own dropped bits cost under 2^-20 |x|.
struct Split {
  uint32_t hi, lo;
};
__device__ __forceinline__ Split split(float x) {
  constexpr uint32_t kTf32 = 0xffffe000u;
  const uint32_t hi = __float_as_uint(x) & kTf32;
  return {hi, __float_as_uint(x - __uint_as_float(hi)) & kTf32};
}

// x rounded to TF32 (to nearest), the operand of a plain TF32 product.
__device__ __forceinline__ uint32_t round_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
template <bool kPrecise>
__device__ __forceinline__ Split operand(float x) {
  if constexpr (kPrecise) return split(x);
  else return Split{round_tf32(x), 0u};
}

// d += a b for a 16 x 8 x 8 tile from split operands.
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const Split (&a)[4], const Split (&b)[2]) {
  auto mma = [&d](uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  };
  mma(a[0].lo, a[1].lo, a[2].lo, a[3].lo, b[0].hi, b[1].hi);  // small terms first
  mma(a[0].hi, a[1].hi, a[2].hi, a[3].hi, b[0].lo, b[1].lo);
  mma(a[0].hi, a[1].hi, a[2].hi, a[3].hi, b[0].hi, b[1].hi);
}

// d += a b for a 16 x 8 x 8 tile in plain TF32 (the operands' hi parts, rounded).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const Split (&a)[4], const Split (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0].hi), "r"(a[1].hi), "r"(a[2].hi), "r"(a[3].hi), "r"(b[0].hi), "r"(b[1].hi));
}

// d += a b, 3xTF32 with kPrecise, plain TF32 otherwise.
template <bool kPrecise>
__device__ __forceinline__ void mma_k8(float (&d)[4], const Split (&a)[4], const Split (&b)[2]) {
  if constexpr (kPrecise) mma_3xtf32(d, a, b);
  else mma_tf32(d, a, b);
}

// The A fragment of a 16 x 8 tile whose element (r, c) is at A[r * rs + c * cs], split (or
// rounded to TF32 without kPrecise).
template <bool kPrecise = true>
__device__ __forceinline__ void load_a(const float* A, int rs, int cs, int g, int t, Split (&a)[4]) {
  a[0] = operand<kPrecise>(A[g * rs + t * cs]), a[1] = operand<kPrecise>(A[(g + 8) * rs + t * cs]);
  a[2] = operand<kPrecise>(A[g * rs + (t + 4) * cs]), a[3] = operand<kPrecise>(A[(g + 8) * rs + (t + 4) * cs]);
}

// The B fragment of an 8 x 8 tile whose element (r, c) is at B[r * rs + c * cs], likewise.
template <bool kPrecise = true>
__device__ __forceinline__ void load_b(const float* B, int rs, int cs, int g, int t, Split (&b)[2]) {
  b[0] = operand<kPrecise>(B[t * rs + g * cs]), b[1] = operand<kPrecise>(B[(t + 4) * rs + g * cs]);
}

// acc += A B over `steps` k-steps of 8 for this warp's NT 16 x 8 output tiles side by side
// (B advances 8 columns per tile; A's fragment is split once for all of them). Two
// accumulators by k-step parity halve the chain of dependent mma's; the caller adds them.
// kPrecise false: plain TF32.
template <int NT, bool kPrecise = true>
__device__ __forceinline__ void warp_gemm(const float* A, int a_rs, int a_cs, const float* B, int b_rs, int b_cs,
                                          int steps, int g, int t, float (&acc)[NT][2][4]) {
  for (int ks = 0; ks < steps; ks += 2) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      if (ks + p >= steps) break;
      Split a[4];
      load_a<kPrecise>(A + (ks + p) * 8 * a_cs, a_rs, a_cs, g, t, a);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        Split b[2];
        load_b<kPrecise>(B + (ks + p) * 8 * b_rs + n * 8 * b_cs, b_rs, b_cs, g, t, b);
        mma_k8<kPrecise>(acc[n][p], a, b);
      }
    }
  }
}

}  // namespace hybrid::ops::detail
