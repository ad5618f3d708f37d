// A warp's mma.sync accumulators read out by pairs of adjacent outputs, shared by the 3xTF32
// (tf32x3.cuh) and bf16-split (bf16_split.cuh) products: both fill acc[n][parity][4] in the
// m16n8 output layout, lane = 4 g + t holding D(g, 2t), D(g, 2t + 1), D(g + 8, 2t), D(g + 8, 2t + 1).
#pragma once

namespace hybrid::ops::detail {

// A warp_gemm<NT> (or warp_gemm_split) result by pairs of adjacent outputs: f(n, half, i, j) for
// each pair D(i, j), D(i, j + 1) this lane holds, (r0, c0) the corner of the warp's tiles;
// pair_sum(acc[n], half) is the pair's value (the two parity accumulators added).
template <int NT, class F>
__device__ __forceinline__ void for_each_pair(int r0, int c0, int g, int t, F&& f) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int half = 0; half < 2; ++half) f(n, half, r0 + g + 8 * half, c0 + 8 * n + 2 * t);
}

__device__ __forceinline__ float2 pair_sum(const float (&acc)[2][4], int half) {
  return make_float2(acc[0][2 * half] + acc[1][2 * half], acc[0][2 * half + 1] + acc[1][2 * half + 1]);
}

}  // namespace hybrid::ops::detail
