#include "hybrid/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"
#include "hybrid/log.h"
#include "hybrid/model/size.h"
#include "hybrid/model/weight_casts.h"
#include "hybrid/train/choice_scores.h"
#include "hybrid/train/schedule.h"
#include "hybrid/train/validation.h"
#include "hybrid/util/stop_signals.h"
#include "hybrid/util/trace.h"
#include "run.h"

namespace hybrid::train {
namespace fs = std::filesystem;
namespace {

Device pick_device(const TrainerConfig& t, int local_rank) {
  Device d;
  const bool cuda = t.device == "cuda" || (t.device == "auto" && at::hasCUDA());
  if (t.device == "cuda" && !at::hasCUDA()) throw ConfigError("trainer.device: cuda was asked for but no GPU is visible");
  if (cuda) {
    if (local_rank >= static_cast<int>(at::cuda::device_count()))
      throw Error("local rank " + std::to_string(local_rank) + " has no GPU (" + std::to_string(at::cuda::device_count()) + " visible)");
    d.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
    c10::cuda::set_device(d.device.index());
    const std::string name = at::cuda::getDeviceProperties(d.device.index())->name;
    if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) d.peak_flops = 989e12;
    else if (name.find("A100") != std::string::npos) d.peak_flops = 312e12;
  }
  d.bf16 = t.precision == "bf16" || (t.precision == "auto" && cuda);
  if (d.bf16 && !cuda) throw ConfigError("trainer.precision: bf16 autocast needs a GPU (use fp32 on CPU)");
  return d;
}

// The dry run's memory estimate against the GPU's memory, said at the start: running out would
// otherwise show minutes in, after the first micro batches. The estimate runs a few percent high
// (docs/benchmarks.md), so "may not fit" rather than a refusal.
void say_memory_estimate(const Config& cfg, int64_t world_size, const at::Device& device) {
  const double gib = 1024.0 * 1024.0 * 1024.0;
  const double estimate = estimate_memory(cfg, world_size).total / gib;
  const double total = static_cast<double>(at::cuda::getDeviceProperties(device.index())->totalGlobalMem) / gib;
  std::ostringstream line;
  line.precision(1);
  line << std::fixed << "memory: estimated " << estimate << " GiB a GPU of its " << total
       << " GiB (hybrid-train --dry-run shows the parts)";
  if (estimate <= 0.95 * total) return log::info(line.str());
  log::warn(line.str() + "; it may not fit: trainer.activation_checkpointing, trainer.cache_weight_casts: false, "
                         "distributed.zero_stage: 2 or a smaller trainer.micro_batch_size lower it");
}

// data.eos_id, or the EOS of the metadata.json beside the first training file; that file's
// vocabulary must fit the model's.
int64_t eos_from_metadata(const Config& cfg) {
  if (cfg.data.sources.empty() || cfg.data.sources[0].paths.empty())
    throw ConfigError("data.sources: no training data configured");
  const std::string first = data::expand_glob(cfg.data.sources[0].paths[0]).front();
  const auto meta = data::read_metadata_beside(first);
  if (!meta) return cfg.data.eos_id;
  if (meta->vocab_size > cfg.model.vocab_size)
    throw ConfigError(first + ": the data's vocabulary (" + std::to_string(meta->vocab_size) +
                      ", metadata.json) is larger than model.vocab_size " + std::to_string(cfg.model.vocab_size));
  return cfg.data.eos_id >= 0 ? cfg.data.eos_id : meta->eos_id;
}

double peak_memory_gb(const Device& d) {
  if (!d.device.is_cuda()) return -1;
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(d.device.index());
  return stats.allocated_bytes[0].peak / 1e9;
}

// --profile-steps: a trace of N steps after two that warm up (allocator, cuBLAS's choices, the
// weights' casts); every rank writes its own into the run folder.
class StepTrace {
 public:
  StepTrace(int64_t steps, std::string path, bool cuda) : steps_(steps), path_(std::move(path)), cuda_(cuda) {}
  void before_step(int64_t taken) {
    if (steps_ > 0 && taken == kWarmUp) util::start_trace(cuda_), on_ = true;
  }
  void after_step(int64_t taken) {
    if (on_ && taken == kWarmUp + steps_) finish(taken);
  }
  // At the end of the run: a trace that the run's end cut short is written as far as it got.
  void finish(int64_t taken) {
    if (!on_) {
      if (steps_ > 0 && taken <= kWarmUp)
        log::warn("--profile-steps: no trace, this run took " + std::to_string(taken) + " steps and the trace starts at its third");
      return;
    }
    util::save_trace(path_, cuda_);
    on_ = false, steps_ = 0;
    const std::string summary = " 30 " + std::to_string(taken - kWarmUp) + " sums its GPU time by kernel (--ops " +
                                "before the path: by the op that launched each)";
    log::info("trace of this run's steps " + std::to_string(kWarmUp + 1) + "-" + std::to_string(taken) + " in " + path_ +
              " (Perfetto or chrome://tracing open it; those steps' tokens/s include the profiler's overhead)" +
              (cuda_ ? "; scripts/gpu/trace_summary.py " + path_ + summary : ""));
  }

