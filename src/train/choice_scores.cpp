#include "hybrid/train/choice_scores.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>

#include "hybrid/model/autocast.h"
#include "hybrid/util/progress.h"

namespace hybrid {
namespace {

// A row of tokens through the model and the log-probabilities it gives: target `token` at
// logits `position`, summed into its item's `choice`.
struct Target {
  size_t choice;
  int64_t position, token;
};
struct Row {
  size_t item;
  std::vector<int64_t> tokens;
  std::vector<Target> targets;
};

// A row a choice: the context's tail, then the choice, whose tokens are the targets. Where every
// choice of an item is one token (MMLU's letters), one row of the context serves them all: their
// tokens are targets at its last position (the same logits, one forward where there were four).
std::vector<Row> rows_of(const data::ChoiceTask& task, int64_t max_len, int rank, int world) {
  std::vector<Row> rows;
  auto context_tail = [&](const data::ChoiceItem& item, int64_t room) {
    return std::vector<int64_t>(item.context.end() - std::min<int64_t>(item.context.size(), room), item.context.end());
  };
  for (size_t i = rank; i < task.items.size(); i += world) {
    const auto& item = task.items[i];
    if (std::all_of(item.choices.begin(), item.choices.end(), [](const auto& c) { return c.size() == 1; })) {
      Row row{i, context_tail(item, max_len - 1), {}};
      for (size_t c = 0; c < item.choices.size(); ++c)
        row.targets.push_back({c, static_cast<int64_t>(row.tokens.size()) - 1, item.choices[c][0]});
      rows.push_back(std::move(row));
      continue;
    }
    for (size_t c = 0; c < item.choices.size(); ++c) {
      const auto& choice = item.choices[c];
      Row row{i, context_tail(item, max_len - static_cast<int64_t>(choice.size())), {}};
      for (int64_t token : choice) {
        row.targets.push_back({c, static_cast<int64_t>(row.tokens.size()) - 1, token});  // the logits before it
        row.tokens.push_back(token);
      }
      rows.push_back(std::move(row));
    }
  }
  // Longest first, so a batch's rows have about the same length and little padding.
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.tokens.size() > b.tokens.size(); });
  return rows;
}

// rows[first, last) through the model in one forward: each target's log-probability, in order.
std::vector<double> target_log_probs(HybridLM& model, const std::vector<Row>& rows, size_t first, size_t last,
                                     c10::Device device, bool bf16) {
  const int64_t B = static_cast<int64_t>(last - first), L = static_cast<int64_t>(rows[first].tokens.size());
  at::Tensor tokens = at::zeros({B, L}, at::kLong);  // padding after a row: causal, so it changes nothing before
  std::vector<int64_t> at_position, target;
  for (int64_t b = 0; b < B; ++b) {
    const Row& row = rows[first + b];
    std::copy(row.tokens.begin(), row.tokens.end(), tokens.data_ptr<int64_t>() + b * L);
    for (const Target& t : row.targets) at_position.push_back(b * L + t.position), target.push_back(t.token);
  }
  at::Tensor logits;
  {
    CudaAutocast autocast(bf16 && device.is_cuda());
    logits = model->forward(tokens.to(device));
  }
  auto on_device = [&](const std::vector<int64_t>& v) { return at::tensor(v, at::kLong).to(device); };
  // Only the targets' positions in float32: the whole logits' copy would cost GBs at a 100k vocabulary.
  const at::Tensor picked = logits.reshape({B * L, -1}).index_select(0, on_device(at_position)).to(at::kFloat);
  const at::Tensor log_probs =
      at::log_softmax(picked, -1).gather(1, on_device(target).unsqueeze(1)).squeeze(1).to(at::kDouble).cpu();
  return {log_probs.data_ptr<double>(), log_probs.data_ptr<double>() + log_probs.numel()};
}

size_t argmax(const std::vector<double>& v) { return std::max_element(v.begin(), v.end()) - v.begin(); }

}  // namespace

data::ChoiceTotals score_choice_task(HybridLM& model, const data::ChoiceTask& task, int64_t max_len, int64_t token_budget,
                               c10::Device device, bool bf16, int rank, int world) {
  at::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const std::vector<Row> rows = rows_of(task, max_len, rank, world);
  std::vector<std::vector<double>> log_probs(task.items.size());
  util::Progress progress("task " + task.name, static_cast<int64_t>(rows.size()), "rows", rank == 0);
  for (size_t first = 0; first < rows.size();) {
    // Rows while the padded batch fits the budget (always at least one).
    const size_t per_batch = std::max<int64_t>(1, token_budget / static_cast<int64_t>(rows[first].tokens.size()));
    const size_t last = std::min(rows.size(), first + per_batch);
    const std::vector<double> lp = target_log_probs(model, rows, first, last, device, bf16);
    size_t at = 0;
    for (size_t r = first; r < last; ++r) {
      auto& sums = log_probs[rows[r].item];
      sums.resize(task.items[rows[r].item].choices.size());  // zeros at first
      for (const Target& t : rows[r].targets) sums[t.choice] += lp[at++];
    }
    first = last;
    progress.update(static_cast<int64_t>(first));
  }
  model->train(was_training);

  data::ChoiceTotals t;
  for (size_t i = rank; i < task.items.size(); i += world) {
    const auto& item = task.items[i];
    const auto& lp = log_probs[i];
    std::vector<double> per_byte(lp.size()), per_token(lp.size());
    for (size_t c = 0; c < lp.size(); ++c) {
      per_byte[c] = lp[c] / static_cast<double>(item.choice_bytes[c]);
      per_token[c] = lp[c] / static_cast<double>(item.choices[c].size());
    }
    const auto label = static_cast<size_t>(item.label);
    t.items += 1;
    t.right += argmax(lp) == label;
    t.right_per_byte += argmax(per_byte) == label;
    t.right_per_token += argmax(per_token) == label;
    t.label_nats -= lp[label];
    t.label_bytes += static_cast<double>(item.choice_bytes[label]);
    t.chance += 1.0 / static_cast<double>(item.choices.size());
  }
  return t;
}

}  // namespace hybrid
