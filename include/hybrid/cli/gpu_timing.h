// Timing and memory on the GPU for the bench executables.
#pragma once

#include <functional>

namespace hybrid::cli {

// CUDA events around each call: the median of `reps` calls after `warmup` untimed ones, in ms.
double median_cuda_ms(const std::function<void()>& fn, int warmup, int reps);

// The caching allocator's peak of allocated memory on the current device, in GB (1e9 bytes),
// from the moment of reset_peak_memory().
void reset_peak_memory();
double peak_memory_gb();

}  // namespace hybrid::cli
