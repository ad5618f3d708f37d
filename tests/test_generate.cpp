// generate(): the tokens a forward over the whole growing sequence would choose, greedy or drawn
// from the top k; reproducible from the seed.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>

#include "hybrid/model/decoding.h"
#include "hybrid/model/generate.h"
#include "small_model.h"

namespace {
using hybrid::HybridLM;
using hybrid::SamplingOptions;

HybridLM small_model() {
  HybridLM model(small_model_config("GGGA"));
  model->initialize(11);
  model->to(at::kDouble);
  return model;
}

// The last position's logits of a forward over prompt and tokens so far, for each new token.
std::vector<at::Tensor> logits_by_whole_forwards(HybridLM& model, const at::Tensor& prompt, const at::Tensor& added) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < added.size(1); ++i)
    rows.push_back(model->forward(at::cat({prompt, added.narrow(1, 0, i)}, 1)).select(1, -1));
  return rows;
}

// New tokens drawn for 3 random prompt rows, with the last-position logits of a whole forward
// before each (what the draws must agree with).
struct Draws {
  at::Tensor prompt, added;
  std::vector<at::Tensor> logits;
};
Draws draw(HybridLM& model, uint64_t prompt_seed, const SamplingOptions& options) {
  at::manual_seed(prompt_seed);
  Draws d;
  d.prompt = at::randint(0, 97, {3, 5}, at::kLong);
  d.added = hybrid::generate(model, d.prompt, options);
  d.logits = logits_by_whole_forwards(model, d.prompt, d.added);
  return d;
}

// Options that leave one candidate give the greedy continuation, at any temperature.
void expect_greedy(HybridLM& model, const at::Tensor& prompt, const SamplingOptions& one_candidate) {
  SamplingOptions greedy;
  greedy.new_tokens = one_candidate.new_tokens;
  EXPECT_TRUE(at::equal(hybrid::generate(model, prompt, one_candidate), hybrid::generate(model, prompt, greedy)));
}

TEST(Generate, GreedyTakesTheWholeForwardsArgmax) {
  auto model = small_model();
  SamplingOptions options;
  options.new_tokens = 12;
  const Draws d = draw(model, 1, options);
  ASSERT_EQ(d.added.sizes(), at::IntArrayRef({3, 12}));
  for (int64_t i = 0; i < 12; ++i) EXPECT_TRUE(at::equal(d.added.select(1, i), d.logits[i].argmax(-1))) << "token " << i;
}

TEST(Generate, SamplesFromTheTopKAndRepeatsWithTheSeed) {
  auto model = small_model();
  SamplingOptions options;
  options.new_tokens = 15;
  options.temperature = 1.5;
  options.top_k = 3;
  options.seed = 7;
  const Draws d = draw(model, 2, options);
  EXPECT_TRUE(at::equal(d.added, hybrid::generate(model, d.prompt, options)));
  int64_t not_first = 0;
  for (int64_t i = 0; i < 15; ++i) {
    const at::Tensor top = std::get<1>(d.logits[i].topk(3, -1));  // [3 rows, 3]
    EXPECT_TRUE(top.eq(d.added.select(1, i).unsqueeze(-1)).any(-1).all().item<bool>()) << "token " << i;
    not_first += d.added.select(1, i).ne(top.select(1, 0)).sum().item<int64_t>();
  }
  EXPECT_GT(not_first, 0);  // 45 draws at temperature 1.5 among three: not all of them the most likely
  options.top_k = 1;
  expect_greedy(model, d.prompt, options);
}

// Nucleus sampling: a drawn token's better-ranked tokens hold less than top_p of the probability
// (softmax(logits / temperature) of the whole forward); a tiny top_p leaves the greedy choice.
TEST(Generate, SamplesFromTheNucleus) {
  auto model = small_model();
  SamplingOptions options;
  options.new_tokens = 15;
  options.temperature = 2;
  options.top_p = 0.3;
  const Draws d = draw(model, 4, options);
  for (int64_t i = 0; i < 15; ++i) {
    const at::Tensor p = (d.logits[i] / options.temperature).softmax(-1);                   // [3, vocab]
    const at::Tensor drawn = p.gather(-1, d.added.select(1, i).unsqueeze(-1));              // [3, 1]
    const at::Tensor above = (p * p.gt(drawn)).sum(-1);                                     // mass ranked above
    EXPECT_TRUE(above.lt(options.top_p).all().item<bool>()) << "token " << i << ": " << above;
  }
  options.top_p = 1e-9;
  expect_greedy(model, d.prompt, options);
}

