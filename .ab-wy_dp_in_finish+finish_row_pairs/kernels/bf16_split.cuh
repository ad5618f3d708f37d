// Tensor-core products from float32 operands split into two bf16, for the state pass: x ~ hi + lo
// with hi = bf16(x), lo = bf16(x - hi), 16 significant bits (relative error at most 2^-17), and
// mma.sync m16n8k16 sums a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi in float32 (the dropped a_lo b_lo
// is about 2^-16 relative). Against 3xTF32 (tf32x3.cuh, 22 bits): twice the depth an instruction,
// and operands stored split in shared memory load with ldmatrix, four 8 x 8 tiles an instruction,
// where TF32 fragments take a load and a split per element.
//
// Shared memory holds an operand as two planes of bf16 (hi and lo) with a row stride in bytes;
// SplitOperand names them. ldmatrix reads 8 rows of 16 bytes a tile: an odd number of 16-byte
// units a row keeps those 8 rows on distinct banks; or, for rows of 256 bytes (a C x C matrix's
// split rows, C = 64: its hi plane's 128 bytes, then its lo plane's), the swizzle below does.
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
// The two floats a bf16 pair holds (bf16x2's inverse: x0 from the low half).
__device__ __forceinline__ float2 bf16x2_floats(uint32_t pair) {
  return make_float2(__uint_as_float(pair << 16), __uint_as_float(pair & 0xffff0000u));
}
// The four floats two bf16 pairs hold (four adjacent bf16 loaded as one 8-byte word), in order.
__device__ __forceinline__ float4 bf16x4_floats(uint2 pairs) {
  const float2 a = bf16x2_floats(pairs.x), b = bf16x2_floats(pairs.y);
  return make_float4(a.x, a.y, b.x, b.y);
}
// x0 and x1 rounded to bf16 and stored as a pair (x0 at p) in one 4-byte global store.
__device__ __forceinline__ void stg_bf16x2(uint16_t* p, float x0, float x1) {
  asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(bf16x2(x0, x1)));
}
__device__ __forceinline__ SplitPair split_pair(float x0, float x1) {
  const uint32_t hi = bf16x2(x0, x1);
  const float2 h = bf16x2_floats(hi);
  return {hi, bf16x2(x0 - h.x, x1 - h.y)};
}

// Swizzled split rows of a 64 x 64 matrix (split_chunk_matrices, the state pass's M and QKG): row r's
// 16-byte unit u (u < 8 its hi plane's, 8 .. 15 its lo plane's) stored as unit u ^ (r % 8), so
// that the 8 rows of an ldmatrix tile fall on distinct banks without padding: a matrix is then one
// dense 16 KB block in global memory as in shared memory (one bulk copy). In 32-bit words:
__host__ __device__ constexpr int swizzled_word(int r, int w) { return w ^ ((r & 7) << 2); }

// A shared-memory pointer as the 32-bit address ldmatrix and SplitOperand take.
__device__ __forceinline__ uint32_t shared_address(const void* x) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(x));
}

// An operand in shared memory: element (r, c)'s hi at byte base + r row_bytes + 2c (with the
// swizzle: unit 2c / 16 of row r moved as above), its lo lo_bytes further on (128 when swizzled).
struct SplitOperand {
  uint32_t base;  // shared-memory address
  int row_bytes, lo_bytes;
  bool swizzled = false;
  __device__ __forceinline__ uint32_t at(int r, int c) const {
    return base + r * row_bytes + (swizzled ? (2 * c) ^ ((r & 7) << 4) : 2 * c);
  }
};

