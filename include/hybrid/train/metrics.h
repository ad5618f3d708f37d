// What a run reports: one JSON line per step in metrics.jsonl (and one per evaluation), a
// console progress line with throughput and ETA, and OLMo's loss-spike rule.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "hybrid/data/choice_task.h"

namespace hybrid::train {

struct StepMetrics {
  int64_t step = 0;  // 1-based: the step just completed
  double loss = 0, z_loss = 0, grad_norm = 0, lr = 0;
  int64_t tokens = 0;  // total so far
  double tokens_per_s = 0;
  std::optional<double> mfu;          // model FLOPs utilisation, when the device peak is known
  std::optional<double> peak_mem_gb;  // CUDA only
  bool skipped = false;
  std::string skip_reason;
  int64_t filtered = 0;  // instances data.instance_filter left out of the loss, all ranks
  std::vector<std::pair<std::string, double>> grad_norms;  // by weight kind (model/weights.h)
};

class MetricsLog {
 public:
  // Appends to run_dir/metrics.jsonl, first dropping lines of steps after `resume_step` (a
  // resumed run rewrites what the interrupted one logged past its checkpoint).
  MetricsLog(const std::string& run_dir, int64_t resume_step);
  void step(const StepMetrics& m);
  // An evaluation: each validation set's loss (the first as val_loss, all by name as val_losses
  // when there are several) and each task's scores.
  void eval(int64_t step, int64_t tokens, const std::vector<std::pair<std::string, double>>& val_losses,
            const std::vector<std::pair<std::string, data::ChoiceScores>>& tasks);

 private:
  std::ofstream out_;
};

// An evaluation's results as metrics.jsonl's evaluation lines and FINISHED.json hold them: a JSON
// object of val_loss (the first set's), val_losses (by name, where there are several) and tasks
// ({"name": {"items", "acc", "acc_norm", "acc_per_token", "bpb", "chance"}, ...}), each where given.
std::string evaluation_json(const std::vector<std::pair<std::string, double>>& val_losses,
                            const std::vector<std::pair<std::string, data::ChoiceScores>>& tasks);

// Console line: step, loss, lr, grad norm, tokens/s, MFU, ETA.
std::string progress_line(const StepMetrics& m, int64_t max_steps, double eta_seconds);

// OLMo-core's rule: skip a step whose loss or grad norm is more than `sigmas` standard deviations
// above the mean of the last `window` steps, once max(20, window / 2) are known. Every finite
// step's values enter the window, a skipped one's too: after a lasting jump (the weights moved,
// not one bad batch) the window takes the new level in within a few steps and training goes on
// from there, where a window of taken steps alone would skip every step after it (tiny.yaml on a
// GPU did: a grad-norm jump at step 30, five skips in a row, the run stopped).
class SpikeDetector {
 public:
  SpikeDetector(int64_t window, double sigmas) : window_(window), sigmas_(sigmas) {}
  // Returns a reason to skip ("loss spike, 3.9 against 3.01 +- 0.01 over the last 64 steps"), or
  // ""; records the values either way.
  std::string check(double loss, double grad_norm);
  std::vector<double> losses() const { return {losses_.begin(), losses_.end()}; }
  std::vector<double> grad_norms() const { return {norms_.begin(), norms_.end()}; }
  void restore(const std::vector<double>& losses, const std::vector<double>& norms);

 private:
  int64_t window_;
  double sigmas_;
  std::deque<double> losses_, norms_;
};

}  // namespace hybrid::train
