#include "hybrid/train/muon.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace hybrid::train {

bool muon_takes(const std::string& name, const at::Tensor& param) {
  return param.dim() == 2 && name.rfind("model.layers.", 0) == 0;
}

at::Tensor orthogonalize(const at::Tensor& u, int64_t steps, at::ScalarType dtype) {
  constexpr double a = 3.4445, b = -4.7750, c = 2.0315;
  const bool tall = u.size(0) > u.size(1);
  at::Tensor x = u.to(at::kFloat);
  if (tall) x = x.t();
  x = (x / (x.norm() + 1e-7)).to(dtype);  // the norm in float32 either way
  for (int64_t i = 0; i < steps; ++i) {
    const at::Tensor A = at::mm(x, x.t());
    const at::Tensor B = at::addmm(A, A, A, /*beta=*/b, /*alpha=*/c);  // b A + c A A
    x = at::addmm(x, B, x, /*beta=*/a);                                // a X + B X
  }
  x = x.to(at::kFloat);
  return tall ? x.t().contiguous() : x;
}

void muon_step(at::Tensor& param, const at::Tensor& grad, at::Tensor& momentum, double lr, double weight_decay,
               double grad_scale, const MuonConfig& cfg) {
  const at::Tensor g = grad_scale == 1.0 ? grad : grad * grad_scale;
  momentum.mul_(cfg.momentum).add_(g);
  const at::Tensor update = cfg.nesterov ? g.add(momentum, cfg.momentum) : momentum;
  const at::Tensor o = orthogonalize(update, cfg.ns_steps, cfg.ns_dtype == "float32" ? at::kFloat : at::kBFloat16);
  const double scale = 0.2 * std::sqrt(static_cast<double>(std::max(param.size(0), param.size(1))));
  if (weight_decay != 0) param.mul_(1 - lr * weight_decay);
  param.add_(o, -lr * scale);
}

}  // namespace hybrid::train
