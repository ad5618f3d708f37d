// One optimizer step of the run: its micro batches' forward and backward, the reduction over
// ranks, the guards, clipping and the update; and whether this rank asks to stop after it.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>

#include "hybrid/error.h"
#include "hybrid/model/autocast.h"
#include "hybrid/train/loss.h"
#include "hybrid/util/stop_signals.h"
#include "run.h"

namespace hybrid::train {

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
  state_.tokens += layout_.global_batch * cfg_.data.seq_len;
  state_.instances_consumed += layout_.global_batch;
  state_.global_batch_size = layout_.global_batch;
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
  // The next step's time scaled by its batch (trainer.batch_size_warmup may grow it).
  const double next_step_s = seconds_per_step_ * static_cast<double>(t_.global_batch_at(in_progress)) /
                             static_cast<double>(layout_.global_batch);
  const double needed = evaluation_after(in_progress) + next_step_s + evaluation_after(in_progress + 1) + save_s_;
  if (options_.time_limit_s <= 0 || elapsed + needed <= options_.time_limit_s) return "";
  char why[64];
  std::snprintf(why, sizeof why, "--time-limit %g s", options_.time_limit_s);
  return why;
}

}  // namespace hybrid::train
