#include "hybrid/util/host_to_device.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace hybrid::util {

at::Tensor to_device_async(const std::vector<int64_t>& values, at::Device device) {
  const int64_t n = static_cast<int64_t>(values.size());
  if (device.is_cpu()) return at::tensor(values, at::kLong);
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

}  // namespace hybrid::util