// Elements c, c + 1 (c even) of row r of a 64 x 64 matrix in swizzled split rows at `base` (the
// layout SplitOperand{.., 256, 128, true} reads), split as they are stored: one 4-byte store a plane.
__device__ __forceinline__ void store_split_pair(char* base, int r, int c, float x0, float x1) {
  const SplitPair x = split_pair(x0, x1);
  char* at = base + r * 256 + ((2 * c) ^ ((r & 7) << 4));
  *reinterpret_cast<uint32_t*>(at) = x.hi;
  *reinterpret_cast<uint32_t*>(at + 128) = x.lo;
}
// The same for four elements (c a multiple of 4): one 8-byte store a plane.
__device__ __forceinline__ void store_split4(char* base, int r, int c, const float (&x)[4]) {
  const SplitPair a = split_pair(x[0], x[1]), b = split_pair(x[2], x[3]);
  char* at = base + r * 256 + ((2 * c) ^ ((r & 7) << 4));
  *reinterpret_cast<uint2*>(at) = make_uint2(a.hi, b.hi);
  *reinterpret_cast<uint2*>(at + 128) = make_uint2(a.lo, b.lo);
}

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
// stmatrix (sm_90), ldmatrix's inverse: thread 8 j + r gives the address of row r of tile j.
__device__ __forceinline__ void stsm_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};" ::"r"(addr), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The k-steps of a product, two at a time: f(p, k0) for step k0 / 16 with accumulator parity p.
template <class F>
__device__ __forceinline__ void for_each_k_step(int steps, F&& f) {
  for (int ks0 = 0; ks0 < steps; ks0 += 2) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      if (ks0 + p >= steps) break;
      f(p, 16 * (ks0 + p));
    }
  }
}

// A's fragment for k-step k0: rows a_r0 .. + 15 and columns k0 .. + 15 of A (stored as A, or as
// A^T when a_transposed); lo only when split.
template <bool a_transposed, bool a_split>
__device__ __forceinline__ void load_a(const SplitOperand& A, int a_r0, int k0, int lane, uint32_t (&hi)[4],
                                       uint32_t (&lo)[4]) {
  const int m = lane / 8, row = lane % 8;  // the row this lane addresses: tile m of the four, row in it
  const uint32_t addr = a_transposed ? A.at(k0 + (m / 2) * 8 + row, a_r0 + (m % 2) * 8)
                                     : A.at(a_r0 + (m % 2) * 8 + row, k0 + (m / 2) * 8);
  if (a_transposed) ldsm_x4_trans(hi, addr);
  else ldsm_x4(hi, addr);
  if constexpr (a_split) {
    if (a_transposed) ldsm_x4_trans(lo, addr + A.lo_bytes);
    else ldsm_x4(lo, addr + A.lo_bytes);
  }
}

// B's fragments for k-step k0: rows k0 .. + 15, columns b_n0 .. + 8 NT - 1 (stored as B, rows along
// k); lo only when split.
template <int NT, bool b_split = true>
__device__ __forceinline__ void load_b(const SplitOperand& B, int b_n0, int k0, int lane, uint32_t (&hi)[4],
                                       uint32_t (&lo)[4]) {
  const int m = lane / 8, row = lane % 8;
  const uint32_t addr = B.at(k0 + (m % 2) * 8 + row, b_n0 + (m / 2) * 8);
  if constexpr (NT == 2) {
    ldsm_x4_trans(hi, addr);
    if constexpr (b_split) ldsm_x4_trans(lo, addr + B.lo_bytes);
  } else {
    ldsm_x2_trans(hi[0], hi[1], addr);
    if constexpr (b_split) ldsm_x2_trans(lo[0], lo[1], addr + B.lo_bytes);
  }
}

// B's fragments for k-step k0 and the two 8-column tiles n0 .. + 15, B given by the rows of B^T
// (n along rows, k along columns: B(k, n) = Bt(n, k), e.g. keys for K K^T): b[0], b[1] for
// columns n0 .. + 7, b[2], b[3] for n0 + 8 .. + 15. One plane (exact in bf16).
__device__ __forceinline__ void load_b_from_rows(const SplitOperand& Bt, int n0, int k0, int lane, uint32_t (&b)[4]) {
  const int m = lane / 8, row = lane % 8;
  ldsm_x4(b, Bt.at(n0 + (m / 2) * 8 + row, k0 + (m % 2) * 8));
}

// acc[n][p] += a b over the NT tiles, small terms first; without a_split, A is exact in bf16;
// without b_split, B is taken as its hi plane alone (B rounded to bf16: for products whose result
// leaves the chain, such as an output).
template <int NT, bool a_split, bool b_split = true>
__device__ __forceinline__ void mma_split(float (&acc)[NT][2][4], int p, const uint32_t (&a_hi)[4],
                                          const uint32_t (&a_lo)[4], const uint32_t (&b_hi)[4],
                                          const uint32_t (&b_lo)[4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    if constexpr (a_split) mma_bf16(acc[n][p], a_lo, b_hi[2 * n], b_hi[2 * n + 1]);
    if constexpr (b_split) mma_bf16(acc[n][p], a_hi, b_lo[2 * n], b_lo[2 * n + 1]);
    mma_bf16(acc[n][p], a_hi, b_hi[2 * n], b_hi[2 * n + 1]);
  }
}

