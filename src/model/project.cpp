// project() (layers.h): projections of one input as one matmul, and single projections (output
// projections, the LM head) the same way. Written as an autograd function rather than
// at::linear over at::cat of autocast's cached weight copies, because that path makes extra
// passes over the weights a step and rounds their gradients: the cat copies the bf16 weights
// once more, and autocast's cast backward turns each weight's bf16 gradient into float32 in a
// pass of its own (six such copies a GDN layer's step, about 0.2 ms at 7b.yaml's width). Here the
// weights are cast straight into their place in one compute-dtype matrix (kept between forwards
// while they are unchanged: weight_casts.h), and the weight
// gradient comes out of one matmul in the weights' own dtype (float32 accumulation written as
// float32 on CUDA, so it is never rounded to bf16); each weight gets its rows of it. A float32
// input (the residual stream) gets its gradient the same way.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <numeric>

#include "hybrid/model/layers.h"
#include "hybrid/model/weight_casts.h"
#include "hybrid/ops/matmul_onto.h"
#include "hybrid/util/column_window.h"

namespace hybrid {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether cuBLAS takes a product of `a`'s bf16 or half values with its float32 sums written as
// they are into a `result` tensor (float32 on CUDA): never rounded to bf16, no cast pass.
bool float32_sums(const at::Tensor& a, at::ScalarType result) {
  const bool low = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  return a.is_cuda() && low && result == at::kFloat;
}

// residual + xc w^T in the residual's dtype: on CUDA, for a float32 residual and a bf16 or half
// product, one cuBLAS call adding its float32 sums to the residual unrounded (no product written
// in bf16, no pass for the add; matmul_onto's cuBLASLt call reads the residual where it is, where
// addmm would copy it into its result first); elsewhere the product, then the add.
at::Tensor linear_onto(const at::Tensor& residual, const at::Tensor& xc, const at::Tensor& w) {
  if (float32_sums(xc, residual.scalar_type())) {
    const at::Tensor r = residual.reshape({-1, w.size(0)}), x = xc.reshape({-1, xc.size(-1)});
    at::Tensor sum = ops::matmul_onto(r, x, w);
    if (!sum.defined()) sum = at::addmm(r, x, w.t(), at::kFloat);
    return sum.view(residual.sizes());
  }
  return residual + at::linear(xc, w);
}

struct StackedLinear : torch::autograd::Function<StackedLinear> {
  // y = x W^T in `compute` for W the weights stacked (and padded), returned as one view a group
  // of `widths` columns (y itself for a single group without padding); x's leading dims are kept.
  // With a residual, `onto` its one tensor (one group, no padding): residual + x W^T in the
  // residual's dtype instead. (A list: autograd functions take no undefined tensor argument.)
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::ScalarType compute, int64_t padding, std::vector<int64_t> widths,
                               at::TensorList onto) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const at::Tensor xc = x.to(compute), w = weights_in_compute_dtype(weights, compute, padding);
    ctx->save_for_backward({xc, w});
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["w_dtype"] = weights[0].scalar_type();
    std::vector<int64_t> rows;
    for (const at::Tensor& wi : weights) rows.push_back(wi.size(0));
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["widths"] = widths;
    ctx->saved_data["residual"] = !onto.empty();
    ctx->set_materialize_grads(false);  // an unused group's gradient is zero-filled in place below
    const at::Tensor y = onto.empty() ? at::linear(xc, w) : linear_onto(onto[0], xc, w);
    if (widths.size() == 1 && padding == 0) return {y};
    variable_list groups;
    int64_t column = 0;
    for (int64_t width : widths) {
      groups.push_back(y.narrow(-1, column, width));
      column += width;
    }
    return groups;
  }

  // y's gradient from its groups': where groups' gradients are windows of a buffer of y's shape
  // that nothing else refers to (util::empty_window_like: GDN's conv and gated norm write their
  // input gradients that way, into one buffer), that buffer, with the other groups copied in; a
  // new buffer otherwise. Autograd's split would concatenate them all, a pass over the whole
  // gradient (a quarter of a millisecond a step for GDN's 17,344 columns at 7b.yaml's width).
  static at::Tensor output_gradient(const variable_list& grads, const std::vector<int64_t>& widths,
                                    at::IntArrayRef y_sizes, const at::TensorOptions& options) {
    if (widths.size() == 1 && static_cast<int64_t>(widths[0]) == y_sizes.back())
      return grads[0].defined() ? grads[0] : at::zeros(y_sizes, options);
    std::vector<int64_t> columns(widths.size(), 0);
    for (size_t i = 1; i < widths.size(); ++i) columns[i] = columns[i - 1] + widths[i - 1];
    at::Tensor dy = util::buffer_of_windows(grads, columns, y_sizes);
    if (!dy.defined()) dy = at::empty(y_sizes, options);
    int64_t column = 0;
    for (size_t i = 0; i < widths.size(); column += widths[i++]) {
      at::Tensor slice = dy.narrow(-1, column, widths[i]);
      if (!grads[i].defined()) slice.zero_();
      else if (grads[i].data_ptr() != slice.data_ptr()) slice.copy_(grads[i]);
    }
    if (column < y_sizes.back()) dy.narrow(-1, column, y_sizes.back() - column).zero_();  // the padding
    return dy;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &xc = saved[0], &w = saved[1];
    const auto rows = ctx->saved_data["rows"].toIntVector();
    std::vector<int64_t> y_sizes = xc.sizes().vec();
    y_sizes.back() = w.size(0);
    const bool residual = ctx->saved_data["residual"].toBool();
    if (residual && !grads[0].defined()) return variable_list(rows.size() + 5);
    // With a residual, y's gradient is the residual's as it is, and in the compute dtype the
    // products' (the cast autograd would make for a low-precision product's own output).
    const at::Tensor dy_out = residual ? grads[0] : output_gradient(grads, ctx->saved_data["widths"].toIntVector(),
                                                                    y_sizes, xc.options());
    const at::Tensor dy = dy_out.to(xc.scalar_type()).reshape({-1, w.size(0)});
    const at::Tensor x2 = xc.reshape({-1, xc.size(-1)});
    // A low-precision product for a float32 result: on CUDA its float32 sums as they are;
    // elsewhere computed, then cast.
    auto product = [&](const at::Tensor& a, const at::Tensor& b, at::ScalarType result) {
      if (float32_sums(a, result)) return at::mm(a, b, at::kFloat);
      return at::mm(a, b).to(result);
    };
    variable_list out;
    out.push_back(ctx->needs_input_grad(0)
                      ? product(dy, w, ctx->saved_data["x_dtype"].toScalarType()).view(xc.sizes())
                      : at::Tensor());
    // One matmul for every weight's gradient.
    const at::Tensor dw = product(dy.t(), x2, ctx->saved_data["w_dtype"].toScalarType());
    int64_t row = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      out.push_back(ctx->needs_input_grad(1 + i) ? dw.narrow(0, row, rows[i]) : at::Tensor());
      row += rows[i];
    }
    out.push_back(at::Tensor());  // compute
    out.push_back(at::Tensor());  // padding
    out.push_back(at::Tensor());  // widths
    if (residual) out.push_back(dy_out);
    return out;
  }
};

