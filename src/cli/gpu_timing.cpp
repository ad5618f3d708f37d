#include "hybrid/cli/gpu_timing.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <vector>

namespace hybrid::cli {

double median_cuda_ms(const std::function<void()>& fn, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record();
    fn();
    stop.record();
    stop.synchronize();
    ms.push_back(start.elapsed_time(stop));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void write_cuda_profile(const std::string& path, const std::function<void()>& fn, int calls) {
  namespace prof = torch::autograd::profiler;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  const std::set<torch::profiler::impl::ActivityType> activities = {torch::profiler::impl::ActivityType::CPU,
                                                                   torch::profiler::impl::ActivityType::CUDA};
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  for (int i = 0; i < calls; ++i) fn();
  at::cuda::device_synchronize();
  prof::disableProfiler()->save(path);
}

void reset_peak_memory() { c10::cuda::CUDACachingAllocator::resetPeakStats(at::cuda::current_device()); }

double peak_memory_gb() {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(at::cuda::current_device()).allocated_bytes[0].peak / 1e9;
}

}  // namespace hybrid::cli
