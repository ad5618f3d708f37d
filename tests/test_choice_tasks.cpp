// Multiple-choice tasks: the task file's reader refuses what it cannot score, naming the line,
// and the scores equal each choice scored alone, whatever the batching and the ranks' shares.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "hybrid/data/choice_task.h"
#include "hybrid/train/choice_scores.h"
#include "small_model.h"
#include "temp_dir.h"

using hybrid::HybridLM;
using hybrid::data::ChoiceTask;
using hybrid::data::ChoiceTotals;
using hybrid::data::read_choice_task;

namespace {

const std::string kHeader = R"({"format": "hybrid-choice-task-v1", "items": 1})";

using ChoiceTaskFile = TempDirTest;

TEST_F(ChoiceTaskFile, ReadsItemsUpToTheLimit) {
  const std::string file = write("t.jsonl", kHeader + "\n" +
                                                R"({"context": [1, 2], "choices": [[3], [4, 5]], "choice_bytes": [2, 6], "label": 1})" "\n\n" +
                                                R"({"context": [6], "choices": [[7], [8], [9]], "choice_bytes": [1, 1, 1], "label": 0})" "\n");
  const ChoiceTask all = read_choice_task("t", file, 10, 8);
  ASSERT_EQ(all.items.size(), 2u);
  EXPECT_EQ(all.items[0].context, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(all.items[0].choices[1], (std::vector<int64_t>{4, 5}));
  EXPECT_EQ(all.items[0].choice_bytes, (std::vector<int64_t>{2, 6}));
  EXPECT_EQ(all.items[0].label, 1);
  EXPECT_EQ(all.items[1].choices.size(), 3u);
  EXPECT_EQ(read_choice_task("t", file, 10, 8, 1).items.size(), 1u);
}

TEST_F(ChoiceTaskFile, NamesTheLineOfWhatItCannotScore) {
  auto error = [&](const std::string& item, int64_t max_len = 8) {
    const std::string file = write("bad.jsonl", kHeader + "\n" + item + "\n");
    return error_from([&] { read_choice_task("bad", file, 10, max_len); });
  };
  const std::string good_rest = R"("choice_bytes": [1, 1], "label": 0})";
  EXPECT_NE(error(R"({"context": [1], "choices": [[2], [10]], )" + good_rest).find(":2: choices[1]: token id 10 is outside"),
            std::string::npos);
  EXPECT_NE(error(R"({"context": [1], "choices": [[2], [3]], "choice_bytes": [1, 1], "label": 2})").find(":2: label 2 with 2 choices"),
            std::string::npos);
  EXPECT_NE(error(R"({"context": [1], "choices": [[2]], "choice_bytes": [1], "label": 0})").find("at least two"), std::string::npos);
  EXPECT_NE(error(R"({"context": [], "choices": [[2], [3]], )" + good_rest).find("context: expected a non-empty list"),
            std::string::npos);
  EXPECT_NE(error(R"({"context": [1], "choices": [[2], [3, 3]], )" + good_rest, 2).find("choices[1]: 2 tokens, the model scores at most 1"),
            std::string::npos);
  EXPECT_NE(error(R"({"context": [1], "choices": [[2], [3]], "label": 0})").find("no 'choice_bytes'"), std::string::npos);
  EXPECT_NE(error(R"({"context": [1], "choices": [[2], [3]], "choice_bytes": [1, 0], "label": 0})").find("choice_bytes[1]"),
            std::string::npos);
  EXPECT_NE(error(R"({"context": [1], "choices": [[2], [3.5]], )" + good_rest).find("expected integer token ids"),
            std::string::npos);
  EXPECT_NE(error(R"({"context": [1], "choices")").find(":2: not JSON"), std::string::npos);

  const std::string no_header = write("raw.jsonl", R"({"context": [1], "choices": [[2], [3]], )" + good_rest + "\n");
  EXPECT_NE(error_from([&] { read_choice_task("raw", no_header, 10, 8); }).find("raw.jsonl:1: not a task file"), std::string::npos);
  const std::string empty = write("empty.jsonl", kHeader + "\n");
  EXPECT_NE(error_from([&] { read_choice_task("empty", empty, 10, 8); }).find("empty.jsonl: no items"), std::string::npos);
  EXPECT_NE(error_from([&] { read_choice_task("gone", path("gone.jsonl"), 10, 8); }).find("gone.jsonl: cannot open"),
            std::string::npos);
}

TEST(ChoiceScores, RatesOfTotals) {
  const auto s = hybrid::data::choice_scores(ChoiceTotals{4, 3, 2, 1, 8 * std::log(2.0), 4, 1.5});
  EXPECT_EQ(s.items, 4);
  EXPECT_DOUBLE_EQ(s.acc, 0.75);
  EXPECT_DOUBLE_EQ(s.acc_norm, 0.5);
  EXPECT_DOUBLE_EQ(s.acc_per_token, 0.25);
  EXPECT_DOUBLE_EQ(s.bpb, 2.0);
  EXPECT_DOUBLE_EQ(s.chance, 0.375);
}

// Items of random contexts (some longer than max_len, so cut) and 2-4 choices of 1-5 tokens; every
// fourth item's choices one token each (scored from one row of the context).
ChoiceTask random_task(int64_t vocab, int items, uint32_t seed) {
  std::mt19937 rng(seed);
  auto ids = [&](int n) {
    std::vector<int64_t> v(n);
    for (auto& x : v) x = static_cast<int64_t>(rng() % vocab);
    return v;
  };
  ChoiceTask task{"random", "(memory)", {}};
  for (int i = 0; i < items; ++i) {
    hybrid::data::ChoiceItem item;
    item.context = ids(1 + static_cast<int>(rng() % 30));
    const int n = 2 + static_cast<int>(rng() % 3);
    for (int c = 0; c < n; ++c) {
      item.choices.push_back(ids(i % 4 == 0 ? 1 : 1 + static_cast<int>(rng() % 5)));
      item.choice_bytes.push_back(1 + static_cast<int64_t>(rng() % 20));
    }
    item.label = static_cast<int64_t>(rng() % n);
    task.items.push_back(std::move(item));
  }
  return task;
}

// The same totals from each choice alone: one row, no padding, the whole log-softmax in float64.
ChoiceTotals totals_one_by_one(HybridLM& model, const ChoiceTask& task, int64_t max_len) {
  at::NoGradGuard no_grad;
  ChoiceTotals t;
  for (const auto& item : task.items) {
    std::vector<double> lp, per_byte, per_token;
    for (size_t c = 0; c < item.choices.size(); ++c) {
      const auto& choice = item.choices[c];
      const int64_t keep = std::min<int64_t>(item.context.size(), max_len - choice.size());
      std::vector<int64_t> row(item.context.end() - keep, item.context.end());
      row.insert(row.end(), choice.begin(), choice.end());
      const at::Tensor log_probs = at::log_softmax(model->forward(at::tensor(row, at::kLong).unsqueeze(0))[0].to(at::kDouble), -1);
      double sum = 0;
      for (size_t j = 0; j < choice.size(); ++j) sum += log_probs[keep - 1 + j][choice[j]].item<double>();
      lp.push_back(sum);
      per_byte.push_back(sum / item.choice_bytes[c]);
      per_token.push_back(sum / choice.size());
    }
    auto best = [](const std::vector<double>& v) { return std::max_element(v.begin(), v.end()) - v.begin(); };
    t.items += 1;
    t.right += best(lp) == item.label;
    t.right_per_byte += best(per_byte) == item.label;
    t.right_per_token += best(per_token) == item.label;
    t.label_nats -= lp[item.label];
    t.label_bytes += item.choice_bytes[item.label];
    t.chance += 1.0 / item.choices.size();
  }
  return t;
}

void expect_same_totals(const ChoiceTotals& a, const ChoiceTotals& b) {
  EXPECT_EQ(a.items, b.items);
  EXPECT_EQ(a.right, b.right);
  EXPECT_EQ(a.right_per_byte, b.right_per_byte);
  EXPECT_EQ(a.right_per_token, b.right_per_token);
  EXPECT_NEAR(a.label_nats, b.label_nats, 1e-5 * b.label_nats);
  EXPECT_EQ(a.label_bytes, b.label_bytes);
  EXPECT_DOUBLE_EQ(a.chance, b.chance);
}

TEST(ChoiceScores, EqualEachChoiceScoredAloneInAnyBatchesAndShares) {
  at::manual_seed(0);
  HybridLM model(small_model_config("GGGA"));
  model->initialize(5);
  model->train();
  const ChoiceTask task = random_task(97, 25, 1);
  const int64_t max_len = 16;
  const ChoiceTotals expected = totals_one_by_one(model, task, max_len);
  ASSERT_GT(expected.right, 0);
  ASSERT_LT(expected.right, expected.items);
  for (int64_t budget : {1, 40, 10000}) {
    SCOPED_TRACE("token budget " + std::to_string(budget));
    expect_same_totals(hybrid::score_choice_task(model, task, max_len, budget, at::kCPU, false), expected);
  }
  // Three ranks' shares add up to the whole.
  std::vector<double> sum(7, 0.0);
  for (int rank = 0; rank < 3; ++rank) {
    const auto v = hybrid::score_choice_task(model, task, max_len, 64, at::kCPU, false, rank, 3).values();
    for (size_t i = 0; i < v.size(); ++i) sum[i] += v[i];
  }
  expect_same_totals(ChoiceTotals::from_values(sum), expected);
  EXPECT_TRUE(model->is_training());
}

// On the GPU, float32 and bf16 autocast: the CPU's totals up to the precision of the products
// (TF32 around the delta rule's state pass, bf16 under autocast); a count may move by a near tie.
TEST(ChoiceScoresCuda, FollowTheCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(0);
  HybridLM model(small_model_config("GGGA"));
  model->initialize(5);
  const ChoiceTask task = random_task(97, 40, 2);
  const ChoiceTotals cpu = hybrid::score_choice_task(model, task, 16, 64, at::kCPU, false);
  model->to(at::kCUDA);
  for (bool bf16 : {false, true}) {
    SCOPED_TRACE(bf16 ? "bf16 autocast" : "float32");
    const ChoiceTotals gpu = hybrid::score_choice_task(model, task, 16, 64, at::kCUDA, bf16);
    EXPECT_EQ(gpu.items, cpu.items);
    EXPECT_NEAR(gpu.right, cpu.right, 1);
    EXPECT_NEAR(gpu.right_per_byte, cpu.right_per_byte, 1);
    EXPECT_NEAR(gpu.right_per_token, cpu.right_per_token, 1);
    EXPECT_NEAR(gpu.label_nats, cpu.label_nats, (bf16 ? 1e-2 : 1e-4) * cpu.label_nats);
  }
}

}  // namespace
