// The optimizer: AdamW with decoupled weight decay and a no-decay group, and with
// optimizer.type: muon, Muon for the blocks' matrices (muon.h). State is kept per parameter name
// so a checkpoint is readable at any world size. The update runs in float32 on the float32 master
// weights: AdamW's on CUDA by our kernel a tensor (kernels/adamw.cu, the clipping's factor folded
// in), on CPU by ATen's fused AdamW after a multiply of the gradients; Muon's by ATen products.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "hybrid/config/config.h"

namespace hybrid::train {

class Optimizer {
 public:
  // params: (name, tensor) of the model; decides decay (and Muon or AdamW) per name from the config.
  Optimizer(std::vector<std::pair<std::string, at::Tensor>> params, const OptimizerConfig& cfg);
  // One update at learning rate lr with every gradient taken times grad_scale (global-norm
  // clipping's factor; the gradients themselves are left as they are on CUDA, scaled on CPU).
  void step(double lr, double grad_scale = 1.0);
  static bool decays(const std::string& name, const OptimizerConfig& cfg);

  // State by name: AdamW's "exp_avg.<param>", "exp_avg_sq.<param>", "step.<param>"; Muon's
  // "momentum.<param>".
  std::vector<std::pair<std::string, at::Tensor>> state() const;
  // The state entries of one parameter, zero-filled (their names and shapes).
  std::vector<std::pair<std::string, at::Tensor>> blank_state(const std::string& name, const at::Tensor& param) const;
  // Loads the entries of this optimizer's parameters; entries of others (another rank's shard
  // in the checkpoint) are ignored, a missing or mis-shaped entry is an error naming the file.
  void load_state(const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& path);

 private:
  struct Group {
    double weight_decay;
    bool muon;  // Muon's: exp_avg holds the momentum, exp_avg_sq and steps stay empty
    std::vector<std::string> names;
    std::vector<at::Tensor> params, exp_avg, exp_avg_sq, steps;
  };
  bool uses_muon(const std::string& name, const at::Tensor& param) const;
  // A parameter's state entries: (name prefix, tensor) for state() and load_state().
  static std::vector<std::pair<const char*, at::Tensor>> entries(const Group& g, size_t i);
  void muon_steps(const Group& g, double lr, double grad_scale, std::vector<at::Tensor>& updated);
  std::vector<Group> groups_;
  OptimizerConfig cfg_;
};

}  // namespace hybrid::train
