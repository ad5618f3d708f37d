// Programmatic dependent launch (sm_90 and up): a kernel launched with launch_dependent() may be
// placed on the GPU while the kernel before it in the stream is still finishing, instead of after
// it and the launch's own latency (1-2 us a boundary when queued: the op's kernels follow each
// other about that far apart). Its blocks run until wait_for_prior_grids(), which returns once
// every grid before it has completed and its memory is visible, so each kernel launched so calls
// it before its first access to global memory; allow_dependents() lets the next kernel be placed
// once every block of this one has called it (without it: once this one has completed). Without the
// launch attribute (other launches, GPUs before sm_90) both instructions do nothing.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <utility>

namespace hybrid::ops::detail {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether launch_dependent asks for it: compute capability 9.0 and up, unless
// HYBRID_DEPENDENT_LAUNCH=0 (each kernel then waits for the one before it, as plain launches do).
bool dependent_launch_on();

// kernel<<<grid, block, shared, stream>>>(args...), as a programmatic dependent of the stream's
// previous kernel where dependent_launch_on().
template <class... Params, class... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = shared, config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (dependent_launch_on()) config.attrs = &attribute, config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace hybrid::ops::detail
