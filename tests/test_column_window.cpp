// Column-group gradients assembled in place (util/column_window.h, project()): gradients laid
// out as their inputs' windows, sharing one buffer, are taken over as the whole output's gradient
// only when nothing else refers to its memory, and project()'s gradients are the separate
// projections' either way.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include "hybrid/model/layers.h"
#include "hybrid/util/column_window.h"
#include "random_projection.h"

namespace {
using hybrid::util::buffer_of_windows;
using hybrid::util::empty_window_like;

TEST(ColumnWindow, GradientLaidOutAsItsInputIsTakenOverWhole) {
  const at::Tensor y = at::empty({2, 5, 16});
  const at::Tensor x = y.narrow(-1, 4, 6);
  at::Tensor g = empty_window_like(x);
  EXPECT_EQ(g.sizes(), x.sizes());
  EXPECT_EQ(g.strides(), x.strides());
  EXPECT_EQ(g.storage_offset(), 4);
  EXPECT_NE(g.data_ptr(), x.data_ptr());
  const at::Tensor whole = buffer_of_windows({g}, {4}, y.sizes());
  ASSERT_TRUE(whole.defined());
  EXPECT_EQ(whole.sizes(), y.sizes());
  EXPECT_EQ(whole.narrow(-1, 4, 6).data_ptr(), g.data_ptr());
  // The wrong columns, or other sizes: not that buffer.
  EXPECT_FALSE(buffer_of_windows({g}, {5}, y.sizes()).defined());
  EXPECT_FALSE(buffer_of_windows({g}, {4}, {2, 5, 12}).defined());
  EXPECT_FALSE(buffer_of_windows({g}, {4}, {1, 10, 16}).defined());
}

TEST(ColumnWindow, SharedMemoryIsNeverTakenOver) {
  const at::Tensor y = at::empty({3, 16});
  // A window whose other columns belong to a live tensor (y itself): not taken.
  EXPECT_FALSE(buffer_of_windows({y.narrow(-1, 0, 8)}, {0}, y.sizes()).defined());
  at::Tensor g = empty_window_like(y.narrow(-1, 8, 8));
  const at::Tensor alias = g.narrow(0, 0, 1);  // another tensor on g's memory
  EXPECT_FALSE(buffer_of_windows({g}, {8}, y.sizes()).defined());
}

// Windows of other columns of the same rows (GDN: the gate's gradient, then q, k and v's) go to
// one buffer while the first is alive; that buffer is taken over only with every tensor on it
// one of the windows, each in its own columns.
TEST(ColumnWindow, SiblingWindowsShareOneBuffer) {
  const at::Tensor y = at::empty({2, 5, 16});
  at::Tensor gate = empty_window_like(y.narrow(-1, 10, 6));
  at::Tensor qkv = empty_window_like(y.narrow(-1, 0, 8));
  EXPECT_TRUE(qkv.storage().is_alias_of(gate.storage()));
  EXPECT_EQ(qkv.storage_offset(), 0);
  EXPECT_EQ(gate.storage_offset(), 10);
  // The same columns again (a second gradient of one window) or other rows: buffers of their own.
  EXPECT_FALSE(empty_window_like(y.narrow(-1, 4, 4)).storage().is_alias_of(gate.storage()));
  EXPECT_FALSE(empty_window_like(y.narrow(0, 1, 1).narrow(-1, 8, 2)).storage().is_alias_of(gate.storage()));

  const at::Tensor whole = buffer_of_windows({qkv, at::Tensor(), gate}, {0, 8, 10}, y.sizes());
  ASSERT_TRUE(whole.defined());
  EXPECT_EQ(whole.data_ptr(), qkv.data_ptr());
  EXPECT_EQ(whole.narrow(-1, 10, 6).data_ptr(), gate.data_ptr());
  // One of them named at another group's columns, or left out while it lives: not taken.
  EXPECT_FALSE(buffer_of_windows({qkv, gate}, {0, 8}, y.sizes()).defined());
  EXPECT_FALSE(buffer_of_windows({qkv}, {0}, y.sizes()).defined());
}

// A window that comes back through views (GDN's gate gradient: [..., heads, D], reshaped to the
// gate's columns by autograd) is still taken over: the base autograd keeps is the same window. A
// base wider than its window is another tensor on the memory: not taken.
TEST(ColumnWindow, WindowThroughViewsIsTakenOver) {
  const at::Tensor y = at::empty({2, 5, 16});
  at::Tensor qkv = empty_window_like(y.narrow(-1, 0, 8));
  at::Tensor gate = empty_window_like(y.narrow(-1, 8, 6).view({2, 5, 2, 3}).flatten(-2)).view({2, 5, 2, 3});
  at::Tensor gate_columns = gate.reshape({2, 5, 6});
  gate.reset();
  ASSERT_TRUE(gate_columns.is_view());
  EXPECT_TRUE(buffer_of_windows({qkv, gate_columns}, {0, 8}, y.sizes()).defined());

  at::Tensor wide = empty_window_like(at::empty({2, 5, 24}).narrow(-1, 0, 12));
  at::Tensor part = wide.narrow(-1, 0, 8);
  wide.reset();
  EXPECT_FALSE(buffer_of_windows({part}, {0}, {2, 5, 24}).defined());
}

// No buffer is kept alive for later windows: once the first window is gone, the next window of
// the same memory starts a buffer that it alone refers to.
TEST(ColumnWindow, NoBufferIsKeptAlive) {
  const at::Tensor y = at::empty({3, 12});
  at::Tensor first = empty_window_like(y.narrow(-1, 0, 4));
  first.reset();
  at::Tensor second = empty_window_like(y.narrow(-1, 4, 4));
  EXPECT_EQ(second.storage_offset(), 4);
  EXPECT_TRUE(buffer_of_windows({second}, {4}, y.sizes()).defined());
}

TEST(ColumnWindow, ContiguousInputGetsContiguousGradient) {
  const at::Tensor x = at::empty({4, 6});
  EXPECT_TRUE(empty_window_like(x).is_contiguous());
  EXPECT_TRUE(empty_window_like(at::empty({6, 4}).t()).is_contiguous());
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// 2 x, whose backward writes its input gradient as GDN's conv does: laid out as its input.
struct TwiceIntoWindow : torch::autograd::Function<TwiceIntoWindow> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});
    return x * 2;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor dx = empty_window_like(ctx->get_saved_variables()[0]);
    dx.copy_(grads[0] * 2);
    return {dx};
  }
};

