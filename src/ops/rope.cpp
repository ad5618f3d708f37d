#include "hybrid/ops/rope.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <map>
#include <mutex>
#include <tuple>

#include "argument_check.h"

namespace hybrid::ops {

#ifdef HYBRID_CUDA_KERNELS
// x [B, T, H, D] (last dim contiguous) into y contiguous, rotated by sign times the angles.
void rope_cuda(const at::Tensor& x, at::Tensor& y, const at::Tensor& positions, const at::Tensor& inv_freq, int sign);
#endif

namespace {

// f_i = theta^(-2 i / D), float32, as HF's rotary embedding computes it, on `device`. Formed once
// for each (D, theta, device) and kept: five small launches a layer and call otherwise, a sixth of
// a decoding step's attention launches. The first call for a key comes before any CUDA graph
// capture of a forward (generation captures its second step), so no entry is formed in a capture.
// Never destroyed (CUDA tensors must not be freed by static destructors); forwards run on the main
// thread and on autograd's (recomputed checkpointed blocks), hence the lock.
at::Tensor inverse_frequencies(int64_t D, double theta, const c10::Device& device) {
  static std::mutex* mutex = new std::mutex;
  static auto* kept = new std::map<std::tuple<int64_t, double, c10::DeviceType, c10::DeviceIndex>, at::Tensor>;
  const std::lock_guard<std::mutex> lock(*mutex);
  at::Tensor& f = (*kept)[{D, theta, device.type(), device.index()}];
  if (!f.defined()) {
    const at::Tensor exponents = at::arange(0, D, 2, at::TensorOptions().device(device).dtype(at::kLong)).to(at::kFloat) / D;
    f = 1.0 / at::pow(theta, exponents);
  }
  return f;
}

// Left to autograd: the CPU path, and the float64 reference of the kernels.
at::Tensor rope_aten(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq) {
  const int64_t h = x.size(-1) / 2;
  const at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;  // [B, T, h]
  const at::Tensor angles = at::cat({freqs, freqs}, -1).unsqueeze(2);           // [B, T, 1, D]
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor c = angles.to(acc).cos(), s = angles.to(acc).sin(), xa = x.to(acc);
  const at::Tensor rotated = at::cat({-xa.narrow(-1, h, h), xa.narrow(-1, 0, h)}, -1);
  return (xa * c + rotated * s).to(x.scalar_type());
}

#ifdef HYBRID_CUDA_KERNELS
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Keeps only the positions and frequencies: the backward rotates the gradients back.
struct RopeFunction : torch::autograd::Function<RopeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& positions, const at::Tensor& inv_freq) {
    ctx->save_for_backward({positions, inv_freq});
    return {rotate(q, positions, inv_freq, 1), rotate(k, positions, inv_freq, 1)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto back = [&](const at::Tensor& dy, bool needed) {
      return needed && dy.defined() ? rotate(dy, saved[0], saved[1], -1) : at::Tensor();
    };
    return {back(grads[0], ctx->needs_input_grad(0)), back(grads[1], ctx->needs_input_grad(1)), at::Tensor(),
            at::Tensor()};
  }
  // x [B, T, H, D]; a contiguous result.
  static at::Tensor rotate(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq, int sign) {
    const at::Tensor in = x.stride(-1) == 1 ? x : x.contiguous();
    at::Tensor y = at::empty(x.sizes(), x.options());
    rope_cuda(in, y, positions, inv_freq, sign);
    return y;
  }
};
#endif

}  // namespace

std::pair<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                       double theta) {
  const detail::ArgumentCheck check{"rope"};
  check(q.dim() == 4 && k.dim() == 4 && q.size(-1) == k.size(-1) && q.size(-1) % 2 == 0,
        "q and k must be [B, T, H, D] with one even D");
  check(q.size(0) == k.size(0) && q.size(1) == k.size(1) && positions.sizes() == q.sizes().slice(0, 2),
        "q, k and positions [B, T] must agree on B and T");
  check(positions.device() == q.device() && k.device() == q.device(), "q, k and positions must be on one device");
  const at::Tensor inv_freq = inverse_frequencies(q.size(-1), theta, q.device());
#ifdef HYBRID_CUDA_KERNELS
  if (q.is_cuda() && q.scalar_type() != at::kDouble && k.scalar_type() != at::kDouble && q.numel() > 0 &&
      k.numel() > 0) {
    auto out = RopeFunction::apply(q, k, positions.to(at::kLong), inv_freq);
    return {out[0], out[1]};
  }
#endif
  return {rope_aten(q, positions, inv_freq), rope_aten(k, positions, inv_freq)};
}

}  // namespace hybrid::ops
