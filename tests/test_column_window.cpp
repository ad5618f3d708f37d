// Column-group gradients assembled in place (util/column_window.h, project()): a gradient laid
// out as its input's window is taken over as the whole output's gradient only when nothing else
// refers to its memory, and project()'s gradients are the separate projections' either way.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include "hybrid/model/layers.h"
#include "hybrid/util/column_window.h"

namespace {
using hybrid::util::buffer_of_window;
using hybrid::util::empty_window_like;

TEST(ColumnWindow, GradientLaidOutAsItsInputIsTakenOverWhole) {
  const at::Tensor y = at::empty({2, 5, 16});
  const at::Tensor x = y.narrow(-1, 4, 6);
  at::Tensor g = empty_window_like(x);
  EXPECT_EQ(g.sizes(), x.sizes());
  EXPECT_EQ(g.strides(), x.strides());
  EXPECT_EQ(g.storage_offset(), 4);
  EXPECT_NE(g.data_ptr(), x.data_ptr());
  const at::Tensor whole = buffer_of_window(g, 4, y.sizes());
  ASSERT_TRUE(whole.defined());
  EXPECT_EQ(whole.sizes(), y.sizes());
  EXPECT_EQ(whole.narrow(-1, 4, 6).data_ptr(), g.data_ptr());
  // The wrong columns, or other sizes: not that buffer.
  EXPECT_FALSE(buffer_of_window(g, 5, y.sizes()).defined());
  EXPECT_FALSE(buffer_of_window(g, 4, {2, 5, 12}).defined());
  EXPECT_FALSE(buffer_of_window(g, 4, {1, 10, 16}).defined());
}

TEST(ColumnWindow, SharedMemoryIsNeverTakenOver) {
  const at::Tensor y = at::empty({3, 16});
  // A window whose other columns belong to a live tensor (y itself): not taken.
  EXPECT_FALSE(buffer_of_window(y.narrow(-1, 0, 8), 0, y.sizes()).defined());
  at::Tensor g = empty_window_like(y.narrow(-1, 8, 8));
  const at::Tensor alias = g.narrow(0, 0, 1);  // another tensor on g's memory
  EXPECT_FALSE(buffer_of_window(g, 8, y.sizes()).defined());
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

// project()'s gradients when one group's gradient comes laid out as a window, another group is
// unused and a third arrives plainly: those of the separate projections.
TEST(ColumnWindow, ProjectionGradientsFromWindowedAndMissingGroups) {
  at::manual_seed(5);
  std::vector<torch::nn::Linear> projections = {hybrid::linear_no_bias(12, 5), hybrid::linear_no_bias(12, 3),
                                                hybrid::linear_no_bias(12, 2), hybrid::linear_no_bias(12, 4)};
  for (auto& p : projections) p->to(at::kDouble);
  at::Tensor x = at::randn({2, 7, 12}, at::kDouble).requires_grad_(true);
  const at::Tensor r = at::randn({2, 7, 8}, at::kDouble);
  std::vector<at::Tensor> inputs = {x};
  for (auto& p : projections) inputs.push_back(p->weight);

  auto fused = hybrid::project(x, {{projections[0], projections[1]}, {projections[2]}, {projections[3]}});
  ASSERT_EQ(fused[0].stride(1), 16);  // 14 columns padded to 16: the windows' rows
  at::Tensor loss = (TwiceIntoWindow::apply(fused[0]) * r).sum() + fused[2].pow(2).sum();
  auto g_fused = torch::autograd::grad({loss}, inputs);

  at::Tensor first = at::cat({projections[0](x), projections[1](x)}, -1);
  at::Tensor reference = (2 * first * r).sum() + projections[3](x).pow(2).sum();
  std::vector<at::Tensor> used = {x, projections[0]->weight, projections[1]->weight, projections[3]->weight};
  auto g_ref = torch::autograd::grad({reference}, used);
  EXPECT_LT((g_fused[0] - g_ref[0]).abs().max().item<double>(), 1e-12);
  EXPECT_LT((g_fused[1] - g_ref[1]).abs().max().item<double>(), 1e-12);
  EXPECT_LT((g_fused[2] - g_ref[2]).abs().max().item<double>(), 1e-12);
  EXPECT_EQ(g_fused[3].abs().max().item<double>(), 0.0);  // the unused group's weight
  EXPECT_LT((g_fused[4] - g_ref[3]).abs().max().item<double>(), 1e-12);
}

}  // namespace
