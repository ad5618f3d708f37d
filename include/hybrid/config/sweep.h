// Sweeps: a YAML file of axes expanded into named runs, each a list of --set overrides on a
// base config.
//
//   name: pattern-lr
//   grid:                 # every combination
//     model.layer_pattern: [G, A, GA, GGGA]
//     optimizer.lr: [1e-3, 3e-3]
//   zip:                  # lists of equal length, taken together (one run per index)
//     trainer.max_steps: [100, 200]
//     schedule.warmup_steps: [10, 20]
//   set: {trainer.log_interval: 10}   # applied to every run
#pragma once

#include <string>
#include <vector>

namespace hybrid {

struct SweepRun {
  std::string name;                    // e.g. "layer_pattern=GA,lr=0.003": unique, safe as a folder name
  std::vector<std::string> overrides;  // key=value, as --set takes them
};

struct Sweep {
  std::string name;
  std::vector<SweepRun> runs;
};

Sweep expand_sweep(const std::string& path);

}  // namespace hybrid
