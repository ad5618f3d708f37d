// A log line now and then while long work goes on (the scoring of a task or of a token file, in
// hybrid-eval and the trainer's evaluations): "WHAT: done/total UNIT, rate/s, ETA 0h04m10s", the
// first after `every_s` seconds, so short work says nothing.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace hybrid::util {

// "1h02m03s"
std::string hours_minutes_seconds(double seconds);

class Progress {
 public:
  // speak: whether this process logs (rank 0 of several; total: its own share).
  Progress(std::string what, int64_t total, std::string unit, bool speak, double every_s = 30);
  // `done` of the total so far.
  void update(int64_t done);

 private:
  std::string what_, unit_;
  int64_t total_;
  bool speak_;
  double every_s_;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace hybrid::util
