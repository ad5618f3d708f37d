// The grid of the kernels that walk their rows with a stride: as many blocks as the GPU holds at
// once (at least one an SM), so that no second wave walks what is left on a mostly idle GPU.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace hybrid::ops::detail {

template <class Kernel>
int64_t resident_blocks_on_gpu(Kernel kernel, int threads, size_t shared_bytes = 0) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, shared_bytes));
  return static_cast<int64_t>(std::max(per_sm, 1)) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

}  // namespace hybrid::ops::detail
