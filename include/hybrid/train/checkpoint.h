// Checkpoints: RUN_DIR/checkpoints/stepNNNNNNN/{model.safetensors, optim.safetensors,
// trainer.json, config.yaml, MANIFEST.json} and checkpoints/LATEST.
//
// A save writes into stepNNNNNNN.tmp, fsyncs every file, writes MANIFEST.json (sizes and
// CRC-32s) last, renames the folder into place and only then replaces LATEST atomically. A
// kill at any moment leaves the previous checkpoint as LATEST; a full disk fails the save
// with an error and removes the partial folder. Loading verifies every file against the
// MANIFEST (the optimizer file's entries one by one, as each rank reads its share), so a corrupted
// or truncated file is named, never silently used.
//
// Several ranks: every rank calls save alike and writes its share of the two tensor files in
// place: of optim.safetensors the state it owns under ZeRO (never gathered), of model.safetensors
// (the same weights on every rank) a run of tensors that evens out the bytes each rank writes. It
// sends rank 0 the CRC-32s of its bytes in a short note (through the rendezvous's key-value
// store), which rank 0 waits for and joins into each file's CRC for the MANIFEST; rank 0 alone
// writes the other files. A rank whose share fails sends its error instead, and rank 0's save
// fails with it.
//
// Asynchronous saves (CheckpointConfig::async): the run pauses only to copy the tensors (each
// rank its share) to host memory; a background thread writes that copy as above. A save waits for
// the one before it, and a failed background save ends the run with its error at the next save or
// at the end.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <vector>

#include "hybrid/config/config.h"
#include "hybrid/io/safetensors.h"

namespace hybrid::train {

// What besides tensors a run needs to continue exactly (trainer.json).
struct TrainerState {
  int64_t step = 0;                 // optimizer steps completed
  int64_t tokens = 0;               // tokens trained on
  uint64_t instances_consumed = 0;  // data position (world-size independent)
  int64_t global_batch_size = 0;    // instances a step when saved (0: a checkpoint older than the key)
  uint64_t data_seed = 0, data_fingerprint = 0;
  int64_t world_size = 1;
  std::string model_hash;           // of the model section of the config
  int64_t skipped_steps = 0;
  std::vector<double> recent_losses, recent_grad_norms;  // the loss-spike detector's window
};

struct LoadedCheckpoint {
  std::string dir;
  io::TensorFile model, optim;  // optim empty when not asked for
  TrainerState state;
  std::string config_yaml;
};

// This process among the ranks that save together (one alone by default).
struct SaveGroup {
  int rank = 0, world_size = 1;
  // How the other ranks' notes reach rank 0 (dist::Comm's post and take), from any thread; rank 0
  // waits up to `timeout` for each.
  std::function<void(const std::string& key, const std::string& value)> post;
  std::function<std::optional<std::string>(const std::string& key, std::chrono::milliseconds timeout)> take;
  std::chrono::seconds timeout{600};
};

class Checkpointer {
 public:
  Checkpointer(std::string run_dir, CheckpointConfig cfg, SaveGroup group = {});
  // Waits for a background save; its error, which can no longer be thrown, is logged.
  ~Checkpointer();
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;
  const std::string& dir() const { return dir_; }
  // Removes folders of saves that were interrupted (stepNNNNNNN.tmp). Rank 0, before any save.
  void remove_partial_saves() const;
  // Writes the checkpoint now, this rank's share of it: `model` is every rank's (the same
  // weights), `optim` laid out as GradSync::state_file gives it; `config_yaml` counts on rank 0.
  void save(const TrainerState& state, const io::NamedTensors& model, const io::ShardedTensors& optim,
            const std::string& config_yaml);
  // Waits for the save before (rethrowing its error), copies this rank's tensors to host memory
  // and returns; a background thread writes them as save() would.
  void save_async(const TrainerState& state, const io::NamedTensors& model, const io::ShardedTensors& optim,
                  const std::string& config_yaml);
  // Until the background save, if any, is written; rethrows its error.
  void wait();
  // The folder LATEST names, if any.
  std::optional<std::string> latest() const;
  // How long the last save that finished took to write (0 before one has), in seconds.
  double last_write_seconds() const { return last_write_s_; }

 private:
  // model.safetensors and optim.safetensors, each entry with the rank that writes it.
  using TensorFiles = std::array<io::ShardedTensors, 2>;
  TensorFiles spread(const io::NamedTensors& model, const io::ShardedTensors& optim) const;
  void write(const TrainerState& state, const TensorFiles& files, const std::string& config_yaml) const;
  void write_share(int64_t step, const TensorFiles& files) const;  // a rank other than 0
  // What rank 0 learns from every rank's note (its own included): each tensor file's CRC-32, each
  // optimizer entry's (index into files[1]), how long the slowest rank took (for the log).
  struct Joined {
    std::array<uint32_t, 2> crcs{};
    std::vector<std::pair<size_t, uint32_t>> optim_entries;
    std::string summary;
  };
  Joined join_shares(int64_t step, const TensorFiles& files, const std::array<io::WrittenShare, 2>& own) const;
  void rotate(int64_t newest_step) const;
  std::string dir_;
  CheckpointConfig cfg_;
  SaveGroup group_;
  std::future<void> writing_;  // the background save (save_async)
  mutable std::atomic<double> last_write_s_{0};  // written by whichever thread wrote
};

// Loads and verifies a checkpoint folder (or a run folder / checkpoints folder, meaning its LATEST).
// `reads`, where given, names the optimizer state this process will read: the MANIFEST keeps each
// entry's CRC-32 (saves since the sixty-second session), so only the optimizer file's header and
// those entries are checked and a rank reads the pages of its own share alone (the whole file was
// read by every rank: 55 GiB at 7b.yaml). Otherwise, and for the other files, whole files.
LoadedCheckpoint load_checkpoint(const std::string& path, bool with_optimizer,
                                 const std::function<bool(const std::string&)>& reads = {});

// A model's config and weights from a model folder (config.yaml + model.safetensors, as
// hybrid-convert writes it), a checkpoint (checked against its MANIFEST), or a run folder or its
// checkpoints folder (their latest checkpoint). `dir` is the folder read.
struct ModelFiles {
  std::string dir;
  Config config;
  io::TensorFile weights;
};
ModelFiles read_model_files(const std::string& path);

// A stable hash of the model section, to detect an architecture change on resume.
std::string model_hash(const ModelConfig& model);

}  // namespace hybrid::train
