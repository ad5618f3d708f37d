#include "hybrid/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/core/GradMode.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "hybrid/data/loader.h"
#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"
#include "hybrid/log.h"
#include "hybrid/model/autocast.h"
#include "hybrid/model/hybrid_lm.h"
#include "hybrid/model/size.h"
#include "hybrid/model/weights.h"
#include "hybrid/train/checkpoint.h"
#include "hybrid/train/metrics.h"
#include "hybrid/train/optimizer.h"
#include "hybrid/train/schedule.h"

namespace hybrid::train {
namespace fs = std::filesystem;
namespace {

struct Device {
  at::Device device{at::kCPU};
  bool bf16 = false;
  double peak_flops = 0;  // dense bf16 peak of the GPU, 0 when unknown
};

Device pick_device(const TrainerConfig& t) {
  Device d;
  const bool cuda = t.device == "cuda" || (t.device == "auto" && at::hasCUDA());
  if (t.device == "cuda" && !at::hasCUDA()) throw ConfigError("trainer.device: cuda was asked for but no GPU is visible");
  if (cuda) {
    d.device = at::Device(at::kCUDA, 0);
    const std::string name = at::cuda::getDeviceProperties(0)->name;
    if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) d.peak_flops = 989e12;
    else if (name.find("A100") != std::string::npos) d.peak_flops = 312e12;
  }
  d.bf16 = t.precision == "bf16" || (t.precision == "auto" && cuda);
  if (d.bf16 && !cuda) throw ConfigError("trainer.precision: bf16 autocast needs a GPU (use fp32 on CPU)");
  return d;
}

// EOS and vocabulary from the metadata.json beside the first training file, where one exists.
void check_data_metadata(const Config& cfg, int64_t& eos_id) {
  const auto files = data::expand_glob(cfg.data.sources.at(0).paths.at(0));
  const fs::path meta = fs::path(files.front()).parent_path() / "metadata.json";
  if (!fs::exists(meta)) return;
  std::ifstream in(meta);
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {
    throw Error(meta.string() + ": not valid JSON: " + e.what());
  }
  const int64_t vocab = j.value("vocab_size", int64_t{0});
  if (vocab > cfg.model.vocab_size)
    throw ConfigError(meta.string() + ": the data's vocabulary (" + std::to_string(vocab) +
                      ") is larger than model.vocab_size " + std::to_string(cfg.model.vocab_size));
  if (eos_id < 0) eos_id = j.value("eos_id", int64_t{-1});
}

// Mean next-token cross-entropy (targets = tokens shifted by one) and the z-loss term mean(lse^2).
std::pair<at::Tensor, at::Tensor> lm_loss(const at::Tensor& logits, const at::Tensor& tokens) {
  const int64_t T = tokens.size(1);
  at::Tensor lg = logits.narrow(1, 0, T - 1).to(at::kFloat).flatten(0, 1);
  at::Tensor targets = tokens.narrow(1, 1, T - 1).flatten();
  at::Tensor lse = at::logsumexp(lg, -1);
  at::Tensor ce = (lse - lg.gather(1, targets.unsqueeze(1)).squeeze(1)).mean();
  return {ce, lse.pow(2).mean()};
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

}  // namespace

void train(const LoadedConfig& loaded, const TrainOptions& options) {
  const Config& cfg = loaded.config;
  const TrainerConfig& t = cfg.trainer;
  const Device dev = pick_device(t);
  const std::string run_dir = options.run_dir.empty() ? (fs::path("runs") / cfg.name).string() : options.run_dir;

  // Data first: a bad data file should stop the run before anything is written.
  int64_t eos_id = cfg.data.eos_id;
  check_data_metadata(cfg, eos_id);
  data::TokenDataset dataset(cfg.data.sources, cfg.data.seq_len, cfg.model.vocab_size);
  data::InstanceSampler sampler(dataset, static_cast<uint64_t>(cfg.data.seed));
  std::optional<data::TokenDataset> validation;
  if (!cfg.data.validation.paths.empty())
    validation.emplace(std::vector<DataSourceConfig>{cfg.data.validation}, cfg.data.seq_len, cfg.model.vocab_size);
  const data::BatchLayout layout{t.global_batch_size, t.micro_batch_size, 1, 0};
  data::check_layout(layout);

  // Model and optimizer, then whatever state a checkpoint brings.
  at::manual_seed(t.seed);
  HybridLM model(cfg.model);
  model->initialize(static_cast<uint64_t>(t.seed));
  model->to(dev.device);
  model->set_activation_checkpointing(t.activation_checkpointing);
  AdamW optimizer(model_weights(model), cfg.optimizer);

  fs::create_directories(run_dir);
  Checkpointer checkpointer(run_dir, cfg.checkpoint);
  checkpointer.remove_partial_saves();
  std::string resume_from = options.resume;
  if (resume_from.empty() && checkpointer.latest()) resume_from = "latest";
  TrainerState state;
  state.data_seed = cfg.data.seed;
  state.data_fingerprint = dataset.fingerprint();
  state.model_hash = model_hash(cfg.model);
  SpikeDetector spikes(t.spike_skip.window, t.spike_skip.sigmas);
  if (!resume_from.empty()) {
    if (resume_from == "latest" && !checkpointer.latest()) throw Error(run_dir + ": --resume latest, but there is no checkpoint");
    LoadedCheckpoint ckpt = load_checkpoint(resume_from == "latest" ? run_dir : resume_from, true);
    if (!cfg.checkpoint.allow_architecture_change) check_architecture(ckpt, cfg);
    if (ckpt.state.data_fingerprint != state.data_fingerprint)
      log::warn("the training data differs from the checkpoint's (file names, sizes, weights or seq_len): the data order will not continue exactly");
    load_model_weights(model, ckpt.model, ckpt.dir + "/model.safetensors");
    optimizer.load_state(ckpt.optim.tensors, ckpt.dir + "/optim.safetensors");
    state = ckpt.state;
    state.model_hash = model_hash(cfg.model);
    state.data_fingerprint = dataset.fingerprint();
    spikes.restore(state.recent_losses, state.recent_grad_norms);
    log::info("resumed from " + ckpt.dir + " at step " + std::to_string(state.step));
  } else if (!options.load.empty()) {
    LoadedCheckpoint ckpt = load_checkpoint(options.load, false);
    load_model_weights(model, ckpt.model, ckpt.dir + "/model.safetensors");
    log::info("loaded weights from " + ckpt.dir + "; optimizer and schedule start fresh");
  }
  if (state.step >= t.max_steps) {
    log::info(run_dir + " has finished (step " + std::to_string(state.step) + " of " + std::to_string(t.max_steps) + ")");
    return;
  }
  const std::string config_yaml = config_to_yaml(cfg);
  io::write_file_atomic((fs::path(run_dir) / "config.yaml").string(), config_yaml);
  MetricsLog metrics(run_dir, state.step);

  const uint64_t start_step = state.instances_consumed / static_cast<uint64_t>(t.global_batch_size);
  data::Loader loader(dataset, sampler, layout, start_step, cfg.data.document_masking ? eos_id : -1, cfg.data.prefetch,
                      dev.device.is_cuda());
  const double flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len).total();
  const int64_t tokens_per_step = t.global_batch_size * cfg.data.seq_len;
  log::info("training " + cfg.name + ": " + std::to_string(count_parameters(cfg.model).total) + " parameters on " +
            dev.device.str() + (dev.bf16 ? " (bf16 autocast)" : " (fp32)") + ", " + std::to_string(tokens_per_step) +
            " tokens per step, " + std::to_string(layout.micro_steps()) + " micro batches per step, run folder " + run_dir);

