// Sums across a warp and across a block, shared by the kernels that reduce rows.
#pragma once

namespace hybrid::ops::detail {

// Every lane gets the sum over the 32 lanes (all must take part).
template <class S>
__device__ __forceinline__ S warp_sum(S x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Lane l gets the sum of lanes l .. 31's x (all must take part): a reverse inclusive scan, its
// additions in a fixed order.
template <class S>
__device__ __forceinline__ S warp_suffix_sum(S x) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const S y = __shfl_down_sync(0xffffffffu, x, o);
    if (lane + o < 32) x += y;
  }
  return x;
}

// A row of D <= 32 N elements into a warp's registers, lane l holding elements l, l + 32, ...
// (zeros past D, and everywhere for a null row, i.e. padding); returns the row's sum of squares,
// on every lane.
template <int N, class T>
__device__ __forceinline__ float warp_load_row(const T* __restrict__ row, int D, float (&v)[N]) {
  const int lane = threadIdx.x % 32;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int d = lane + 32 * i;
    v[i] = (row && d < D) ? static_cast<float>(row[d]) : 0.f;
    ss += v[i] * v[i];
  }
  return warp_sum(ss);
}

// Every thread gets the sum over the block (all must take part; blockDim a multiple of 32, at
// most 1024). `scratch` holds one S a warp; it may be reused once this returns.
template <class S>
__device__ __forceinline__ S block_sum(S x, S* scratch) {
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (threadIdx.x % 32 == 0) scratch[warp] = x;
  __syncthreads();
  S total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

}  // namespace hybrid::ops::detail
