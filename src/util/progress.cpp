#include "hybrid/util/progress.h"

#include <cstdio>

#include "hybrid/log.h"

namespace hybrid::util {

std::string hours_minutes_seconds(double seconds) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%dh%02dm%02ds", static_cast<int>(seconds / 3600), static_cast<int>(seconds / 60) % 60,
                static_cast<int>(seconds) % 60);
  return buf;
}

Progress::Progress(std::string what, int64_t total, std::string unit, bool speak, double every_s)
    : what_(std::move(what)), unit_(std::move(unit)), total_(total), speak_(speak), every_s_(every_s),
      start_(std::chrono::steady_clock::now()), last_(start_) {}

void Progress::update(int64_t done) {
  if (!speak_ || done <= 0) return;
  const auto now = std::chrono::steady_clock::now();
  if (std::chrono::duration<double>(now - last_).count() < every_s_) return;
  last_ = now;
  const double elapsed = std::chrono::duration<double>(now - start_).count(), rate = done / elapsed;
  char buf[160];
  std::snprintf(buf, sizeof buf, ": %lld/%lld %s, %.1f/s, ETA ", static_cast<long long>(done), static_cast<long long>(total_),
                unit_.c_str(), rate);
  log::info(what_ + buf + hours_minutes_seconds(static_cast<double>(total_ - done) / rate));
}

}  // namespace hybrid::util