// x W^T for W the weights stacked, as one tensor a group of `widths` output columns; with a
// residual (one group, no padding), residual + x W^T.
std::vector<at::Tensor> stacked_linear(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                       const std::vector<int64_t>& widths, const at::Tensor& residual = {}) {
  const at::ScalarType compute = projection_dtype(x);
  const int64_t total = std::accumulate(widths.begin(), widths.end(), int64_t{0});
  const int64_t padding = (8 - total % 8) % 8;
  auto apply = [&](at::TensorList onto) {
    return StackedLinear::apply(x, at::TensorList(weights), compute, padding, widths, onto);
  };
  if (!residual.defined()) return apply({});
  if (padding > 0) return {residual + apply({})[0]};
  return apply(residual);
}

}  // namespace

std::vector<at::Tensor> project(const at::Tensor& x, const std::vector<ProjectionGroup>& groups) {
  std::vector<at::Tensor> weights;
  std::vector<int64_t> widths;
  for (const auto& group : groups) {
    int64_t width = 0;
    for (const auto& p : group) {
      weights.push_back(p->weight);
      width += p->weight.size(0);
    }
    widths.push_back(width);
  }
  return stacked_linear(x, weights, widths);
}

at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual) {
  return stacked_linear(x, {weight}, {weight.size(0)}, residual)[0];
}

at::ScalarType projection_dtype(const at::Tensor& x) {
  const c10::DeviceType device = x.device().type();
  return at::autocast::is_autocast_enabled(device) ? at::autocast::get_autocast_dtype(device) : x.scalar_type();
}

}  // namespace hybrid
