// Restoring a run from a checkpoint (or loading weights to start from) and saving one: every
// rank takes part in both, each reading and writing its own share.
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"
#include "hybrid/log.h"
#include "hybrid/model/weight_casts.h"
#include "hybrid/util/fs.h"
#include "run.h"

namespace hybrid::train {
namespace fs = std::filesystem;
namespace {

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

}  // namespace

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
    if (ckpt.state.data_seed != state_.data_seed)
      log::warn("data.seed " + std::to_string(state_.data_seed) + " differs from the checkpoint's " +
                std::to_string(ckpt.state.data_seed) + ": the data goes on in another order");
    load_model_weights(model_, ckpt.model, ckpt.dir + "/model.safetensors");
    optimizer_->load_state(ckpt.optim.tensors, ckpt.dir + "/optim.safetensors");
    const TrainerState ours = state_;  // what this run's config and world say
    state_ = ckpt.state;
    state_.model_hash = ours.model_hash;
    state_.data_fingerprint = ours.data_fingerprint;
    state_.data_seed = ours.data_seed;
    state_.world_size = ours.world_size;
    spikes_.restore(state_.recent_losses, state_.recent_grad_norms);
    std::string changes;  // the loader goes on from the instance after the checkpoint's last, whatever the batch
    if (ckpt.state.world_size != ours.world_size) changes += "saved at world size " + std::to_string(ckpt.state.world_size);
    // The batch of the checkpoint's last step against the one this config gives that step.
    const int64_t configured = t_.global_batch_at(std::max<int64_t>(state_.step - 1, 0));
    if (ckpt.state.global_batch_size > 0 && ckpt.state.global_batch_size != configured)
      changes += (changes.empty() ? "" : "; ") + std::string("global batch size ") +
                 std::to_string(ckpt.state.global_batch_size) + " -> " + std::to_string(configured) +
                 ", the data going on at instance " + std::to_string(state_.instances_consumed);
    log::info("resumed from " + ckpt.dir + " at step " + std::to_string(state_.step) + (changes.empty() ? "" : " (" + changes + ")"));
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
    log::info("loaded weights " + std::string(options_.load_optimizer ? "and optimizer state " : "") + "from " + from +
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

// Every rank takes part: each writes its share of the weights and the optimizer state, rank 0 the rest.
void Run::save() {
  const auto started = std::chrono::steady_clock::now();
  for (const auto& [name, p] : model_weights(model_))
    if (!at::isfinite(p).all().item<bool>()) throw Error("parameter " + name + " is not finite: refusing to save a poisoned checkpoint");
  const io::ShardedTensors optim = sync_->state_file(
      optimizer_->state(), [this](const std::string& name, const at::Tensor& p) { return optimizer_->blank_state(name, p); });
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

}  // namespace hybrid::train
