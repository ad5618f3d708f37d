// The spike guard (trainer.spike_skip): which steps it skips, and that a lasting jump is taken in.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "hybrid/train/metrics.h"

namespace {

// `n` steady steps: loss 3.0 and 3.02, grad norm 0.5 and 0.52, alternating.
void steady(hybrid::train::SpikeDetector& d, int n) {
  for (int i = 0; i < n; ++i) ASSERT_EQ(d.check(3.0 + 0.02 * (i % 2), 0.5 + 0.02 * (i % 2)), "") << "step " << i;
}

}  // namespace

// Nothing is judged until max(20, window / 2) steps are known; then a loss or a grad norm far
// above the window's mean is a spike, named by which it is.
TEST(SpikeSkip, JudgesOnceHalfTheWindowIsKnown) {
  hybrid::train::SpikeDetector d(/*window=*/128, /*sigmas=*/6.0);
  steady(d, 63);
  EXPECT_EQ(d.check(30.0, 0.5), "") << "63 known steps of a window of 128";
  hybrid::train::SpikeDetector e(128, 6.0);
  steady(e, 64);
  EXPECT_EQ(e.check(3.2, 0.5), "loss spike, 3.2 against 3.01 +- 0.01 over the last 64 steps");
  EXPECT_EQ(e.check(3.0, 5.0), "grad-norm spike, 5 against 0.5098 +- 0.01 over the last 65 steps");
  EXPECT_EQ(e.check(2.0, 0.1), "") << "far below the mean is no spike";
  hybrid::train::SpikeDetector small(/*window=*/20, 6.0), smaller(20, 6.0);
  steady(small, 19);
  EXPECT_EQ(small.check(30.0, 0.5), "") << "at least 20 known steps whatever the window";
  steady(smaller, 20);
  EXPECT_EQ(smaller.check(30.0, 0.5).rfind("loss spike, 30 against 3.01", 0), 0u);
}

// A lasting jump in the grad norm (the weights moved) is skipped only until the window takes it in,
// then every step is taken: the values of skipped steps count.
TEST(SpikeSkip, ALastingJumpIsTakenIn) {
  hybrid::train::SpikeDetector d(128, 6.0);
  steady(d, 100);
  std::vector<std::string> reasons;
  for (int i = 0; i < 10; ++i) reasons.push_back(d.check(3.0, 10.0).substr(0, 15));
  const std::vector<std::string> expected = {"grad-norm spike", "grad-norm spike", "grad-norm spike", "", "", "", "", "", "", ""};
  EXPECT_EQ(reasons, expected);
  EXPECT_EQ(d.grad_norms().size(), 110u);
  EXPECT_EQ(d.grad_norms().back(), 10.0);
}

// The window keeps the last `window` steps (what a checkpoint saves and a resume restores).
TEST(SpikeSkip, KeepsTheLastWindowOfSteps) {
  hybrid::train::SpikeDetector d(/*window=*/32, 6.0);
  steady(d, 40);
  ASSERT_EQ(d.losses().size(), 32u);
  EXPECT_EQ(d.losses().front(), 3.0) << "steps 8 to 39";
  hybrid::train::SpikeDetector restored(32, 6.0);
  restored.restore(d.losses(), d.grad_norms());
  EXPECT_EQ(restored.check(3.0, 4.0), d.check(3.0, 4.0));
  EXPECT_EQ(restored.grad_norms(), d.grad_norms());
  hybrid::train::SpikeDetector narrower(/*window=*/20, 6.0);  // resumed with a smaller window
  narrower.restore(d.losses(), d.grad_norms());
  EXPECT_EQ(narrower.losses().size(), 20u);
  EXPECT_EQ(narrower.grad_norms().back(), d.grad_norms().back());
}
