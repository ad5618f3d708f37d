// Timing and memory on the GPU for the bench executables.
#pragma once

#include <functional>
#include <string>

namespace hybrid::cli {

// CUDA events around each call: the median of `reps` calls after `warmup` untimed ones, in ms.
// By default the host waits for each call to finish before it starts the next, so a call's time
// includes the host's launch work wherever the GPU waits for it (a call's latency). queued: the
// calls back to back and the host waiting only at the end, so that it runs ahead of the GPU as in
// training: each call's events then time its GPU work, launch gaps hidden wherever the host keeps
// ahead (triton.testing.do_bench's way, which shared/REFERENCE.md's anchors use, without its L2
// flush between calls).
double median_cuda_ms(const std::function<void()>& fn, int warmup, int reps, bool queued = false);

// The host's time to issue a call (from its start to its return, the GPU idle at the start: the
// host waits for each call to finish before the next), median of `reps`, in ms. Where it is longer
// than the call's GPU time, queued calls leave the GPU waiting on the host.
double median_host_ms(const std::function<void()>& fn, int warmup, int reps);

// Two functions timed in alternation (a, b, a, b, ...), so that both see the same clocks and
// temperature: the medians of each, and the median of the per-pair ratios a_i / b_i (drift
// between the pairs cancels in it).
struct PairedTiming {
  double a_ms, b_ms, ratio;
};
PairedTiming paired_cuda_ms(const std::function<void()>& a, const std::function<void()>& b, int warmup, int reps,
                            bool queued = false);

// A Kineto trace (Chrome JSON, CPU and CUDA activity) of `calls` calls of fn, queued by the host
// while the GPU spins first (ATen's sleep kernel), written to path; scripts/gpu/trace_summary.py
// sums it up by kernel.
void write_cuda_profile(const std::string& path, const std::function<void()>& fn, int calls);

// The caching allocator's peak of allocated memory on the current device, in GB (1e9 bytes),
// from the moment of reset_peak_memory().
void reset_peak_memory();
double peak_memory_gb();

}  // namespace hybrid::cli