 private:
  static constexpr int64_t kWarmUp = 2;
  int64_t steps_;
  std::string path_;
  bool cuda_, on_ = false;
};
}  // namespace

Run::Run(const Config& cfg, const TrainOptions& options)
    : cfg_(cfg), t_(cfg.trainer), options_(options), env_(dist::DistEnv::from_environment()),
      dev_(pick_device(cfg.trainer, env_.local_rank)),
      run_dir_(options.run_dir.empty() ? (fs::path("runs") / cfg.name).string() : options.run_dir),
      // Data first: a bad data file should stop the run before anything is written.
      eos_id_(eos_from_metadata(cfg)),
      dataset_(cfg.data.sources, cfg.data.seq_len, cfg.model.vocab_size),
      sampler_(dataset_, static_cast<uint64_t>(cfg.data.seed)),
      layout_{cfg.trainer.global_batch_at(0), cfg.trainer.micro_batch_size, env_.world_size, env_.rank},
      checkpointer_(run_dir_, cfg.checkpoint, save_group(cfg)),
      spikes_(cfg.trainer.spike_skip.window, cfg.trainer.spike_skip.sigmas) {
  log::set_rank(env_.rank, env_.world_size);
  // Every phase's batch against the world size now, not when the phase comes.
  for (size_t i = 0; i < t_.batch_size_warmup.size(); ++i)
    data::check_layout({t_.batch_size_warmup[i].global_batch_size, t_.micro_batch_size, env_.world_size, env_.rank},
                       "trainer.batch_size_warmup[" + std::to_string(i) + "].global_batch_size");
  data::check_layout({t_.global_batch_size, t_.micro_batch_size, env_.world_size, env_.rank});
  for (size_t i = 0; i < cfg.data.validation.size(); ++i)
    if (!cfg.data.validation[i].paths.empty())
      validation_.emplace_back(cfg.data.validation[i], cfg.data.seq_len, cfg.model.vocab_size,
                               "data.validation[" + std::to_string(i) + "]");
  for (const auto& task : cfg.data.tasks)
    tasks_.push_back(data::read_choice_task(task.name, task.path, cfg.model.vocab_size, cfg.data.seq_len, task.limit));
  if (env_.world_size > 1)
    comm_ = std::make_unique<dist::Comm>(env_, dev_.device.is_cuda(), std::chrono::seconds(cfg.distributed.timeout_s));

  // Built uninitialized and filled on its device (on the CPU one core fills 7b.yaml's 7.4 billion
  // weights: about 33 s at the 226M normal values/s measured here, at every start). The same seed
  // gives every rank the same initial weights (on a CPU the same as before; a GPU's generator gives
  // others); rank 0's are broadcast anyway.
  model_ = HybridLM(cfg.model);
  model_->to(dev_.device);
  model_->initialize(static_cast<uint64_t>(t_.seed));
  model_->set_activation_checkpointing(t_.activation_checkpointing, t_.checkpointed_layers);
  model_->set_delta_rule(t_.delta_rule);
  set_weight_cast_cache(t_.cache_weight_casts);
  if (dev_.device.is_cuda()) say_memory_estimate(cfg, env_.world_size, dev_.device);
  if (comm_) {
    std::vector<at::Tensor> params;
    for (auto& [name, p] : model_weights(model_)) params.push_back(p.detach());
    comm_->broadcast(params, 0, cfg.distributed.bucket_bytes());
  }
  sync_ = std::make_unique<dist::GradSync>(comm_.get(), model_weights(model_), static_cast<int>(cfg.distributed.zero_stage),
                                           cfg.distributed.bucket_bytes());
  for (const auto& [name, p] : model_weights(model_))
    kind_of_weight_.push_back(weight_kind(name)), has_kind_[kind_of_weight_.back()] = true;
  optimizer_ = std::make_unique<Optimizer>(sync_->owned(), cfg.optimizer);
  state_.data_seed = cfg.data.seed;
  state_.data_fingerprint = dataset_.fingerprint();
  state_.model_hash = model_hash(cfg.model);
  state_.world_size = env_.world_size;
  config_yaml_ = config_to_yaml(cfg);
}

