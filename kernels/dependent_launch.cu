// See dependent_launch.cuh.
#include "dependent_launch.cuh"

#include <cstdlib>
#include <cstring>

namespace hybrid::ops::detail {

bool dependent_launch_on() {
  static const bool asked = [] {
    const char* value = std::getenv("HYBRID_DEPENDENT_LAUNCH");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return asked && at::cuda::getCurrentDeviceProperties()->major >= 9;
}

}  // namespace hybrid::ops::detail
