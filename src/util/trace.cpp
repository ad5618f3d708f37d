#include "hybrid/util/trace.h"

#include <ATen/cuda/CUDAContext.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <set>

namespace hybrid::util {
namespace {

namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;

std::set<ActivityType> activities(bool cuda) {
  if (cuda) return {ActivityType::CPU, ActivityType::CUDA};
  return {ActivityType::CPU};
}

}  // namespace

void start_trace(bool cuda) {
  // With the ops' input shapes and dtypes: what a copy or an add in the trace was made from.
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO,
                                                     /*report_input_shapes=*/true);
  prof::prepareProfiler(config, activities(cuda));
  prof::enableProfiler(config, activities(cuda));
}

void save_trace(const std::string& path, bool cuda) {
  if (cuda) at::cuda::device_synchronize();
  prof::disableProfiler()->save(path);
}

}  // namespace hybrid::util
