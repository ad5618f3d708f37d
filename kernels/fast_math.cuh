// Element-wise functions on the fast hardware paths, shared by the layer's kernels (the short
// conv, the gated norm) where they were bound by instruction issue.
#pragma once

namespace hybrid::ops::detail {

// sigmoid(z) with the fast exp and division: 2 ulp in float32.
__device__ __forceinline__ float fast_sigmoid(float z) { return __fdividef(1.f, 1.f + __expf(-z)); }

}  // namespace hybrid::ops::detail
