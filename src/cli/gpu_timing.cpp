#include "hybrid/cli/gpu_timing.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDACachingAllocator.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "hybrid/util/trace.h"

namespace hybrid::cli {

namespace {

// CUDA events around a call, recorded; with `wait` the host waits for the call to finish.
struct TimedCall {
  at::cuda::CUDAEvent start{cudaEventDefault}, stop{cudaEventDefault};
  TimedCall(const std::function<void()>& fn, bool wait) {
    start.record();
    fn();
    stop.record();
    if (wait) stop.synchronize();
  }
  double ms() {
    stop.synchronize();
    return start.elapsed_time(stop);
  }
};

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

}  // namespace

double median_cuda_ms(const std::function<void()>& fn, int warmup, int reps, bool queued) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<TimedCall> calls;
  calls.reserve(reps);
  for (int i = 0; i < reps; ++i) calls.emplace_back(fn, !queued);
  std::vector<double> ms;
  for (TimedCall& c : calls) ms.push_back(c.ms());
  return median(ms);
}

double median_host_ms(const std::function<void()>& fn, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    at::cuda::device_synchronize();
    const auto start = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  at::cuda::device_synchronize();
  return median(ms);
}

PairedTiming paired_cuda_ms(const std::function<void()>& a, const std::function<void()>& b, int warmup, int reps,
                            bool queued) {
  for (int i = 0; i < warmup; ++i) a(), b();
  std::vector<TimedCall> calls_a, calls_b;
  calls_a.reserve(reps), calls_b.reserve(reps);
  for (int i = 0; i < reps; ++i) calls_a.emplace_back(a, !queued), calls_b.emplace_back(b, !queued);
  std::vector<double> ta, tb, ratios;
  for (int i = 0; i < reps; ++i) {
    ta.push_back(calls_a[i].ms()), tb.push_back(calls_b[i].ms());
    ratios.push_back(ta.back() / tb.back());
  }
  return {median(ta), median(tb), median(ratios)};
}

void write_cuda_profile(const std::string& path, const std::function<void()>& fn, int calls) {
  util::start_trace(/*cuda=*/true);
  // The GPU first spins (about 0.1 s) while the host queues the calls, so that the trace shows the
  // kernels as the GPU runs them, back to back as in training and the queued timings, not as a
  // host slowed by the profiler launches them (the fifty-fifth session's profiled run had gaps of
  // up to 360 us, and a kernel on a side stream starting 196 us late). trace_summary.py leaves the
  // spin kernel out.
  constexpr int64_t kQueueAheadCycles = 200'000'000;
  at::cuda::sleep(kQueueAheadCycles);
  for (int i = 0; i < calls; ++i) fn();
  util::save_trace(path, /*cuda=*/true);
}

void reset_peak_memory() { c10::cuda::CUDACachingAllocator::resetPeakStats(at::cuda::current_device()); }

double peak_memory_gb() {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(at::cuda::current_device()).allocated_bytes[0].peak / 1e9;
}

}  // namespace hybrid::cli