// A row ends at the stop token (the rest of it is that token); generation ends when all have.
TEST(Generate, RowsEndAtTheStopToken) {
  auto model = small_model();
  at::manual_seed(3);
  const at::Tensor prompt = at::randint(0, 97, {2, 6}, at::kLong);
  SamplingOptions options;
  options.new_tokens = 10;
  const at::Tensor greedy = hybrid::generate(model, prompt, options);
  options.stop_id = greedy[0][3].item<int64_t>();
  const at::Tensor stopped = hybrid::generate(model, prompt, options);
  int64_t longest = 0;
  for (int64_t row = 0; row < 2; ++row) {
    const at::Tensor hits = at::nonzero(greedy[row].eq(options.stop_id));
    const int64_t end = hits.size(0) ? hits[0][0].item<int64_t>() + 1 : 10;  // tokens up to the stop, kept
    longest = std::max(longest, end);
    ASSERT_GE(stopped.size(1), end) << "row " << row;
    EXPECT_TRUE(at::equal(stopped[row].narrow(0, 0, end), greedy[row].narrow(0, 0, end))) << "row " << row;
    EXPECT_TRUE(stopped[row].narrow(0, end, stopped.size(1) - end).eq(options.stop_id).all().item<bool>()) << "row " << row;
  }
  EXPECT_EQ(stopped.size(1), longest);
  hybrid::GenerationTimes times;
  const at::Tensor alone = hybrid::generate(model, prompt.narrow(0, 0, 1), options, &times);  // ends by its 4th token
  EXPECT_LE(alone.size(1), 4);
  EXPECT_EQ(times.steps, alone.size(1) - 1);  // the forwards after the prompt's: one a token but the first
  EXPECT_GT(times.prompt_seconds, 0);
  EXPECT_GE(times.step_seconds, 0);
  EXPECT_TRUE(at::equal(alone[0], greedy[0].narrow(0, 0, alone.size(1))));
}

// Each row's first lengths[b] prompt tokens through the model twice, alone: one state to stack
// (stack_rows), one to go on alone beside it.
struct StackedAndAlone {
  hybrid::DecodingState stacked;
  std::vector<hybrid::DecodingState> alone;
};
StackedAndAlone stacked_and_alone(HybridLM& model, const at::Tensor& prompt, const std::vector<int64_t>& lengths) {
  const int64_t B = static_cast<int64_t>(lengths.size());
  std::vector<hybrid::DecodingState> rows(B);
  StackedAndAlone s{{}, std::vector<hybrid::DecodingState>(B)};
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor mine = prompt[b].narrow(0, 0, lengths[b]).unsqueeze(0);
    model->forward(mine, rows[b], /*last_only=*/true);
    model->forward(mine, s.alone[b], /*last_only=*/true);
  }
  s.stacked = hybrid::stack_rows(rows);
  return s;
}

// The stacked rows take next's tokens a step at a time as each row alone: the same logits.
void expect_steps_as_alone(HybridLM& model, StackedAndAlone& s, const at::Tensor& next) {
  for (int64_t t = 0; t < next.size(1); ++t) {
    const at::Tensor together = model->forward(next.narrow(1, t, 1), s.stacked, /*last_only=*/true);
    for (int64_t b = 0; b < next.size(0); ++b) {
      const at::Tensor own = model->forward(next[b].narrow(0, t, 1).unsqueeze(0), s.alone[b], /*last_only=*/true);
      EXPECT_TRUE(at::allclose(together[b], own[0], 1e-10, 1e-10)) << "row " << b << ", step " << t;
    }
  }
}

