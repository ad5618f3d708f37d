#include "hybrid/model/autocast.h"

#include <ATen/autocast_mode.h>

namespace hybrid {

CudaAutocast::CudaAutocast(bool enabled, c10::ScalarType dtype)
    : was_enabled_(at::autocast::is_autocast_enabled(at::kCUDA)), was_dtype_(at::autocast::get_autocast_dtype(at::kCUDA)) {
  at::autocast::set_autocast_enabled(at::kCUDA, enabled);
  at::autocast::set_autocast_dtype(at::kCUDA, dtype);
  at::autocast::increment_nesting();
}

CudaAutocast::~CudaAutocast() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(at::kCUDA, was_enabled_);
  at::autocast::set_autocast_dtype(at::kCUDA, was_dtype_);
}

}  // namespace hybrid