// The k-steps of a product with the next step's fragments in flight: load(f, k0) fills a Frags
// with step k0 / 16's fragments (ldmatrix), use(f, p) issues its mma's with accumulator parity p.
// Step k + 1's loads are issued before step k's mma's, so ldmatrix's latency overlaps the mma's
// instead of stalling the first mma of every step (ncu's source page, sixteenth session: 500-670
// stall samples on each). Two Frags live at once. steps >= 1.
template <class Frags, class Load, class Use>
__device__ __forceinline__ void for_each_k_step_pipelined(int steps, Load&& load, Use&& use) {
  Frags f[2];
  load(f[0], 0);
#pragma unroll  // completely where steps is a constant (the state pass's fixed-K instances)
  for (int ks0 = 0; ks0 < steps; ks0 += 2) {
    if (ks0 + 1 < steps) load(f[1], 16 * (ks0 + 1));
    use(f[0], 0);
    if (ks0 + 1 >= steps) break;
    if (ks0 + 2 < steps) load(f[0], 16 * (ks0 + 2));
    use(f[1], 1);
  }
}

// acc[n] += A B for this warp's NT (1 or 2) 16 x 8 output tiles side by side, over `steps`
// k-steps of 16: A's rows a_r0 .. + 15 (stored as A, or as A^T when a_transposed), B's columns
// b_n0 .. + 8 NT - 1 (stored as B, rows along k). Two accumulators by k-step parity halve the
// chain of dependent mma's; pair_sum (accumulator_pairs.cuh) adds them. a_split false: A is
// exact in bf16 (one plane, lo_bytes unused), so a_lo b_hi drops out: two products, not three.
// b_split false: B's hi plane alone (B rounded to bf16), a_hi b_lo drops out.
template <int NT, bool a_transposed, bool a_split = true, bool b_split = true>
__device__ __forceinline__ void warp_gemm_split(const SplitOperand& A, int a_r0, const SplitOperand& B, int b_n0,
                                                int steps, int lane, float (&acc)[NT][2][4]) {
  static_assert(NT == 1 || NT == 2);
  struct Frags {
    uint32_t a_hi[4], a_lo[4], b_hi[4], b_lo[4];
  };
  for_each_k_step_pipelined<Frags>(
      steps,
      [&](Frags& f, int k0) {
        load_a<a_transposed, a_split>(A, a_r0, k0, lane, f.a_hi, f.a_lo);
        load_b<NT, b_split>(B, b_n0, k0, lane, f.b_hi, f.b_lo);
      },
      [&](const Frags& f, int p) { mma_split<NT, a_split, b_split>(acc, p, f.a_hi, f.a_lo, f.b_hi, f.b_lo); });
}

// acc0 += A0 B and acc1 += A1 B, A0 and A1 exact in bf16 and stored as themselves (rows a_r0 ..
// + 15 of each), B's fragments loaded once for both; acc1 from B's hi plane alone unless b1_split.
template <int NT, bool b1_split = true>
__device__ __forceinline__ void warp_gemm_split_pair(const SplitOperand& A0, const SplitOperand& A1, int a_r0,
                                                     const SplitOperand& B, int b_n0, int steps, int lane,
                                                     float (&acc0)[NT][2][4], float (&acc1)[NT][2][4]) {
  static_assert(NT == 1 || NT == 2);
  struct Frags {
    uint32_t a0[4], a1[4], b_hi[4], b_lo[4];
  };
  for_each_k_step_pipelined<Frags>(
      steps,
      [&](Frags& f, int k0) {
        uint32_t unused[4];
        load_b<NT>(B, b_n0, k0, lane, f.b_hi, f.b_lo);
        load_a<false, false>(A0, a_r0, k0, lane, f.a0, unused);
        load_a<false, false>(A1, a_r0, k0, lane, f.a1, unused);
      },
      [&](const Frags& f, int p) {
        mma_split<NT, false>(acc0, p, f.a0, f.a0, f.b_hi, f.b_lo);
        mma_split<NT, false, b1_split>(acc1, p, f.a1, f.a1, f.b_hi, f.b_lo);
      });
}

}  // namespace hybrid::ops::detail