// Rows of different lengths stacked after each went through the model alone (stack_rows) decode
// on as each row alone: the same logits at every step, in float64.
TEST(Generate, StackedRowsDecodeAsEachRowAlone) {
  auto model = small_model();
  at::NoGradGuard no_grad;
  at::manual_seed(5);
  const at::Tensor prompt = at::randint(0, 97, {3, 7}, at::kLong), next = at::randint(0, 97, {3, 4}, at::kLong);
  StackedAndAlone s = stacked_and_alone(model, prompt, {7, 3, 5});
  hybrid::DecodingState& stacked = s.stacked;
  std::vector<hybrid::DecodingState>& alone = s.alone;
  EXPECT_EQ(stacked.length, 7);
  expect_steps_as_alone(model, s, next);
  // Two tokens at once go on the same way (the causal mask beside the padding's).
  const at::Tensor two = at::randint(0, 97, {3, 2}, at::kLong);
  const at::Tensor together = model->forward(two, stacked);
  for (int64_t b = 0; b < 3; ++b)
    EXPECT_TRUE(at::allclose(together[b], model->forward(two[b].unsqueeze(0), alone[b])[0], 1e-10, 1e-10)) << b;
  EXPECT_THROW(hybrid::stack_rows({}), std::invalid_argument);
  EXPECT_THROW(hybrid::stack_rows({stacked}), std::invalid_argument);  // three rows, already stacked
}

// Prompts of different lengths packed as documents in one forward (forward_documents; a document
// of one token, shorter than the conv's kept inputs, among them) give each its last logits, and
// states that, stacked, decode on as each row alone: the same logits in float64.
TEST(Generate, PackedPromptsDecodeAsEachRowAlone) {
  auto model = small_model();
  at::NoGradGuard no_grad;
  at::manual_seed(7);
  const std::vector<int64_t> lengths = {5, 1, 7, 3};
  const at::Tensor prompt = at::randint(0, 97, {4, 7}, at::kLong), next = at::randint(0, 97, {4, 3}, at::kLong);
  StackedAndAlone s = stacked_and_alone(model, prompt, lengths);  // its stacked state is replaced below
  const auto [packed, cu] = hybrid::pack_rows(prompt, lengths);
  EXPECT_TRUE(at::equal(cu, at::tensor(std::vector<int64_t>{0, 5, 6, 13, 16})));
  std::vector<hybrid::DecodingState> rows;
  const at::Tensor last = model->forward_documents(packed, cu, rows);
  ASSERT_EQ(rows.size(), 4u);
  for (int64_t b = 0; b < 4; ++b) {
    hybrid::DecodingState mine;
    const at::Tensor own = model->forward(prompt[b].narrow(0, 0, lengths[b]).unsqueeze(0), mine, /*last_only=*/true);
    EXPECT_TRUE(at::allclose(last[b], own[0], 1e-10, 1e-10)) << "document " << b;
    EXPECT_EQ(rows[b].length, lengths[b]);
  }
  s.stacked = hybrid::stack_rows(rows);
  expect_steps_as_alone(model, s, next);
  // Offsets that leave tokens out, or a document of none, are refused (not silently merged).
  std::vector<hybrid::DecodingState> refused;
  EXPECT_THROW(model->forward_documents(packed, at::tensor(std::vector<int64_t>{0, 5, 6}), refused), std::invalid_argument);
  EXPECT_THROW(model->forward_documents(packed, at::tensor(std::vector<int64_t>{0, 5, 5, 16}), refused),
               std::invalid_argument);
}

// generate() with prompt lengths: each row's continuation is the one it gets alone.
TEST(Generate, PromptsOfDifferentLengthsGoOnAsAlone) {
  auto model = small_model();
  at::manual_seed(6);
  at::Tensor prompt = at::randint(0, 97, {3, 6}, at::kLong);
  const std::vector<int64_t> lengths = {2, 6, 4};
  SamplingOptions options;
  options.new_tokens = 8;
  const at::Tensor together = hybrid::generate(model, prompt, options, nullptr, lengths);
  prompt.narrow(1, 2, 4)[0].fill_(96);  // padding is never read
  EXPECT_TRUE(at::equal(hybrid::generate(model, prompt, options, nullptr, lengths), together));
  for (int64_t b = 0; b < 3; ++b)
    EXPECT_TRUE(at::equal(together[b], hybrid::generate(model, prompt[b].narrow(0, 0, lengths[b]).unsqueeze(0),
                                                       options)[0]))
        << "row " << b;
  EXPECT_THROW(hybrid::generate(model, prompt, options, nullptr, {2, 7, 4}), std::invalid_argument);  // past T
  EXPECT_THROW(hybrid::generate(model, prompt, options, nullptr, {2, 0, 4}), std::invalid_argument);
  EXPECT_THROW(hybrid::generate(model, prompt, options, nullptr, {2, 4}), std::invalid_argument);  // two of three
}