// Four float64 projections of x [2, 7, 12] (5, 3, 2 and 4 columns); the losses below leave the
// third unused. expect_same_gradients: a fused loss's gradients of x and all four weights against
// a reference loss's of x and the three used weights (the unused weight's gradient zero).
struct FourProjections {
  std::vector<hybrid::Projection> p = {random_projection(12, 5), random_projection(12, 3),
                                      random_projection(12, 2), random_projection(12, 4)};
  at::Tensor x;
  explicit FourProjections(uint64_t seed) {
    at::manual_seed(seed);
    for (auto& projection : p) projection->to(at::kDouble);
    x = at::randn({2, 7, 12}, at::kDouble).requires_grad_(true);
  }
  void expect_same_gradients(const at::Tensor& fused_loss, const at::Tensor& reference_loss) const {
    auto fused = torch::autograd::grad({fused_loss}, {x, p[0]->weight, p[1]->weight, p[2]->weight, p[3]->weight});
    auto reference = torch::autograd::grad({reference_loss}, {x, p[0]->weight, p[1]->weight, p[3]->weight});
    EXPECT_LT((fused[0] - reference[0]).abs().max().item<double>(), 1e-12);
    EXPECT_LT((fused[1] - reference[1]).abs().max().item<double>(), 1e-12);
    EXPECT_LT((fused[2] - reference[2]).abs().max().item<double>(), 1e-12);
    EXPECT_EQ(fused[3].abs().max().item<double>(), 0.0);
    EXPECT_LT((fused[4] - reference[3]).abs().max().item<double>(), 1e-12);
  }
};

// project()'s gradients when one group's gradient comes laid out as a window, another group is
// unused and a third arrives plainly: those of the separate projections.
TEST(ColumnWindow, ProjectionGradientsFromWindowedAndMissingGroups) {
  FourProjections f(5);
  auto& p = f.p;
  const at::Tensor r = at::randn({2, 7, 8}, at::kDouble);
  auto fused = hybrid::project(f.x, {{p[0], p[1]}, {p[2]}, {p[3]}});
  ASSERT_EQ(fused[0].stride(1), 16);  // 14 columns padded to 16: the windows' rows
  f.expect_same_gradients((TwiceIntoWindow::apply(fused[0]) * r).sum() + fused[2].pow(2).sum(),
                          (2 * at::cat({p[0](f.x), p[1](f.x)}, -1) * r).sum() + p[3](f.x).pow(2).sum());
}

// Two groups' gradients written as windows (GDN's q, k, v and gate), one group unused, one plain
// (a, b): those of the separate projections, the windows' buffer taken over as y's gradient.
TEST(ColumnWindow, ProjectionGradientsFromTwoWindowedGroups) {
  FourProjections f(6);
  auto& p = f.p;
  const at::Tensor r = at::randn({2, 7, 5}, at::kDouble), r2 = at::randn({2, 7, 4}, at::kDouble);
  auto fused = hybrid::project(f.x, {{p[0]}, {p[1]}, {p[2]}, {p[3]}});
  f.expect_same_gradients(
      (TwiceIntoWindow::apply(fused[0]) * r).sum() + (TwiceIntoWindow::apply(fused[3]) * r2).sum() +
          fused[1].pow(2).sum(),
      (2 * p[0](f.x) * r).sum() + (2 * p[3](f.x) * r2).sum() + p[1](f.x).pow(2).sum());
}

}  // namespace