  auto save = [&] {
    for (const auto& [name, p] : model_weights(model))
      if (!at::isfinite(p).all().item<bool>()) throw Error("parameter " + name + " is not finite: refusing to save a poisoned checkpoint");
    state.recent_losses = spikes.losses();
    state.recent_grad_norms = spikes.grad_norms();
    checkpointer.save(state, model_weights(model), optimizer.state(), config_yaml);
    log::info("saved checkpoint step " + std::to_string(state.step));
  };
  double last_val_loss = NAN, tokens_per_s_sum = 0, recent_loss = NAN;
  int64_t timed_steps = 0;
  auto evaluate = [&] {
    if (!validation) return;
    at::NoGradGuard no_grad;
    model->eval();
    const uint64_t n = std::min<uint64_t>(validation->sources()[0].num_instances(), t.eval_batches * t.micro_batch_size);
    double sum = 0;
    int64_t batches = 0;
    for (uint64_t first = 0; first + t.micro_batch_size <= n; first += t.micro_batch_size, ++batches) {
      // Validation reads instances in file order: the same every time, whatever the seed.
      at::Tensor tokens = at::empty({t.micro_batch_size, cfg.data.seq_len}, at::kLong);
      for (int64_t r = 0; r < t.micro_batch_size; ++r)
        validation->sources()[0].read_instance(first + r, tokens.data_ptr<int64_t>() + r * cfg.data.seq_len);
      tokens = tokens.to(dev.device);
      CudaAutocast autocast(dev.bf16);
      sum += lm_loss(model->forward(tokens), tokens).first.item<double>();
    }
    model->train();
    if (batches == 0) return;
    const double loss = sum / batches;
    last_val_loss = loss;
    metrics.eval(state.step, state.tokens, loss);
    log::info("step " + std::to_string(state.step) + " validation loss " + std::to_string(loss) + " perplexity " +
              std::to_string(std::exp(loss)));
  };

