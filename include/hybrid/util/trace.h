// A Kineto trace of what runs between start_trace() and save_trace(): CPU ops, with CUDA kernels
// and copies where `cuda`, saved as Chrome trace JSON (Perfetto, chrome://tracing;
// scripts/gpu/trace_summary.py sums its GPU time by kernel). One at a time in a process.
#pragma once

#include <string>

namespace hybrid::util {

void start_trace(bool cuda);
// Waits for the GPU's queued work (its kernels end in the trace), then writes the trace to path.
void save_trace(const std::string& path, bool cuda);

}  // namespace hybrid::util
