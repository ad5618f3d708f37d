#include "hybrid/train/muon.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>

namespace hybrid::train {

bool muon_takes(const std::string& name, const at::Tensor& param) {
  return param.dim() == 2 && name.rfind("model.layers.", 0) == 0;
}

at::Tensor orthogonalize(const at::Tensor& u, int64_t steps, at::ScalarType dtype) {
  constexpr double a = 3.4445, b = -4.7750, c = 2.0315;
  const bool tall = u.size(-2) > u.size(-1);
  at::Tensor x = u.dim() == 2 ? u.unsqueeze(0).to(at::kFloat) : u.to(at::kFloat);
  if (tall) x = x.transpose(1, 2);
  // Each matrix by its own norm, in float32 either way.
  x = (x / (at::linalg_vector_norm(x, 2, at::IntArrayRef{1, 2}, /*keepdim=*/true) + 1e-7)).to(dtype);
  for (int64_t i = 0; i < steps; ++i) {
    const at::Tensor A = at::bmm(x, x.transpose(1, 2));
    const at::Tensor B = at::baddbmm(A, A, A, /*beta=*/b, /*alpha=*/c);  // b A + c A A
    x = at::baddbmm(x, B, x, /*beta=*/a);                                // a X + B X
  }
  x = x.to(at::kFloat);
  if (tall) x = x.transpose(1, 2).contiguous();
  return u.dim() == 2 ? x.squeeze(0) : x;
}

std::vector<std::vector<size_t>> muon_batches(const std::vector<at::Tensor>& params, int64_t max_elements) {
  std::vector<std::vector<size_t>> batches;
  std::map<std::vector<int64_t>, size_t> open;  // a shape's batch still taking matrices
  for (size_t i = 0; i < params.size(); ++i) {
    auto [it, first] = open.try_emplace(params[i].sizes().vec(), batches.size());
    if (first || static_cast<int64_t>(batches[it->second].size() + 1) * params[i].numel() > max_elements) {
      it->second = batches.size();
      batches.emplace_back();
    }
    batches[it->second].push_back(i);
  }
  return batches;
}

void muon_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& momenta, double lr, double weight_decay, double grad_scale,
               const MuonConfig& cfg) {
  const std::vector<at::Tensor> g = grad_scale == 1.0 ? grads : at::_foreach_mul(grads, grad_scale);
  at::_foreach_mul_(momenta, cfg.momentum);
  at::_foreach_add_(momenta, g);
  const std::vector<at::Tensor> update = cfg.nesterov ? at::_foreach_add(g, momenta, cfg.momentum) : momenta;
  const at::Tensor o = orthogonalize(at::stack(update), cfg.ns_steps, cfg.ns_dtype == "float32" ? at::kFloat : at::kBFloat16);
  const at::Tensor& p = params.front();
  const double scale = 0.2 * std::sqrt(static_cast<double>(std::max(p.size(0), p.size(1))));
  if (weight_decay != 0) at::_foreach_mul_(params, 1 - lr * weight_decay);
  at::_foreach_add_(params, o.unbind(0), -lr * scale);
}

}  // namespace hybrid::train
