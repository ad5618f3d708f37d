// The trainer's run, shared by its files: trainer.cpp (set-up, the loop, evaluations),
// run_step.cpp (one optimizer step) and run_saves.cpp (restoring and saving checkpoints).
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hybrid/data/choice_task.h"
#include "hybrid/data/dataset.h"
#include "hybrid/data/loader.h"
#include "hybrid/data/sampler.h"
#include "hybrid/dist/comm.h"
#include "hybrid/dist/grad_sync.h"
#include "hybrid/model/hybrid_lm.h"
#include "hybrid/model/weights.h"
#include "hybrid/train/checkpoint.h"
#include "hybrid/train/metrics.h"
#include "hybrid/train/optimizer.h"
#include "hybrid/train/trainer.h"

namespace hybrid::train {

struct Device {
  at::Device device{at::kCPU};
  bool bf16 = false;
  double peak_flops = 0;  // dense bf16 peak of the GPU, 0 when unknown
};

// One training run: what train() sets up, steps and saves, as members so each phase reads
// top to bottom. With several processes every rank runs one; rank 0 alone writes files (each
// rank's share of a checkpoint and its own --profile-steps trace aside).
class Run {
 public:
  Run(const Config& cfg, const TrainOptions& options);
  void train();

 private:
  bool leader() const { return env_.rank == 0; }
  SaveGroup save_group(const Config& cfg);
  void restore();
  void check_run_dir_is_shared() const;
  std::unique_ptr<data::Loader> loader_from_here();
  StepMetrics step(data::Loader& loader, double lr);
  std::string stop_reason() const;
  void evaluate();
  std::vector<double> summed_over_ranks(std::vector<double> values) const;
  int first_rank_where(bool flag) const;
  void save();
  void write_finished() const;

  const Config& cfg_;
  const TrainerConfig& t_;
  TrainOptions options_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();  // for --time-limit
  dist::DistEnv env_;
  Device dev_;
  std::string run_dir_;
  std::unique_ptr<dist::Comm> comm_;
  int64_t eos_id_;
  data::TokenDataset dataset_;
  data::InstanceSampler sampler_;
  std::vector<data::Source> validation_;  // data.validation's sets that have paths
  std::vector<data::ChoiceTask> tasks_;
  data::BatchLayout layout_;  // the global batch of the step in progress (trainer.batch_size_warmup)
  HybridLM model_{nullptr};
  std::unique_ptr<dist::GradSync> sync_;
  std::vector<int64_t> kind_of_weight_;  // weight_kind of each of model_weights', for the norms by kind
  std::vector<bool> has_kind_ = std::vector<bool>(std::size(kWeightKinds));
  bool reported_buckets_ = false;
  std::unique_ptr<Optimizer> optimizer_;
  Checkpointer checkpointer_;
  TrainerState state_;
  SpikeDetector spikes_;
  std::unique_ptr<MetricsLog> metrics_;
  std::string config_yaml_;
  int64_t bad_steps_in_a_row_ = 0;
  bool stop_requested_ = false;  // some rank asked to stop (stop_reason) before the last step's reduction
  std::string stop_asked_;       // why this rank asked then ("": it did not)
  double seconds_per_step_ = 0;  // recent steps' (a moving average)
  double eval_s_ = 0, save_s_ = 0;  // the last evaluation's and save's time (a background save's write included)
  double recent_loss_ = NAN, tokens_per_s_sum_ = 0;
  std::vector<std::pair<std::string, double>> last_val_losses_;  // by validation set; the first is val_loss
  std::vector<std::pair<std::string, data::ChoiceScores>> last_task_scores_;
  int64_t timed_steps_ = 0;
};

}  // namespace hybrid::train
