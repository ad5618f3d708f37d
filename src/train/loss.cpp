// Cross-entropy and z-loss (include/hybrid/train/loss.h). Per prediction row x with
// target y: lse = log sum exp x, ce = lse - x_y, z = lse^2; with p = softmax(x), over N rows
//   d(mean ce)/dx = (p - onehot_y) / N,   d(mean z)/dx = 2 lse p / N.
// Forward keeps only lse (N floats); backward recomputes p. On CUDA one pass over the logits
// each way (kernels/lm_loss.cu); elsewhere, and for float64, ATen a block of rows at a time.
#include "hybrid/train/loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace hybrid {

#ifdef HYBRID_CUDA_KERNELS
std::pair<at::Tensor, at::Tensor> lm_loss_forward_cuda(const at::Tensor& logits, const at::Tensor& tokens);
at::Tensor lm_loss_backward_cuda(const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& lse,
                                 const at::Tensor& d_ce, const at::Tensor& d_z, const at::Tensor& dx);
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Calls f(b, t0, rows) for every block of prediction rows: positions [t0, t0 + rows) of row b,
// never the last position (it predicts nothing).
template <class F>
void for_each_block(int64_t B, int64_t T, int64_t block_rows, F f) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t0 = 0; t0 < T - 1; t0 += block_rows) f(b, t0, std::min(block_rows, T - 1 - t0));
}

// float32 arithmetic for float32 and narrower logits, float64 for float64 (tests).
at::ScalarType compute_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// lse and the target logits, [B, T - 1] each, a block of rows at a time.
std::pair<at::Tensor, at::Tensor> blockwise_forward(const at::Tensor& logits, const at::Tensor& tokens,
                                                    int64_t block_rows) {
  const int64_t B = logits.size(0), T = logits.size(1);
  at::Tensor lse = at::empty({B, T - 1}, logits.options().dtype(compute_type(logits)));
  at::Tensor target_logit = at::empty_like(lse);
  for_each_block(B, T, block_rows, [&](int64_t b, int64_t t0, int64_t rows) {
    at::Tensor x = logits[b].narrow(0, t0, rows).to(lse.scalar_type());
    at::Tensor y = tokens[b].narrow(0, t0 + 1, rows);
    lse[b].narrow(0, t0, rows).copy_(at::logsumexp(x, -1));
    target_logit[b].narrow(0, t0, rows).copy_(x.gather(1, y.unsqueeze(1)).squeeze(1));
  });
  return {lse, target_logit};
}

// Into dlogits (the logits' own memory is allowed: each block is read before it is written).
void blockwise_backward(const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& lse,
                        const at::Tensor& d_ce, const at::Tensor& d_z, int64_t block_rows, at::Tensor& dlogits) {
  const int64_t B = logits.size(0), T = logits.size(1), N = B * (T - 1);
  const at::Tensor zero = at::zeros({}, lse.options());
  const at::Tensor g_ce = (d_ce.defined() ? d_ce : zero) / N, g_z = (d_z.defined() ? d_z : zero) / N;
  dlogits.select(1, T - 1).zero_();
  for_each_block(B, T, block_rows, [&](int64_t b, int64_t t0, int64_t rows) {
    const at::Tensor l = lse[b].narrow(0, t0, rows).unsqueeze(1);
    at::Tensor dx = (logits[b].narrow(0, t0, rows).to(lse.scalar_type()) - l).exp_().mul_(g_ce + 2 * g_z * l);
    dx.scatter_add_(1, tokens[b].narrow(0, t0 + 1, rows).unsqueeze(1), (-g_ce).expand({rows, 1}));
    dlogits[b].narrow(0, t0, rows).copy_(dx);
  });
}

// The kernels take every float dtype but float64, the tests' reference.
bool use_kernels(const at::Tensor& logits) {
#ifdef HYBRID_CUDA_KERNELS
  return logits.is_cuda() && logits.scalar_type() != at::kDouble;
#else
  (void)logits;
  return false;
#endif
}

struct LmLoss : torch::autograd::Function<LmLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& tokens,
                               int64_t block_rows, bool gradient_over_logits) {
    const int64_t N = logits.size(0) * (logits.size(1) - 1);
    at::Tensor lse, target_logit;
#ifdef HYBRID_CUDA_KERNELS
    if (use_kernels(logits)) std::tie(lse, target_logit) = lm_loss_forward_cuda(logits, tokens);
#endif
    if (!lse.defined()) std::tie(lse, target_logit) = blockwise_forward(logits, tokens, block_rows);
    ctx->save_for_backward({logits, tokens, lse});
    ctx->saved_data["block_rows"] = block_rows;
    ctx->saved_data["gradient_over_logits"] = gradient_over_logits;
    return {(lse - target_logit).sum() / N, lse.pow(2).sum() / N};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &tokens = saved[1], &lse = saved[2];
    // Over the logits: a detached alias of their memory (no graph of theirs goes along).
    at::Tensor dx = ctx->saved_data["gradient_over_logits"].toBool() ? logits.detach() : at::empty_like(logits);
#ifdef HYBRID_CUDA_KERNELS
    if (use_kernels(logits)) {
      auto as_float = [](const at::Tensor& g) { return g.defined() ? g.to(at::kFloat).contiguous() : g; };
      return {lm_loss_backward_cuda(logits, tokens, lse, as_float(grads[0]), as_float(grads[1]), dx), at::Tensor(),
              at::Tensor(), at::Tensor()};
    }
#endif
    blockwise_backward(logits, tokens, lse, grads[0], grads[1], ctx->saved_data["block_rows"].toInt(), dx);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::pair<at::Tensor, at::Tensor> lm_loss(const at::Tensor& logits, const at::Tensor& tokens, int64_t block_rows,
                                          bool gradient_over_logits) {
  TORCH_CHECK(logits.dim() == 3 && tokens.dim() == 2 && logits.size(0) == tokens.size(0) && logits.size(1) == tokens.size(1),
              "lm_loss: logits [B, T, V] and tokens [B, T]");
  TORCH_CHECK(logits.size(1) >= 2 && block_rows > 0, "lm_loss: needs T >= 2 and block_rows > 0");
  const bool kernels = use_kernels(logits);
  auto out = LmLoss::apply(kernels ? logits.contiguous() : logits, kernels ? tokens.to(at::kLong).contiguous() : tokens,
                           block_rows, gradient_over_logits);
  return {out[0], out[1]};
}

}  // namespace hybrid