void Run::train() {
  restore();
  if (state_.step >= t_.max_steps) {
    log::info(run_dir_ + " has finished (step " + std::to_string(state_.step) + " of " + std::to_string(t_.max_steps) + ")");
    return;
  }
  if (leader()) {
    io::write_file_atomic((fs::path(run_dir_) / "config.yaml").string(), config_yaml_);
    metrics_ = std::make_unique<MetricsLog>(run_dir_, state_.step);
  }
  std::unique_ptr<data::Loader> loader = loader_from_here();
  const double flops_per_token = training_flops_per_token(cfg_.model, cfg_.data.seq_len).total();
  log::info("training " + cfg_.name + ": " + std::to_string(count_parameters(cfg_.model).total) + " parameters on " +
            std::to_string(env_.world_size) + " x " + dev_.device.str() + (dev_.bf16 ? " (bf16 autocast)" : " (fp32)") +
            ", ZeRO stage " + std::to_string(cfg_.distributed.zero_stage) + ", " +
            std::to_string(layout_.global_batch * cfg_.data.seq_len) + " tokens per step" +
            (layout_.global_batch != t_.global_batch_size ? " for now (trainer.batch_size_warmup)" : "") + ", " +
            std::to_string(layout_.micro_steps()) + " micro batches per step per rank, " +
            std::to_string(at::get_num_threads()) + " intra-op threads a rank, run folder " + run_dir_);
  if (cfg_.optimizer.type == "muon") log::info(muon_cost(cfg_, env_.world_size));

  model_->train();
  const int64_t stop_at = options_.stop_after > 0 ? std::min(t_.max_steps, state_.step + options_.stop_after) : t_.max_steps;
  auto last = std::chrono::steady_clock::now();
  StepTrace trace(options_.profile_steps, (fs::path(run_dir_) / ("trace_rank" + std::to_string(env_.rank) + ".json")).string(),
                  dev_.device.is_cuda());
  int64_t taken = 0;  // steps of this invocation
  while (state_.step < stop_at) {
    if (t_.global_batch_at(state_.step) != layout_.global_batch) {
      const int64_t before = layout_.global_batch;
      loader = loader_from_here();
      if (leader())
        log::info("step " + std::to_string(state_.step + 1) + " on: global batch size " + std::to_string(before) + " -> " +
                  std::to_string(layout_.global_batch) + " (trainer.batch_size_warmup), " +
                  std::to_string(layout_.micro_steps()) + " micro batches per step per rank");
    }
    trace.before_step(taken);
    StepMetrics m = step(*loader, learning_rate(cfg_.schedule, cfg_.optimizer.lr, state_.step, t_.max_steps));
    trace.after_step(++taken);
    if (comm_ && !reported_buckets_) {
      reported_buckets_ = true;
      log::info("gradient reduction: " + std::to_string(sync_->bucket_count()) + " buckets, " +
                std::to_string(sync_->started_during_backward()) + " started during backward");
    }
    const auto now = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(now - last).count();
    last = now;
    seconds_per_step_ = seconds_per_step_ == 0 ? dt : 0.9 * seconds_per_step_ + 0.1 * dt;
    m.tokens_per_s = static_cast<double>(layout_.global_batch * cfg_.data.seq_len) / dt;
    if (dev_.peak_flops > 0) m.mfu = m.tokens_per_s * flops_per_token / (dev_.peak_flops * env_.world_size);
    if (dev_.device.is_cuda()) m.peak_mem_gb = peak_memory_gb(dev_);
    if (!m.skipped) recent_loss_ = std::isnan(recent_loss_) ? m.loss : 0.9 * recent_loss_ + 0.1 * m.loss;
    if (state_.step > 1) tokens_per_s_sum_ += m.tokens_per_s, ++timed_steps_;  // the first step includes warm-up
    if (metrics_) metrics_->step(m);
    if (leader() && (state_.step % t_.log_interval == 0 || state_.step == t_.max_steps || m.skipped))
      log::info(progress_line(m, t_.max_steps, seconds_per_step_ / static_cast<double>(layout_.global_batch) *
                                                   static_cast<double>(t_.instances_between(state_.step, t_.max_steps))));
    if (stop_requested_) {
      if (leader()) {
        log::warn((stop_asked_.empty() ? "a stop request on another rank" : stop_asked_) + ": stopping after step " +
                  std::to_string(state_.step) + " with a checkpoint");
      }
      break;
    }
    if (t_.eval_interval > 0 && state_.step % t_.eval_interval == 0 && state_.step != t_.max_steps) evaluate();
    if (cfg_.checkpoint.interval > 0 && state_.step % cfg_.checkpoint.interval == 0 && state_.step != stop_at) save();
    last = std::chrono::steady_clock::now();  // evaluations and saves are not the next step's time
  }
  trace.finish(taken);
  if (state_.step == t_.max_steps) evaluate();
  if (cfg_.checkpoint.save_final || state_.step < t_.max_steps) save();  // --stop-after always saves
  checkpointer_.wait();  // a background save written (or its error thrown) before the run ends
  if (state_.step == t_.max_steps && leader()) write_finished();
  if (stop_requested_ && state_.step < t_.max_steps && leader())
    log::info("stopped at step " + std::to_string(state_.step) + ": the same command resumes from its checkpoint");
}