  model->train();
  auto params = model_weights(model);
  int64_t bad_steps_in_a_row = 0;
  const int64_t stop_at = options.stop_after > 0 ? std::min(t.max_steps, state.step + options.stop_after) : t.max_steps;
  auto last = std::chrono::steady_clock::now();
  double seconds_per_step = 0;
  while (state.step < stop_at) {
    const double lr = learning_rate(cfg.schedule, cfg.optimizer.lr, state.step, t.max_steps);
    at::Tensor loss_sum = at::zeros({}, at::TensorOptions().device(dev.device)), z_sum = loss_sum.clone();
    for (int64_t micro = 0; micro < layout.micro_steps(); ++micro) {
      data::MicroBatch mb = loader.next();
      at::Tensor tokens = mb.tokens.to(dev.device, /*non_blocking=*/true);
      std::optional<at::Tensor> cu;
      if (mb.cu_seqlens) cu = mb.cu_seqlens->to(dev.device);
      at::Tensor ce, z;
      {
        CudaAutocast autocast(dev.bf16);
        std::tie(ce, z) = lm_loss(model->forward(tokens, cu), tokens);
      }
      ((ce + t.z_loss * z) / static_cast<double>(layout.micro_steps())).backward();
      loss_sum += ce.detach();
      z_sum += z.detach();
    }
    StepMetrics m;
    m.loss = loss_sum.item<double>() / layout.micro_steps();
    m.z_loss = t.z_loss * z_sum.item<double>() / layout.micro_steps();
    m.lr = lr;
    std::vector<at::Tensor> grads;
    for (auto& [name, p] : params)
      if (p.grad().defined()) grads.push_back(p.grad());
    m.grad_norm = at::stack(at::_foreach_norm(grads, 2.0)).norm().item<double>();

    if (!std::isfinite(m.loss) || !std::isfinite(m.grad_norm)) {
      m.skipped = true, m.skip_reason = "non-finite loss or gradient";
    } else if (t.spike_skip.enabled) {
      m.skip_reason = spikes.check(m.loss, m.grad_norm);
      m.skipped = !m.skip_reason.empty();
    }
    if (m.skipped) {
      ++state.skipped_steps;
      if (++bad_steps_in_a_row >= 5)
        throw Error("5 steps in a row were skipped (last: " + m.skip_reason + " at step " + std::to_string(state.step + 1) +
                    "); stopping without saving. Resume from the last checkpoint with a lower optimizer.lr");
    } else {
      bad_steps_in_a_row = 0;
      if (t.grad_clip > 0 && m.grad_norm > t.grad_clip) at::_foreach_mul_(grads, t.grad_clip / (m.grad_norm + 1e-6));
      optimizer.step(lr);
    }
    for (auto& [name, p] : params) p.mutable_grad().reset();

    ++state.step;
    state.tokens += tokens_per_step;
    state.instances_consumed += t.global_batch_size;
    const auto now = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(now - last).count();
    last = now;
    seconds_per_step = seconds_per_step == 0 ? dt : 0.9 * seconds_per_step + 0.1 * dt;
    m.step = state.step;
    m.tokens = state.tokens;
    m.tokens_per_s = tokens_per_step / dt;
    if (dev.peak_flops > 0) m.mfu = m.tokens_per_s * flops_per_token / dev.peak_flops;
    if (dev.device.is_cuda()) m.peak_mem_gb = peak_memory_gb(dev);
    metrics.step(m);
    if (!m.skipped) recent_loss = std::isnan(recent_loss) ? m.loss : 0.9 * recent_loss + 0.1 * m.loss;
    if (state.step > 1) tokens_per_s_sum += m.tokens_per_s, ++timed_steps;  // the first step includes warm-up
    if (state.step % t.log_interval == 0 || state.step == t.max_steps || m.skipped)
      log::info(progress_line(m, t.max_steps, seconds_per_step));
    if (t.eval_interval > 0 && state.step % t.eval_interval == 0 && state.step != t.max_steps) evaluate();
    if (cfg.checkpoint.interval > 0 && state.step % cfg.checkpoint.interval == 0 && state.step != stop_at) save();
  }
  if (state.step == t.max_steps) evaluate();
  save();
  if (state.step == t.max_steps) {
    // A summary sweeps read; its presence marks the run finished.
    nlohmann::json done = {{"step", state.step}, {"tokens", state.tokens}, {"skipped_steps", state.skipped_steps}};
    if (!std::isnan(recent_loss)) done["train_loss_ema"] = recent_loss;
    if (!std::isnan(last_val_loss)) done["val_loss"] = last_val_loss;
    if (timed_steps) done["tokens_per_s"] = tokens_per_s_sum / timed_steps;
    io::write_file_atomic((fs::path(run_dir) / "FINISHED.json").string(), done.dump(2) + "\n");
  }
}

}  // namespace hybrid::train
