// Sums across a warp and across a block, shared by the kernels that reduce rows.
#pragma once

namespace hybrid::ops::detail {

// Every lane gets the sum over the 32 lanes (all must take part).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Every thread gets the sum over the block (all must take part; blockDim a multiple of 32, at
// most 1024). `scratch` holds one float a warp; it may be reused once this returns.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (threadIdx.x % 32 == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

}  // namespace hybrid::ops::detail
