#include "hybrid/train/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include <nlohmann/json.hpp>

#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"
#include "hybrid/util/progress.h"

namespace hybrid::train {
namespace fs = std::filesystem;

MetricsLog::MetricsLog(const std::string& run_dir, int64_t resume_step) {
  const fs::path path = fs::path(run_dir) / "metrics.jsonl";
  if (fs::exists(path)) {
    std::ifstream in(path);
    std::string kept, line;
    while (std::getline(in, line)) {
      try {
        if (nlohmann::json::parse(line).value("step", int64_t{0}) <= resume_step) kept += line + "\n";
      } catch (const nlohmann::json::exception&) {
        // A line cut by a kill mid-write: dropped.
      }
    }
    io::write_file_atomic(path.string(), kept);
  }
  out_.open(path, std::ios::app);
  if (!out_) throw Error(path.string() + ": cannot open for writing");
}

void MetricsLog::step(const StepMetrics& m) {
  nlohmann::json j = {{"step", m.step}, {"loss", m.loss}, {"z_loss", m.z_loss}, {"grad_norm", m.grad_norm},
                      {"lr", m.lr}, {"tokens", m.tokens}, {"tokens_per_s", m.tokens_per_s}, {"skipped", m.skipped}};
  if (m.mfu) j["mfu"] = *m.mfu;
  if (m.peak_mem_gb) j["peak_mem_gb"] = *m.peak_mem_gb;
  if (m.skipped) j["skip_reason"] = m.skip_reason;
  if (m.filtered) j["filtered_instances"] = m.filtered;
  for (const auto& [kind, norm] : m.grad_norms) j["grad_norms"][kind] = norm;
  out_ << j.dump() << "\n" << std::flush;
}

namespace {
nlohmann::json evaluation_object(const std::vector<std::pair<std::string, double>>& val_losses,
                                 const std::vector<std::pair<std::string, data::ChoiceScores>>& tasks) {
  nlohmann::json j = nlohmann::json::object();
  if (!val_losses.empty()) j["val_loss"] = val_losses[0].second;
  if (val_losses.size() > 1)
    for (const auto& [name, loss] : val_losses) j["val_losses"][name] = loss;
  for (const auto& [name, s] : tasks)
    j["tasks"][name] = {{"items", s.items}, {"acc", s.acc}, {"acc_norm", s.acc_norm}, {"acc_per_token", s.acc_per_token},
                        {"bpb", s.bpb},     {"chance", s.chance}};
  return j;
}
}  // namespace

std::string evaluation_json(const std::vector<std::pair<std::string, double>>& val_losses,
                            const std::vector<std::pair<std::string, data::ChoiceScores>>& tasks) {
  return evaluation_object(val_losses, tasks).dump();
}

void MetricsLog::eval(int64_t step, int64_t tokens, const std::vector<std::pair<std::string, double>>& val_losses,
                      const std::vector<std::pair<std::string, data::ChoiceScores>>& tasks) {
  nlohmann::json j = evaluation_object(val_losses, tasks);
  j["step"] = step, j["tokens"] = tokens;
  if (!val_losses.empty()) j["val_perplexity"] = std::exp(val_losses[0].second);
  out_ << j.dump() << "\n" << std::flush;
}

std::string progress_line(const StepMetrics& m, int64_t max_steps, double eta_seconds) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "step %lld/%lld  loss %.4f  lr %.3g  gnorm %.3f  %.0f tok/s", static_cast<long long>(m.step),
                static_cast<long long>(max_steps), m.loss, m.lr, m.grad_norm, m.tokens_per_s);
  std::string s = buf;
  if (m.mfu) std::snprintf(buf, sizeof buf, "  MFU %.1f%%", 100 * *m.mfu), s += buf;
  if (m.peak_mem_gb) std::snprintf(buf, sizeof buf, "  mem %.1f GB", *m.peak_mem_gb), s += buf;
  s += "  ETA " + util::hours_minutes_seconds(eta_seconds);
  if (m.filtered) s += "  (" + std::to_string(m.filtered) + " instances filtered)";
  if (m.skipped) s += "  (skipped: " + m.skip_reason + ")";
  return s;
}

std::string SpikeDetector::check(double loss, double grad_norm) {
  // "" or the spike as the log and metrics.jsonl give it: the value against the window's mean and
  // standard deviation.
  auto spike = [&](const std::deque<double>& xs, double x, const char* what) -> std::string {
    if (static_cast<int64_t>(xs.size()) < std::max<int64_t>(20, window_ / 2)) return "";
    double mean = 0, var = 0;
    for (double v : xs) mean += v;
    mean /= xs.size();
    for (double v : xs) var += (v - mean) * (v - mean);
    const double sd = std::sqrt(var / xs.size());
    if (x <= mean + sigmas_ * sd) return "";
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s, %.4g against %.4g +- %.2g over the last %zu steps", what, x, mean, sd, xs.size());
    return buf;
  };
  std::string reason = spike(losses_, loss, "loss spike");
  if (reason.empty()) reason = spike(norms_, grad_norm, "grad-norm spike");
  losses_.push_back(loss);
  norms_.push_back(grad_norm);
  if (static_cast<int64_t>(losses_.size()) > window_) losses_.pop_front(), norms_.pop_front();
  return reason;
}

void SpikeDetector::restore(const std::vector<double>& losses, const std::vector<double>& norms) {
  // The last `window` of them: a run resumed with a smaller trainer.spike_skip.window.
  auto last = [&](const std::vector<double>& xs) {
    return std::deque<double>(xs.end() - std::min<int64_t>(window_, static_cast<int64_t>(xs.size())), xs.end());
  };
  losses_ = last(losses);
  norms_ = last(norms);
}

}  // namespace hybrid::train
