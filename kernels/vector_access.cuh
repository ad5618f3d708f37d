// Adjacent elements of global or shared memory in one access: two and four floats (8- and
// 16-byte aligned addresses, the delta-rule kernels), and V elements of any dtype converted to
// and from float (addresses aligned to V elements: the conv, SwiGLU).
#pragma once

namespace hybrid::ops::detail {

__device__ __forceinline__ float2 ld2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ void st2(float* p, float x, float y) { *reinterpret_cast<float2*>(p) = make_float2(x, y); }
// The same to global memory, as one 8-byte store for certain: the assignment above was compiled
// into two 4-byte stores in every delta-rule kernel epilogue (each writing half of every 32-byte
// sector a warp touches: twice the store instructions, and partial-sector writes into L2).
// (No "memory" clobber: nothing in these kernels reads their outputs back.)
__device__ __forceinline__ void stg2(float* p, float x, float y) {
  asm volatile("st.global.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(x), "f"(y));
}
__device__ __forceinline__ void stg4(float* p, float4 x) {  // likewise: one 16-byte store
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(x.x), "f"(x.y), "f"(x.z), "f"(x.w));
}
__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, class T>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<float>(pk.v[i]);
}

template <int V, class T>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

}  // namespace hybrid::ops::detail
