#include "hybrid/train/schedule.h"

#include <algorithm>
#include <cmath>

namespace hybrid::train {

double learning_rate(const ScheduleConfig& s, double peak, int64_t step, int64_t max_steps) {
  if (s.warmup_steps > 0 && step < s.warmup_steps) return peak * (step + 1) / static_cast<double>(s.warmup_steps);
  const double final_lr = peak * s.final_lr_ratio;
  if (s.type == "constant") return peak;
  if (s.type == "wsd") {
    const int64_t decay_start = max_steps - s.decay_steps;
    if (step < decay_start) return peak;
    const double t = std::min(1.0, (step - decay_start) / static_cast<double>(std::max<int64_t>(s.decay_steps, 1)));
    return peak + (final_lr - peak) * t;
  }
  const int64_t span = std::max<int64_t>(max_steps - s.warmup_steps, 1);
  const double t = std::clamp((step - s.warmup_steps) / static_cast<double>(span), 0.0, 1.0);
  if (s.type == "linear") return peak + (final_lr - peak) * t;
  return final_lr + (peak - final_lr) * 0.5 * (1 + std::cos(M_PI * t));  // cosine
}

}  // namespace hybrid::train
