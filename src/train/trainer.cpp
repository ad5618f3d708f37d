#include "hybrid/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/core/GradMode.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "hybrid/data/loader.h"
#include "hybrid/dist/comm.h"
#include "hybrid/dist/grad_sync.h"
#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"
#include "hybrid/log.h"
#include "hybrid/model/autocast.h"
#include "hybrid/model/hybrid_lm.h"
#include "hybrid/model/size.h"
#include "hybrid/model/weight_casts.h"
#include "hybrid/model/weights.h"
#include "hybrid/train/checkpoint.h"
#include "hybrid/train/choice_scores.h"
#include "hybrid/train/loss.h"
#include "hybrid/train/metrics.h"
#include "hybrid/train/optimizer.h"
#include "hybrid/train/schedule.h"
#include "hybrid/train/validation.h"
#include "hybrid/util/fs.h"
#include "hybrid/util/stop_signals.h"
#include "hybrid/util/trace.h"

namespace hybrid::train {
namespace fs = std::filesystem;
namespace {

struct Device {
  at::Device device{at::kCPU};
  bool bf16 = false;
  double peak_flops = 0;  // dense bf16 peak of the GPU, 0 when unknown
};

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

// The architecture in a checkpoint's config.yaml against ours: the first differing model key.
void check_architecture(const LoadedCheckpoint& ckpt, const Config& cfg) {
  if (ckpt.state.model_hash == model_hash(cfg.model)) return;
  const std::string path = ckpt.dir + "/config.yaml";
  Config theirs = load_config_text(ckpt.config_yaml, path).config;
  std::string ours_yaml = config_to_yaml(Config{.model = cfg.model}), theirs_yaml = config_to_yaml(Config{.model = theirs.model});
  std::istringstream a(ours_yaml), b(theirs_yaml);
  std::string la, lb;
  auto trim = [](std::string& s) { s.erase(0, s.find_first_not_of(' ')); };
  while (std::getline(a, la) && std::getline(b, lb)) {
    if (la == lb) continue;
    trim(la);
    trim(lb);
    throw Error(path + ": the checkpoint's architecture differs (checkpoint '" + lb + "', config '" + la +
                "'); set checkpoint.allow_architecture_change to load it anyway");
  }
  throw Error(path + ": the checkpoint's architecture differs from the config");
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
  data::BatchLayout layout_;
  HybridLM model_{nullptr};
  std::unique_ptr<dist::GradSync> sync_;
  std::vector<int64_t> kind_of_weight_;  // weight_kind of each of model_weights', for the norms by kind
  std::vector<bool> has_kind_ = std::vector<bool>(std::size(kWeightKinds));
  bool reported_buckets_ = false;
  std::unique_ptr<AdamW> optimizer_;
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

Run::Run(const Config& cfg, const TrainOptions& options)
    : cfg_(cfg), t_(cfg.trainer), options_(options), env_(dist::DistEnv::from_environment()),
      dev_(pick_device(cfg.trainer, env_.local_rank)),
      run_dir_(options.run_dir.empty() ? (fs::path("runs") / cfg.name).string() : options.run_dir),
      // Data first: a bad data file should stop the run before anything is written.
      eos_id_(eos_from_metadata(cfg)),
      dataset_(cfg.data.sources, cfg.data.seq_len, cfg.model.vocab_size),
      sampler_(dataset_, static_cast<uint64_t>(cfg.data.seed)),
      layout_{cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, env_.world_size, env_.rank},
      checkpointer_(run_dir_, cfg.checkpoint, save_group(cfg)),
      spikes_(cfg.trainer.spike_skip.window, cfg.trainer.spike_skip.sigmas) {
  log::set_rank(env_.rank, env_.world_size);
  data::check_layout(layout_);
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
  optimizer_ = std::make_unique<AdamW>(sync_->owned(), cfg.optimizer);
  state_.data_seed = cfg.data.seed;
  state_.data_fingerprint = dataset_.fingerprint();
  state_.model_hash = model_hash(cfg.model);
  state_.world_size = env_.world_size;
  config_yaml_ = config_to_yaml(cfg);
}

// The ranks' notes of a save travel through comm_'s store (comm_ is made later than the
// Checkpointer, before any save).
SaveGroup Run::save_group(const Config& cfg) {
  SaveGroup group{env_.rank, env_.world_size};
  group.post = [this](const std::string& key, const std::string& value) { comm_->post(key, value); };
  group.take = [this](const std::string& key, std::chrono::milliseconds timeout) { return comm_->take(key, timeout); };
  group.timeout = std::chrono::seconds(cfg.distributed.timeout_s);
  return group;
}

void Run::restore() {
  forget_weight_casts();  // whatever the weights were cast from before loading
  if (leader()) {
    fs::create_directories(run_dir_);
    checkpointer_.remove_partial_saves();
  }
  if (comm_) check_run_dir_is_shared();
  std::string from = options_.resume;
  if (from.empty() && checkpointer_.latest()) from = "latest";
  // The optimizer state this rank loads (its own under ZeRO): the only entries it checks.
  std::set<std::string> own_state;
  for (const auto& [name, t] : optimizer_->state()) own_state.insert(name);
  const auto reads_state = [&](const std::string& name) { return own_state.count(name) > 0; };
  if (!from.empty()) {
    if (from == "latest" && !checkpointer_.latest()) throw Error(run_dir_ + ": --resume latest, but there is no checkpoint");
    LoadedCheckpoint ckpt = load_checkpoint(from == "latest" ? run_dir_ : from, true, reads_state);
    if (!cfg_.checkpoint.allow_architecture_change) check_architecture(ckpt, cfg_);
    if (ckpt.state.data_fingerprint != state_.data_fingerprint)
      log::warn("the training data differs from the checkpoint's (file names, sizes, weights or seq_len): the data order will not continue exactly");
    load_model_weights(model_, ckpt.model, ckpt.dir + "/model.safetensors");
    optimizer_->load_state(ckpt.optim.tensors, ckpt.dir + "/optim.safetensors");
    const int64_t saved_world = ckpt.state.world_size;
    state_ = ckpt.state;
    state_.model_hash = model_hash(cfg_.model);
    state_.data_fingerprint = dataset_.fingerprint();
    state_.world_size = env_.world_size;
    spikes_.restore(state_.recent_losses, state_.recent_grad_norms);
    log::info("resumed from " + ckpt.dir + " at step " + std::to_string(state_.step) +
              (saved_world != env_.world_size ? " (saved at world size " + std::to_string(saved_world) + ")" : ""));
  } else if (!options_.load.empty()) {
    // A checkpoint (verified against its MANIFEST) or a model folder as hybrid-convert writes it.
    const fs::path dir(options_.load);
    const bool model_folder = !fs::exists(dir / "MANIFEST.json") && fs::exists(dir / "model.safetensors");
    if (model_folder && options_.load_optimizer)
      throw Error(options_.load + ": --load-optimizer needs a checkpoint (with optim.safetensors), not a model folder");
    io::TensorFile weights;
    std::string from;
    if (model_folder) {
      from = (dir / "model.safetensors").string();
      weights = io::read_safetensors(from);
    } else {
      LoadedCheckpoint ckpt = load_checkpoint(options_.load, options_.load_optimizer, reads_state);
      from = ckpt.dir + "/model.safetensors";
      weights = std::move(ckpt.model);
      // The moments and their step counts (so Adam's bias correction goes on from there), as
      // OLMo's annealing runs start: only the schedule and the data begin again.
      if (options_.load_optimizer) optimizer_->load_state(ckpt.optim.tensors, ckpt.dir + "/optim.safetensors");
    }
    load_model_weights(model_, weights, from);
    log::info("loaded weights " + std::string(options_.load_optimizer ? "and AdamW state " : "") + "from " + from +
              (options_.load_optimizer ? "; schedule and data start fresh" : "; optimizer and schedule start fresh"));
  }
}

// Every rank reads LATEST and the checkpoints from the run folder and writes its share of each
// save there, so all of them must see one folder (on several machines: a filesystem they share).
// Without this check, ranks on a machine with a folder of its own would start afresh while the
// others resumed, or the first save would wait out the timeout for their shares.
void Run::check_run_dir_is_shared() const {
  const fs::path probe = fs::path(run_dir_) / ".rank0-probe";
  std::vector<double> number = {0};
  if (leader()) {
    number[0] = static_cast<double>(std::random_device{}() % 1000000007u + 1);  // a fresh one each start
    io::write_file_atomic(probe.string(), std::to_string(static_cast<int64_t>(number[0])));
  }
  number = summed_over_ranks(number);  // rank 0's, everywhere, after it is written
  const std::string want = std::to_string(static_cast<int64_t>(number[0]));
  std::string seen;
  // A few tries: a network filesystem may show another machine's new file a moment late.
  for (int attempt = 0; attempt < 50 && seen != want; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    seen = fs::exists(probe) ? util::read_text_file(probe) : "";
  }
  const int blind = first_rank_where(seen != want);
  if (leader()) fs::remove(probe);
  if (blind >= 0)
    throw Error(run_dir_ + ": rank " + std::to_string(blind) + " does not see the files rank 0 writes in this run folder; "
                "every rank reads and writes checkpoints there, so it must be on a filesystem all ranks share");
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
  const uint64_t start_step = state_.instances_consumed / static_cast<uint64_t>(t_.global_batch_size);
  data::Loader loader(dataset_, sampler_, layout_, start_step, cfg_.data.document_masking ? eos_id_ : -1,
                      cfg_.data.prefetch, dev_.device.is_cuda(), cfg_.data.instance_filter);
  const double flops_per_token = training_flops_per_token(cfg_.model, cfg_.data.seq_len).total();
  const int64_t tokens_per_step = t_.global_batch_size * cfg_.data.seq_len;
  log::info("training " + cfg_.name + ": " + std::to_string(count_parameters(cfg_.model).total) + " parameters on " +
            std::to_string(env_.world_size) + " x " + dev_.device.str() + (dev_.bf16 ? " (bf16 autocast)" : " (fp32)") +
            ", ZeRO stage " + std::to_string(cfg_.distributed.zero_stage) + ", " + std::to_string(tokens_per_step) +
            " tokens per step, " + std::to_string(layout_.micro_steps()) + " micro batches per step per rank, " +
            std::to_string(at::get_num_threads()) + " intra-op threads a rank, run folder " + run_dir_);

  model_->train();
  const int64_t stop_at = options_.stop_after > 0 ? std::min(t_.max_steps, state_.step + options_.stop_after) : t_.max_steps;
  auto last = std::chrono::steady_clock::now();
  StepTrace trace(options_.profile_steps, (fs::path(run_dir_) / ("trace_rank" + std::to_string(env_.rank) + ".json")).string(),
                  dev_.device.is_cuda());
  int64_t taken = 0;  // steps of this invocation
  while (state_.step < stop_at) {
    trace.before_step(taken);
    StepMetrics m = step(loader, learning_rate(cfg_.schedule, cfg_.optimizer.lr, state_.step, t_.max_steps));
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
    m.tokens_per_s = tokens_per_step / dt;
    if (dev_.peak_flops > 0) m.mfu = m.tokens_per_s * flops_per_token / (dev_.peak_flops * env_.world_size);
    if (dev_.device.is_cuda()) m.peak_mem_gb = peak_memory_gb(dev_);
    if (!m.skipped) recent_loss_ = std::isnan(recent_loss_) ? m.loss : 0.9 * recent_loss_ + 0.1 * m.loss;
    if (state_.step > 1) tokens_per_s_sum_ += m.tokens_per_s, ++timed_steps_;  // the first step includes warm-up
    if (metrics_) metrics_->step(m);
    if (leader() && (state_.step % t_.log_interval == 0 || state_.step == t_.max_steps || m.skipped))
      log::info(progress_line(m, t_.max_steps, seconds_per_step_));
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

// One optimizer step: micro batches with accumulated gradients, the reduction over ranks, the
// NaN and spike guards, clipping and the update.
StepMetrics Run::step(data::Loader& loader, double lr) {
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().device(dev_.device)), z_sum = loss_sum.clone();
  const int64_t micro_steps = layout_.micro_steps();
  // With the instance filter, the step's micro batches first: the loss is the mean over the rows
  // that count in the whole step, every rank's (one small all-reduce), so each micro batch's mean
  // weighs in by its share of them and training stays independent of the world size. Where no
  // rank left any out, 1 / micro_steps as without the filter (divided by: the same bits).
  std::deque<data::MicroBatch> ahead;
  double counted = 0, filtered = 0;
  if (cfg_.data.instance_filter.enabled) {
    for (int64_t micro = 0; micro < micro_steps; ++micro)
      ahead.push_back(loader.next()), counted += ahead.back().counted, filtered += ahead.back().filtered;
    const std::vector<double> all = summed_over_ranks({counted, filtered});
    counted = all[0] / env_.world_size, filtered = all[1];
  }
  for (int64_t micro = 0; micro < micro_steps; ++micro) {
    data::MicroBatch mb = ahead.empty() ? loader.next() : std::move(ahead.front());
    if (!ahead.empty()) ahead.pop_front();
    const double share = counted > 0 ? static_cast<double>(mb.counted) / counted : 0.0;  // counted: a rank's mean
    at::Tensor tokens = mb.tokens.to(dev_.device, /*non_blocking=*/true);
    at::Tensor ce, z;
    {
      RECORD_USER_SCOPE("forward and loss");  // scopes for a profiler trace (--profile-steps)
      CudaAutocast autocast(dev_.bf16);
      std::tie(ce, z) = lm_loss(model_->forward(tokens, mb.cu_seqlens), tokens, 1024, /*gradient_over_logits=*/true);
    }
    sync_->prepare_backward(micro == micro_steps - 1);
    {
      RECORD_USER_SCOPE("backward");
      const at::Tensor objective = ce + t_.z_loss * z;
      (filtered ? objective * share : objective / static_cast<double>(micro_steps)).backward();
    }
    const double logged = filtered ? share * static_cast<double>(micro_steps) : 1.0;  // loss_sum / micro_steps: the mean
    loss_sum += filtered ? ce.detach() * logged : ce.detach();
    z_sum += filtered ? z.detach() * logged : z.detach();
  }
  StepMetrics m;
  m.lr = lr;
  at::Tensor squares;  // the global norm's square, then each weight kind's (this rank's shares)
  {
    // Before the loss is read: the norm's kernels (about 80 launches a 1b.yaml step) then queue
    // behind the backward's, where after the read's wait they ran one launch at a time (the traced
    // idle GPU before them 1.70 -> 0.13 ms a step, forty-sixth session).
    RECORD_USER_SCOPE("gradient reduction and norm");
    squares = sync_->reduce_gradients(kind_of_weight_, std::size(kWeightKinds));
  }
  // The step's numbers in one read (each read waits for the GPU to drain) and, over ranks, one
  // all-reduce: the losses every rank logs and judges spikes by (their mean over ranks), how many
  // ranks ask to stop (so that all stop at one step), and the squared norms' shares (the global
  // one, then by weight kind).
  stop_asked_ = stop_reason();
  const at::Tensor asking = at::full({}, stop_asked_.empty() ? 0.0 : 1.0, loss_sum.options().dtype(at::kDouble));
  at::Tensor sums = at::cat({at::stack({loss_sum.to(at::kDouble), z_sum.to(at::kDouble), asking}), squares.to(at::kDouble)});
  if (comm_) comm_->start_all_reduce_sum(sums)();
  const at::Tensor read = sums.cpu();
  const double* v = read.data_ptr<double>();
  const double ranks = comm_ ? env_.world_size : 1;
  m.loss = v[0] / layout_.micro_steps() / ranks;
  m.z_loss = t_.z_loss * v[1] / layout_.micro_steps() / ranks;
  stop_requested_ = v[2] > 0;
  m.grad_norm = std::sqrt(v[3]);
  for (size_t k = 0; k < std::size(kWeightKinds); ++k)
    if (has_kind_[k]) m.grad_norms.emplace_back(kWeightKinds[k], std::sqrt(v[4 + k]));
  m.filtered = static_cast<int64_t>(filtered);

  if (!std::isfinite(m.loss) || !std::isfinite(m.grad_norm)) {
    m.skipped = true, m.skip_reason = "non-finite loss or gradient";
  } else if (t_.spike_skip.enabled) {
    m.skip_reason = spikes_.check(m.loss, m.grad_norm);
    m.skipped = !m.skip_reason.empty();
  }
  if (m.skipped) {
    ++state_.skipped_steps;
    if (++bad_steps_in_a_row_ >= 5)
      throw Error("5 steps in a row were skipped (last: " + m.skip_reason + " at step " + std::to_string(state_.step + 1) +
                  "); stopping without saving. Resume from the last checkpoint with a lower optimizer.lr");
  } else {
    bad_steps_in_a_row_ = 0;
    RECORD_USER_SCOPE("clipping and optimizer step");
    const bool clip = t_.grad_clip > 0 && m.grad_norm > t_.grad_clip;
    // The step writes the cached casts of the weights it updates (this rank's, under ZeRO) and
    // forgets the others', which the broadcast below changes.
    optimizer_->step(lr, clip ? t_.grad_clip / (m.grad_norm + 1e-6) : 1.0);
    sync_->broadcast_parameters();
  }
  for (auto& p : model_->parameters()) p.mutable_grad().reset();
  ++state_.step;
  state_.tokens += t_.global_batch_size * cfg_.data.seq_len;
  state_.instances_consumed += t_.global_batch_size;
  m.step = state_.step;
  m.tokens = state_.tokens;
  return m;
}

// Why this rank asks to stop after the step in progress, or "": a stop signal, or --time-limit
// without room for another step and the checkpoint after it (as long as the recent steps, the
// last evaluation and the last save took; evaluations where they fall due).
std::string Run::stop_reason() const {
  if (const int signal = util::StopSignals::received()) return util::signal_name(signal);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  const int64_t in_progress = state_.step + 1;
  auto evaluation_after = [&](int64_t step) { return t_.eval_interval > 0 && step % t_.eval_interval == 0 ? eval_s_ : 0.0; };
  const double needed = evaluation_after(in_progress) + seconds_per_step_ + evaluation_after(in_progress + 1) + save_s_;
  if (options_.time_limit_s <= 0 || elapsed + needed <= options_.time_limit_s) return "";
  char why[64];
  std::snprintf(why, sizeof why, "--time-limit %g s", options_.time_limit_s);
  return why;
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

// Every rank takes part: each writes its share of the weights and the optimizer state, rank 0 the rest.
void Run::save() {
  const auto started = std::chrono::steady_clock::now();
  for (const auto& [name, p] : model_weights(model_))
    if (!at::isfinite(p).all().item<bool>()) throw Error("parameter " + name + " is not finite: refusing to save a poisoned checkpoint");
  const io::ShardedTensors optim = sync_->state_file(optimizer_->state(), AdamW::blank_state);
  state_.recent_losses = spikes_.losses();
  state_.recent_grad_norms = spikes_.grad_norms();
  std::string failed;  // this rank's error
  try {
    if (cfg_.checkpoint.async) checkpointer_.save_async(state_, model_weights(model_), optim, config_yaml_);
    else checkpointer_.save(state_, model_weights(model_), optim, config_yaml_);
  } catch (const Error& e) {
    if (!comm_) throw;
    failed = e.what();
  }
  if (comm_) {  // every rank ends with the error, none waits out the timeout for a rank that stopped
    const int failing = first_rank_where(!failed.empty());
    if (!failed.empty()) throw Error(failed);
    if (failing >= 0)
      throw Error("checkpoint at step " + std::to_string(state_.step) + " not saved: rank " + std::to_string(failing) +
                  " failed (its error line says why)");
  }
  save_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count() +
            (cfg_.checkpoint.async ? checkpointer_.last_write_seconds() : 0.0);
}

// A summary sweeps read; its presence marks the run finished.
void Run::write_finished() const {
  nlohmann::json done = {{"step", state_.step}, {"tokens", state_.tokens}, {"skipped_steps", state_.skipped_steps},
                         {"world_size", env_.world_size}};
  if (!std::isnan(recent_loss_)) done["train_loss_ema"] = recent_loss_;
  done.update(nlohmann::json::parse(evaluation_json(last_val_losses_, last_task_scores_)));
  if (timed_steps_) done["tokens_per_s"] = tokens_per_s_sum_ / timed_steps_;
  io::write_file_atomic((fs::path(run_dir_) / "FINISHED.json").string(), done.dump(2) + "\n");
}

}  // namespace

void train(const LoadedConfig& loaded, const TrainOptions& options) {
  // SIGTERM, SIGUSR1 end the run with a checkpoint after the step in progress; from here on, so one
  // that comes during set-up (a requeued job preempted again) or the last save does not kill the
  // process: set-up goes on, every rank takes one step and they stop there together.
  const util::StopSignals signals;
  Run run(loaded.config, options);
  run.train();
}

}  // namespace hybrid::train
