#include "hybrid/train/choice_scores.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>

#include "hybrid/model/autocast.h"
#include "hybrid/model/decoding.h"
#include "hybrid/util/progress.h"

namespace hybrid {
namespace {

// A target token and where its logits are: row `position` of a forward's logits flattened to
// [rows, vocab]; its log-probability adds into choice `choice` of item `item`.
struct Target {
  size_t item, choice;
  int64_t position, token;
};

// Each target's log-probability from logits [..., vocab] (flattened over the leading dimensions),
// added into sums[item][choice]. Only the targets' rows go to float32: the whole logits' copy
// would cost GBs at a 100k vocabulary.
void add_log_probs(const at::Tensor& logits, const std::vector<Target>& targets,
                   std::vector<std::vector<double>>& sums) {
  std::vector<int64_t> position, token;
  for (const Target& t : targets) position.push_back(t.position), token.push_back(t.token);
  auto on_device = [&](const std::vector<int64_t>& v) { return at::tensor(v, at::kLong).to(logits.device()); };
  const at::Tensor picked = logits.reshape({-1, logits.size(-1)}).index_select(0, on_device(position)).to(at::kFloat);
  const at::Tensor lp = at::log_softmax(picked, -1).gather(1, on_device(token).unsqueeze(1)).squeeze(1).to(at::kDouble).cpu();
  for (size_t i = 0; i < targets.size(); ++i) sums[targets[i].item][targets[i].choice] += lp.data_ptr<double>()[i];
}

// Items whose context fits the model's length beside their longest choice go through it once:
// their contexts packed as documents in one forward, whose last logits score each choice's first
// token and whose decoding states the choices go on from (the same log-probabilities as a row of
// context and choice, up to rounding, with the context's tokens through the model once where they
// went once a choice). A cut context is cut for each choice as lm-eval cuts it (from the left, to
// fit beside that choice): those items take a row a choice, or where every choice is one token
// (MMLU's letters) one row of the context for all.
bool context_fits(const data::ChoiceItem& item, int64_t max_len) {
  size_t longest = 0;
  for (const auto& c : item.choices) longest = std::max(longest, c.size());
  return static_cast<int64_t>(item.context.size() + longest) <= max_len;
}

// A row of tokens through the model (from the start, or from a context's decoding state), with
// the targets its logits score.
struct Row {
  std::vector<int64_t> tokens;
  std::vector<Target> targets;  // positions within the row
};

// The choices a row scores: one, or every one of an item whose choices are one token each.
int64_t choices_in(const Row& row) {
  return row.targets.front().choice == row.targets.back().choice ? 1 : static_cast<int64_t>(row.targets.size());
}

// The end of the batch that starts at `first` of `count` things: things while `fits(i)`, which
// counts thing i in and says whether the batch still fits, holds; always at least one.
template <class Fits>
size_t batch_end(size_t first, size_t count, Fits fits) {
  size_t end = first;
  while (end < count && (fits(end) || end == first)) ++end;
  return end;
}

std::vector<Row> rows_of_cut_item(const data::ChoiceItem& item, size_t i, int64_t max_len) {
  auto context_tail = [&](int64_t room) {
    return std::vector<int64_t>(item.context.end() - std::min<int64_t>(item.context.size(), room), item.context.end());
  };
  if (std::all_of(item.choices.begin(), item.choices.end(), [](const auto& c) { return c.size() == 1; })) {
    Row row{context_tail(max_len - 1), {}};
    for (size_t c = 0; c < item.choices.size(); ++c)
      row.targets.push_back({i, c, static_cast<int64_t>(row.tokens.size()) - 1, item.choices[c][0]});
    return {row};
  }
  std::vector<Row> rows;
  for (size_t c = 0; c < item.choices.size(); ++c) {
    const auto& choice = item.choices[c];
    Row row{context_tail(max_len - static_cast<int64_t>(choice.size())), {}};
    for (int64_t token : choice) {
      row.targets.push_back({i, c, static_cast<int64_t>(row.tokens.size()) - 1, token});  // the logits before it
      row.tokens.push_back(token);
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

// Rows (of one length or shorter, padded after their tokens: causal, so padding changes nothing
// before it) through the model in one forward from `decoding` (none: from the start); each
// target's log-probability added into sums.
void score_rows(HybridLM& model, const std::vector<const Row*>& rows, DecodingState* decoding, c10::Device device,
                bool bf16, std::vector<std::vector<double>>& sums) {
  const int64_t B = static_cast<int64_t>(rows.size());
  int64_t L = 0;
  for (const Row* row : rows) L = std::max<int64_t>(L, static_cast<int64_t>(row->tokens.size()));
  at::Tensor tokens = at::zeros({B, L}, at::kLong);
  std::vector<Target> targets;
  for (int64_t b = 0; b < B; ++b) {
    std::copy(rows[b]->tokens.begin(), rows[b]->tokens.end(), tokens.data_ptr<int64_t>() + b * L);
    for (Target t : rows[b]->targets) t.position += b * L, targets.push_back(t);
  }
  at::Tensor logits;
  {
    CudaAutocast autocast(bf16 && device.is_cuda());
    logits = decoding ? model->forward(tokens.to(device), *decoding) : model->forward(tokens.to(device));
  }
  add_log_probs(logits, targets, sums);
}

// Bytes of a decoding state's tensors: what a row's stacked copy holds.
int64_t state_bytes(const DecodingState& state) {
  int64_t bytes = 0;
  for (const LayerDecodingState& layer : state.layers)
    for (const at::Tensor* x : {&layer.state, &layer.conv_inputs, &layer.keys, &layer.values})
      if (x->defined()) bytes += static_cast<int64_t>(x->numel() * x->element_size());
  return bytes;
}

// The same before the forward, of a row after `tokens` tokens, in `element` bytes a value (the
// model's: the GDN states are that wide; conv inputs, keys and values are under autocast narrower).
int64_t state_bytes(const ModelConfig& cfg, int64_t tokens, int64_t element) {
  const GDNConfig& g = cfg.gdn;
  const int64_t gdn = g.n_v_heads * g.head_k_dim * g.head_v_dim +
                      (g.conv_size - 1) * (2 * g.n_k_heads * g.head_k_dim + g.n_v_heads * g.head_v_dim);
  const int64_t attention = 2 * tokens * cfg.attention.n_kv_heads * (cfg.d_model / cfg.attention.n_heads);
  int64_t values = 0;
  for (char type : cfg.layer_types()) values += type == 'G' ? gdn : attention;
  return values * element;
}

// Items (contexts that fit) through the model as context_fits says, their contexts in one
// packed forward; then their choices' rows from the contexts' states in batches within the token
// budget, whose stacked states take at most half of `state_budget` bytes (at least one row a batch).
void score_shared_contexts(HybridLM& model, const data::ChoiceTask& task, const std::vector<size_t>& items,
                           int64_t token_budget, int64_t state_budget, c10::Device device, bool bf16,
                           std::vector<std::vector<double>>& sums) {
  std::vector<int64_t> ids, offsets{0};
  for (size_t i : items) {
    const auto& context = task.items[i].context;
    ids.insert(ids.end(), context.begin(), context.end());
    offsets.push_back(static_cast<int64_t>(ids.size()));
  }
  std::vector<DecodingState> states;
  at::Tensor last_logits;  // [N, 1, vocab]: each context's last position
  {
    CudaAutocast autocast(bf16 && device.is_cuda());
    last_logits = model->forward_documents(at::tensor(ids, at::kLong).unsqueeze(0).to(device),
                                           at::tensor(offsets, at::kLong), states);
  }
  std::vector<Target> first;  // each choice's first token
  std::vector<Row> rows;      // the rest of each longer choice, from its context's state
  std::vector<size_t> row_state;
  for (size_t n = 0; n < items.size(); ++n) {
    const auto& item = task.items[items[n]];
    for (size_t c = 0; c < item.choices.size(); ++c) {
      const auto& choice = item.choices[c];
      first.push_back({items[n], c, static_cast<int64_t>(n), choice[0]});
      if (choice.size() == 1) continue;
      Row row{std::vector<int64_t>(choice.begin(), choice.end() - 1), {}};  // token j's logits score token j + 1
      for (size_t j = 1; j < choice.size(); ++j) row.targets.push_back({items[n], c, static_cast<int64_t>(j) - 1, choice[j]});
      rows.push_back(std::move(row));
      row_state.push_back(n);
    }
  }
  add_log_probs(last_logits, first, sums);
  for (size_t start = 0; start < rows.size();) {
    // Rows while the padded batch fits the token budget and their stacked states half the state budget.
    int64_t longest = 0, bytes = 0;
    const size_t end = batch_end(start, rows.size(), [&](size_t r) {
      longest = std::max<int64_t>(longest, static_cast<int64_t>(rows[r].tokens.size()));
      bytes += state_bytes(states[row_state[r]]);
      return static_cast<int64_t>(r - start + 1) * longest <= token_budget && bytes <= state_budget / 2;
    });
    std::vector<const Row*> batch;
    std::vector<DecodingState> batch_states;
    for (size_t r = start; r < end; ++r) batch.push_back(&rows[r]), batch_states.push_back(states[row_state[r]]);
    DecodingState stacked = stack_rows(batch_states);
    score_rows(model, batch, &stacked, device, bf16, sums);
    start = end;
  }
}

size_t argmax(const std::vector<double>& v) { return std::max_element(v.begin(), v.end()) - v.begin(); }

}  // namespace

data::ChoiceTotals score_choice_task(HybridLM& model, const data::ChoiceTask& task, int64_t max_len, int64_t token_budget,
                               c10::Device device, bool bf16, int rank, int world) {
  at::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  // The decoding states of a batch's contexts and the stacked copies its choices go on from take
  // at most what a forward from the start of the token budget takes for its logits in bf16 (at
  // 7b.yaml's size a row's states take 56 MB and 0.25 MB a context token, its budget's logits 3.3 GB).
  const int64_t state_budget = token_budget * model->config().vocab_size * 2;
  std::vector<size_t> shared;
  std::vector<Row> cut_rows;
  int64_t choices = 0;
  for (size_t i = rank; i < task.items.size(); i += world) {
    const auto& item = task.items[i];
    choices += static_cast<int64_t>(item.choices.size());
    if (context_fits(item, max_len)) {
      shared.push_back(i);
    } else {
      for (Row& row : rows_of_cut_item(item, i, max_len)) cut_rows.push_back(std::move(row));
    }
  }
  // Longest first, so that a batch's rows (and a batch's contexts, whose states are stacked
  // right-aligned) have about the same length and little padding.
  std::stable_sort(shared.begin(), shared.end(),
                   [&](size_t a, size_t b) { return task.items[a].context.size() > task.items[b].context.size(); });
  std::stable_sort(cut_rows.begin(), cut_rows.end(), [](const Row& a, const Row& b) { return a.tokens.size() > b.tokens.size(); });

  std::vector<std::vector<double>> sums(task.items.size());
  for (size_t i : shared) sums[i].assign(task.items[i].choices.size(), 0.0);
  for (const Row& row : cut_rows) sums[row.targets[0].item].assign(task.items[row.targets[0].item].choices.size(), 0.0);
  util::Progress progress("task " + task.name, choices, "choices", rank == 0);
  int64_t done = 0;
  const int64_t element = model->parameters().front().element_size();
  for (size_t first = 0; first < shared.size();) {
    // Contexts while they fit the budget and their states half the state budget: the choices'
    // stacked states take the other half.
    int64_t tokens = 0, bytes = 0;
    const size_t last = batch_end(first, shared.size(), [&](size_t i) {
      const int64_t length = static_cast<int64_t>(task.items[shared[i]].context.size());
      tokens += length, bytes += state_bytes(model->config(), length, element);
      return tokens <= token_budget && bytes <= state_budget / 2;
    });
    const std::vector<size_t> items(shared.begin() + first, shared.begin() + last);
    score_shared_contexts(model, task, items, token_budget, state_budget, device, bf16, sums);
    for (size_t i : items) done += static_cast<int64_t>(task.items[i].choices.size());
    progress.update(done);
    first = last;
  }
  for (size_t first = 0; first < cut_rows.size();) {
    // Rows while the padded batch fits the budget (the first, longest, sets the padding).
    const auto padded = static_cast<int64_t>(cut_rows[first].tokens.size());
    const size_t last = batch_end(first, cut_rows.size(),
                                  [&](size_t r) { return static_cast<int64_t>(r - first + 1) * padded <= token_budget; });
    std::vector<const Row*> batch;
    for (size_t r = first; r < last; ++r) batch.push_back(&cut_rows[r]), done += choices_in(cut_rows[r]);
    score_rows(model, batch, nullptr, device, bf16, sums);
    first = last;
    progress.update(done);
  }
  model->train(was_training);

  data::ChoiceTotals t;
  for (size_t i = rank; i < task.items.size(); i += world) {
    const auto& item = task.items[i];
    const auto& lp = sums[i];
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
