// Timing on the GPU for the bench executables: CUDA events around each call, the median of
// `reps` calls after `warmup` untimed ones, in milliseconds.
#pragma once

#include <functional>

namespace hybrid::cli {

double median_cuda_ms(const std::function<void()>& fn, int warmup, int reps);

}  // namespace hybrid::cli
