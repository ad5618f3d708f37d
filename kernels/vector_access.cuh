// Two and four adjacent floats of global or shared memory in one access (8- and 16-byte
// aligned addresses), shared by the delta-rule kernels.
#pragma once

namespace hybrid::ops::detail {

__device__ __forceinline__ float2 ld2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ void st2(float* p, float x, float y) { *reinterpret_cast<float2*>(p) = make_float2(x, y); }
__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

}  // namespace hybrid::ops::detail
