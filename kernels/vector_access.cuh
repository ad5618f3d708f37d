// Adjacent elements of global or shared memory in one access: two and four floats (8- and
// 16-byte aligned addresses, the delta-rule kernels), and V elements of any dtype converted to
// and from float (addresses aligned to V elements: the conv, SwiGLU, the loss).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

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

// To global memory, converted to T: one 4-, 8- or 16-byte store of the packed bits. Assigning the
// Pack itself was compiled, for bf16, into 4-byte and even 2-byte pieces (SwiGLU's backward: seven
// 4-byte and two 2-byte stores for its two 16-byte results, each a partial-sector write).
template <int V, class T>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = static_cast<T>(in[i]);
  constexpr int kBytes = sizeof(pk);
  if constexpr (kBytes == 16) {
    uint4 u;
    memcpy(&u, &pk, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w));
  } else if constexpr (kBytes == 8) {
    uint2 u;
    memcpy(&u, &pk, 8);
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(u.x), "r"(u.y));
  } else if constexpr (kBytes == 4) {
    uint32_t u;
    memcpy(&u, &pk, 4);
    asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(u));
  } else {
    *reinterpret_cast<Pack<T, V>*>(p) = pk;
  }
}

// fn(std::integral_constant<int, V>) with V = 16 bytes of T when rows of `length` elements and the
// tensors' addresses keep every row's vectors 16-byte aligned, else V = 1 (host side).
template <class T, class Fn>
void with_16_byte_vectors(int64_t length, std::initializer_list<const at::Tensor*> tensors, Fn&& fn) {
  constexpr int kWide = 16 / sizeof(T);
  bool wide = length % kWide == 0;
  for (const at::Tensor* x : tensors) wide = wide && reinterpret_cast<uintptr_t>(x->data_ptr()) % 16 == 0;
  if (wide) fn(std::integral_constant<int, kWide>{});
  else fn(std::integral_constant<int, 1>{});
}

}  // namespace hybrid::ops::detail
