// Multiple-choice tasks as scripts/prepare_task.py writes them: JSON lines, a header
// {"format": "hybrid-choice-task-v1", ...} then one item a line, every text already token ids.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hybrid::data {

struct ChoiceItem {
  std::vector<int64_t> context;
  std::vector<std::vector<int64_t>> choices;
  std::vector<int64_t> choice_bytes;  // each choice's text in UTF-8 bytes (acc_norm, bits per byte)
  int64_t label = 0;                  // the right choice
};

struct ChoiceTask {
  std::string name, path;
  std::vector<ChoiceItem> items;
};

// How a model did on items, summed over them, so ranks' shares add up (an all-reduce of values()).
struct ChoiceTotals {
  double items = 0;
  double right = 0;            // the choice of largest summed log-probability is the label (acc)
  double right_per_byte = 0;   // ... of largest log-probability a byte of its text (lm-eval's acc_norm)
  double right_per_token = 0;  // ... of largest log-probability a token
  double label_nats = 0;       // -log p of the labels' choices
  double label_bytes = 0;      // their bytes
  double chance = 0;           // 1 / choices, summed: the accuracy of a guess
  std::vector<double> values() const;
  static ChoiceTotals from_values(const std::vector<double>& v);
};

// The totals as rates.
struct ChoiceScores {
  int64_t items = 0;
  double acc = 0, acc_norm = 0, acc_per_token = 0;
  double bpb = 0;     // bits per byte of the right choices: label_nats / ln 2 / label_bytes
  double chance = 0;  // a guess's accuracy (0.25 with four choices an item)
};
ChoiceScores choice_scores(const ChoiceTotals& t);

// Reads the first `limit` items (0: all). Anything malformed (not the format, a missing or
// mistyped field, an id outside [0, vocab_size), a label out of range, fewer than two choices,
// an empty context or choice, a choice of max_len tokens or more) throws one Error naming
// path:line; an unreadable or empty file too.
ChoiceTask read_choice_task(const std::string& name, const std::string& path, int64_t vocab_size, int64_t max_len,
                            int64_t limit = 0);

}  // namespace hybrid::data
