// project()'s cache of bf16 weight casts (model/weight_casts.h): a cast is reused while the
// weights are the same, and never once they change in place, are replaced, or are forgotten.
// On the CPU under CPU autocast, which casts the same way CUDA autocast does.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>

#include "hybrid/model/layers.h"
#include "hybrid/model/weight_casts.h"
#include "random_projection.h"

namespace {

struct CpuAutocast {
  CpuAutocast() {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  }
  ~CpuAutocast() { at::autocast::set_autocast_enabled(at::kCPU, false); }
};

// What project() must give: the bf16 product of the bf16 casts of x and the weight as it is now.
at::Tensor expected(const at::Tensor& x, const at::Tensor& w) {
  return at::linear(x.to(at::kBFloat16), w.detach().to(at::kBFloat16));
}

TEST(WeightCasts, ReusedOnlyWhileTheWeightsAreUnchanged) {
  hybrid::set_weight_cast_cache(true);
  hybrid::forget_weight_casts();
  at::manual_seed(7);
  auto p = random_projection(12, 8);
  const at::Tensor x = at::randn({3, 12});
  CpuAutocast autocast;
  auto project = [&] { return hybrid::project(x, p->weight); };

  EXPECT_TRUE(at::equal(project(), expected(x, p->weight)));
  EXPECT_EQ(hybrid::weight_casts_cached(), 1u);
  EXPECT_TRUE(at::equal(project(), expected(x, p->weight)));
  EXPECT_EQ(hybrid::weight_casts_cached(), 1u);
  {
    at::NoGradGuard no_grad;
    p->weight.add_(1);  // in place, as the optimizer updates
  }
  EXPECT_TRUE(at::equal(project(), expected(x, p->weight)));
  EXPECT_EQ(hybrid::weight_casts_cached(), 1u);  // replaced, not added
  p->weight.set_data(at::randn({8, 12}));        // new memory under the same parameter
  EXPECT_TRUE(at::equal(project(), expected(x, p->weight)));

  // Groups: one entry for a stacked pair, recast when either weight changes.
  auto q = random_projection(12, 4);
  auto both = [&] { return hybrid::project(x, {{p, q}})[0]; };
  const at::Tensor first = both();
  EXPECT_TRUE(at::equal(first, at::cat({expected(x, p->weight), expected(x, q->weight)}, -1)));
  {
    at::NoGradGuard no_grad;
    q->weight.mul_(2);
  }
  EXPECT_TRUE(at::equal(both(), at::cat({expected(x, p->weight), expected(x, q->weight)}, -1)));

  hybrid::forget_weight_casts();
  EXPECT_EQ(hybrid::weight_casts_cached(), 0u);
  hybrid::set_weight_cast_cache(false);
  EXPECT_TRUE(at::equal(project(), expected(x, p->weight)));
  EXPECT_EQ(hybrid::weight_casts_cached(), 0u);
  hybrid::set_weight_cast_cache(true);
}

// The entries of weights that are gone are dropped when the next cast is made.
TEST(WeightCasts, EntriesOfDestroyedWeightsAreDropped) {
  hybrid::set_weight_cast_cache(true);
  hybrid::forget_weight_casts();
  const at::Tensor x = at::randn({2, 6});
  CpuAutocast autocast;
  {
    auto gone = random_projection(6, 3);
    hybrid::project(x, gone->weight);
    EXPECT_EQ(hybrid::weight_casts_cached(), 1u);
  }
  auto kept = random_projection(6, 5);
  hybrid::project(x, kept->weight);
  EXPECT_EQ(hybrid::weight_casts_cached(), 1u);
  hybrid::forget_weight_casts();
}

}  // namespace
