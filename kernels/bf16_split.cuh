// Tensor-core products from float32 operands split into two bf16, for the state pass: x ~ hi + lo
// with hi = bf16(x), lo = bf16(x - hi), 16 significant bits (relative error at most 2^-17), and
// mma.sync m16n8k16 sums a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi in float32 (the dropped a_lo b_lo
// is about 2^-16 relative). Against 3xTF32 (tf32x3.cuh, 22 bits): twice the depth an instruction,
// and operands stored split in shared memory load with ldmatrix, four 8 x 8 tiles an instruction,
// where TF32 fragments take a load and a split per element.
//
// Shared memory holds an operand as two planes of bf16 (hi and lo) with a row stride in bytes;
// SplitOperand names them. ldmatrix reads 8 rows of 16 bytes a tile: an odd number of 16-byte
// units a row keeps those 8 rows on distinct banks.
//
// Fragments (lane = 4 g + t; two bf16 a register, the lower column in the low half):
// a = A(g, 2t..), A(g + 8, 2t..), A(g, 2t + 8..), A(g + 8, 2t + 8..); b = B(2t.., g), B(2t + 8.., g);
// d = D(g, 2t), D(g, 2t + 1), D(g + 8, 2t), D(g + 8, 2t + 1).
#pragma once

#include <cstdint>

#include "accumulator_pairs.cuh"

namespace hybrid::ops::detail {

// Two adjacent floats (x0 the lower column) as bf16 pairs hi and lo.
struct SplitPair {
  uint32_t hi, lo;
};
__device__ __forceinline__ uint32_t bf16x2(float x0, float x1) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x1), "f"(x0));
  return r;
}
__device__ __forceinline__ SplitPair split_pair(float x0, float x1) {
  const uint32_t hi = bf16x2(x0, x1);
  return {hi, bf16x2(x0 - __uint_as_float(hi << 16), x1 - __uint_as_float(hi & 0xffff0000u))};
}

// An operand in shared memory: element (r, c)'s hi at byte base + r row_bytes + 2c, its lo
// lo_bytes further on.
struct SplitOperand {
  uint32_t base;  // shared-memory address
  int row_bytes, lo_bytes;
  __device__ __forceinline__ uint32_t at(int r, int c) const { return base + r * row_bytes + 2 * c; }
};

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// acc[n] += A B for this warp's NT (1 or 2) 16 x 8 output tiles side by side, over `steps`
// k-steps of 16: A's rows a_r0 .. + 15 (stored as A, or as A^T when a_transposed), B's columns
// b_n0 .. + 8 NT - 1 (stored as B, rows along k). Two accumulators by k-step parity halve the
// chain of dependent mma's; pair_sum (accumulator_pairs.cuh) adds them. a_split false: A is
// exact in bf16 (one plane, lo_bytes unused), so a_lo b_hi drops out: two products, not three.
template <int NT, bool a_transposed, bool a_split = true>
__device__ __forceinline__ void warp_gemm_split(const SplitOperand& A, int a_r0, const SplitOperand& B, int b_n0,
                                                int steps, int lane, float (&acc)[NT][2][4]) {
  static_assert(NT == 1 || NT == 2);
  // The row this lane addresses: tile m = lane / 8 of the four, row lane % 8 in it.
  const int m = lane / 8, row = lane % 8;
  for (int ks0 = 0; ks0 < steps; ks0 += 2) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      if (ks0 + p >= steps) break;
      const int k0 = 16 * (ks0 + p);
      const uint32_t a_addr = a_transposed ? A.at(k0 + (m / 2) * 8 + row, a_r0 + (m % 2) * 8)
                                           : A.at(a_r0 + (m % 2) * 8 + row, k0 + (m / 2) * 8);
      uint32_t a_hi[4], a_lo[4];
      if (a_transposed) ldsm_x4_trans(a_hi, a_addr);
      else ldsm_x4(a_hi, a_addr);
      if constexpr (a_split) {
        if (a_transposed) ldsm_x4_trans(a_lo, a_addr + A.lo_bytes);
        else ldsm_x4(a_lo, a_addr + A.lo_bytes);
      }
      const uint32_t b_addr = B.at(k0 + (m % 2) * 8 + row, b_n0 + (m / 2) * 8);
      uint32_t b_hi[4], b_lo[4];
      if constexpr (NT == 2) ldsm_x4_trans(b_hi, b_addr), ldsm_x4_trans(b_lo, b_addr + B.lo_bytes);
      else ldsm_x2_trans(b_hi[0], b_hi[1], b_addr), ldsm_x2_trans(b_lo[0], b_lo[1], b_addr + B.lo_bytes);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if constexpr (a_split) mma_bf16(acc[n][p], a_lo, b_hi[2 * n], b_hi[2 * n + 1]);  // small terms first
        mma_bf16(acc[n][p], a_hi, b_lo[2 * n], b_lo[2 * n + 1]);
        mma_bf16(acc[n][p], a_hi, b_hi[2 * n], b_hi[2 * n + 1]);
      }
    }
  }
}

}  // namespace hybrid::ops::detail
