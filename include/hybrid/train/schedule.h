// Learning rate as a function of the step: linear warmup from 0, then constant, linear or
// cosine decay to final_lr_ratio * lr at max_steps, or WSD (warmup, stable, then a linear
// decay over the last decay_steps).
#pragma once

#include <cstdint>

#include "hybrid/config/config.h"

namespace hybrid::train {

double learning_rate(const ScheduleConfig& schedule, double peak_lr, int64_t step, int64_t max_steps);

}  // namespace hybrid::train