// The data from the instance after the last one trained on, in batches of the next step's size
// (which sets layout_).
std::unique_ptr<data::Loader> Run::loader_from_here() {
  layout_.global_batch = t_.global_batch_at(state_.step);
  return std::make_unique<data::Loader>(dataset_, sampler_, layout_, state_.instances_consumed,
                                        cfg_.data.document_masking ? eos_id_ : -1, cfg_.data.prefetch,
                                        dev_.device.is_cuda(), cfg_.data.instance_filter);
}

// Sums over ranks of a few numbers (themselves with one rank).
std::vector<double> Run::summed_over_ranks(std::vector<double> values) const {
  return comm_ ? comm_->sum_over_ranks(values, dev_.device) : values;
}

// The lowest rank whose `flag` is set, or -1: every rank learns it (one all-reduce).
int Run::first_rank_where(bool flag) const {
  std::vector<double> flags(env_.world_size, 0.0);
  flags[env_.rank] = flag ? 1.0 : 0.0;
  flags = summed_over_ranks(flags);
  for (int r = 0; r < env_.world_size; ++r)
    if (flags[r] > 0) return r;
  return -1;
}

// Each validation set's loss over its first eval_batches micro batches, in file order (the same
// every time), and each task's scores, in batches of a micro batch's tokens: every rank takes its
// share of the batches and items, and rank 0 records the sums' results.
void Run::evaluate() {
  const auto started = std::chrono::steady_clock::now();
  last_val_losses_.clear();
  for (size_t i = 0; i < validation_.size(); ++i) {
    const ValidationLoss share = validation_loss(model_, validation_[i], t_.micro_batch_size, t_.eval_batches, dev_.device,
                                                 dev_.bf16, env_.rank, env_.world_size);
    const std::vector<double> all = summed_over_ranks({share.sum, static_cast<double>(share.batches)});
    const std::string& name = cfg_.data.validation[i].name;
    if (all[1] > 0) last_val_losses_.emplace_back(name.empty() ? "validation" : name, all[0] / all[1]);
  }
  last_task_scores_.clear();
  for (const auto& task : tasks_) {
    const data::ChoiceTotals share = score_choice_task(model_, task, cfg_.data.seq_len, t_.micro_batch_size * cfg_.data.seq_len,
                                                       dev_.device, dev_.bf16, env_.rank, env_.world_size);
    last_task_scores_.emplace_back(task.name, data::choice_scores(data::ChoiceTotals::from_values(summed_over_ranks(share.values()))));
  }
  if (!leader() || (last_val_losses_.empty() && last_task_scores_.empty())) return;
  metrics_->eval(state_.step, state_.tokens, last_val_losses_, last_task_scores_);
  const std::string at_step = "step " + std::to_string(state_.step);
  for (const auto& [name, loss] : last_val_losses_)
    log::info(at_step + (name == "validation" ? " validation" : " validation " + name) + " loss " + std::to_string(loss) +
              " perplexity " + std::to_string(std::exp(loss)));
  for (const auto& [name, s] : last_task_scores_) {
    char line[192];
    std::snprintf(line, sizeof line, " %s: acc %.4f acc_norm %.4f bits/byte %.4f (%lld items)", name.c_str(), s.acc, s.acc_norm,
                  s.bpb, static_cast<long long>(s.items));
    log::info(at_step + line);
  }
  eval_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  char took[64];
  std::snprintf(took, sizeof took, " evaluation took %.1f s", eval_s_);
  log::info(at_step + took);
}

void train(const LoadedConfig& loaded, const TrainOptions& options) {
  // SIGTERM, SIGUSR1 end the run with a checkpoint after the step in progress; from here on, so one
  // that comes during set-up (a requeued job preempted again) or the last save does not kill the
  // process: set-up goes on, every rank takes one step and they stop there together.
  const util::StopSignals signals;
  Run run(loaded.config, options);
  run.train();
}

}  // namespace hybrid::train
