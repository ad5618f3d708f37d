// The training loop behind `hybrid-train`: micro batches with gradient accumulation to the
// global batch, AdamW with the schedule, z-loss, clipping, the spike and NaN guards, periodic
// validation and atomic checkpoints, resumable exactly.
#pragma once

#include <string>

#include "hybrid/config/load.h"

namespace hybrid::train {

struct TrainOptions {
  std::string run_dir;  // default runs/<name>
  std::string resume;   // "" (automatic when the run folder holds a checkpoint), "latest" or a path
  std::string load;     // weights from this checkpoint or model folder; fresh schedule and data position
  bool load_optimizer = false;  // with load: AdamW's moments and step counts too (annealing, mid-training)
  int64_t stop_after = 0;  // > 0: save and stop after this many steps of this invocation (time-limited jobs)
  // > 0: a trace of this many steps, from this invocation's third (the first two warm up), in the
  // run folder as trace_rank<R>.json (util/trace.h)
  int64_t profile_steps = 0;
  // > 0: save and stop after the step past which another would end beyond this many seconds from
  // the start (a step's time as the recent steps took); every rank at the same step
  double time_limit_s = 0;
};

// Runs to trainer.max_steps; throws hybrid::Error on bad input or a failed save.
void train(const LoadedConfig& config, const TrainOptions& options);

}  // namespace hybrid::train
