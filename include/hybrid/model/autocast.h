// Autocast on CUDA for a scope, the way torch.autocast manages it: on leaving the outermost
// scope the cache of low-precision weight copies is cleared. Without that, the next forward
// would reuse bf16 copies of weights that the optimizer has since changed.
#pragma once

#include <ATen/core/ATen_fwd.h>
#include <c10/core/ScalarType.h>

namespace hybrid {

class CudaAutocast {
 public:
  explicit CudaAutocast(bool enabled, c10::ScalarType dtype = c10::kBFloat16);
  ~CudaAutocast();
  CudaAutocast(const CudaAutocast&) = delete;
  CudaAutocast& operator=(const CudaAutocast&) = delete;

 private:
  bool was_enabled_;
  c10::ScalarType was_dtype_;
};

}  // namespace hybrid