// A state with fixed shapes (fix_shapes: attention caches at full capacity, the next slot and the
// positions on the device, advanced in place) decodes as the growing one: the same logits at every
// step in float64, of plain and of stacked rows; past its capacity it refuses.
TEST(Generate, FixedShapesDecodeAsGrowingCaches) {
  auto model = small_model();
  at::NoGradGuard no_grad;
  at::manual_seed(8);
  const at::Tensor prompt = at::randint(0, 97, {2, 5}, at::kLong), next = at::randint(0, 97, {2, 4}, at::kLong);
  hybrid::DecodingState growing, fixed;
  model->forward(prompt, growing, /*last_only=*/true);
  model->forward(prompt, fixed, /*last_only=*/true);
  EXPECT_THROW(hybrid::fix_shapes(fixed, 5), std::invalid_argument);  // no slot past the 5 held
  hybrid::fix_shapes(fixed, 5 + next.size(1));
  for (int64_t t = 0; t < next.size(1); ++t)
    EXPECT_TRUE(at::allclose(model->forward(next.narrow(1, t, 1), fixed, true),
                             model->forward(next.narrow(1, t, 1), growing, true), 1e-12, 1e-12))
        << "step " << t;
  EXPECT_EQ(fixed.length, 9);
  EXPECT_EQ(fixed.next_slot.item<int64_t>(), 9);
  EXPECT_THROW(model->forward(next.narrow(1, 0, 1), fixed, true), std::invalid_argument);  // full
  EXPECT_THROW(model->forward(next.narrow(1, 0, 2), fixed, true), std::invalid_argument);  // one token a step

  // Stacked rows: each row's positions and padding on the device.
  StackedAndAlone s = stacked_and_alone(model, prompt, {4, 2});
  hybrid::fix_shapes(s.stacked, 4 + next.size(1));
  expect_steps_as_alone(model, s, next);
}

// generate() with SamplingOptions::cuda_graph takes its steps with fixed shapes (on the CPU
// without a graph): the same tokens, greedy and drawn, of plain and of stacked rows.
TEST(Generate, FixedShapeStepsGiveTheSameTokens) {
  auto model = small_model();
  at::manual_seed(9);
  const at::Tensor prompt = at::randint(0, 97, {3, 6}, at::kLong);
  SamplingOptions options;
  options.new_tokens = 7;
  for (const double temperature : {0.0, 1.0}) {
    options.temperature = temperature, options.top_k = temperature > 0 ? 5 : 0, options.seed = 3;
    for (const std::vector<int64_t>& lengths : {std::vector<int64_t>{}, std::vector<int64_t>{2, 6, 4}}) {
      options.cuda_graph = false;
      const at::Tensor plain = hybrid::generate(model, prompt, options, nullptr, lengths);
      options.cuda_graph = true;
      EXPECT_TRUE(at::equal(hybrid::generate(model, prompt, options, nullptr, lengths), plain))
          << "temperature " << temperature << ", " << lengths.size() << " lengths";
    }
  }
}

TEST(Generate, RejectsWhatItCannotContinue) {
  auto model = small_model();
  SamplingOptions options;
  EXPECT_THROW(hybrid::generate(model, at::zeros({2, 0}, at::kLong), options), std::invalid_argument);
  EXPECT_THROW(hybrid::generate(model, at::zeros({4}, at::kLong), options), std::invalid_argument);
  options.temperature = -1;
  EXPECT_THROW(hybrid::generate(model, at::zeros({1, 3}, at::kLong), options), std::invalid_argument);
  options.temperature = 1, options.top_p = 0;
  EXPECT_THROW(hybrid::generate(model, at::zeros({1, 3}, at::kLong), options), std::invalid_argument);
  options.top_p = 1;
  options.temperature = 0, options.new_tokens = 0;
  EXPECT_EQ(hybrid::generate(model, at::zeros({1, 3}, at::kLong), options).sizes(), at::IntArrayRef({1, 0}));
}

}  // namespace
