// Host values onto a device without making the host wait for the GPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace hybrid::util {

// int64 values as a 1-D tensor on `device`: staged in pinned memory and copied on the current
// stream (the caching host allocator keeps the staging block until the copy is done). A
// pageable copy would make the host wait for the GPU to drain first.
at::Tensor to_device_async(const std::vector<int64_t>& values, at::Device device);

}  // namespace hybrid::util
