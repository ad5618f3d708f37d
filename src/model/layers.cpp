#include "hybrid/model/layers.h"

#include <ATen/ATen.h>

#include "hybrid/ops/gated_rms_norm.h"
#include "hybrid/ops/rms_norm.h"
#include "hybrid/ops/swiglu.h"

namespace hybrid {

torch::nn::Linear linear_no_bias(int64_t in, int64_t out) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false));
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", at::ones({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) { return ops::rms_norm(x, weight, eps); }

GatedRMSNormImpl::GatedRMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", at::ones({dim}));
}

at::Tensor GatedRMSNormImpl::forward(const at::Tensor& x, const at::Tensor& gate,
                                     std::optional<at::ScalarType> output) {
  return ops::gated_rms_norm(x, gate, weight, eps, output);
}

MLPImpl::MLPImpl(int64_t d_model, int64_t hidden) {
  gate_proj = register_module("gate_proj", linear_no_bias(d_model, hidden));
  up_proj = register_module("up_proj", linear_no_bias(d_model, hidden));
  down_proj = register_module("down_proj", linear_no_bias(hidden, d_model));
}

at::Tensor MLPImpl::forward(const at::Tensor& x) {
  // One group: the activation's gradient comes back as one tensor, which the projection's
  // backward reads as it is.
  const at::Tensor gate_up = project(x, {{gate_proj, up_proj}})[0];
  return project(ops::swiglu(gate_up), down_proj->weight);
}

std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, int64_t head_dim, double theta) {
  auto f32 = positions.options().dtype(at::kFloat);
  // float32 throughout, as HF computes inv_freq, so both rotate positions alike.
  at::Tensor exponents = at::arange(0, head_dim, 2, positions.options().dtype(at::kLong)).to(at::kFloat) / head_dim;
  at::Tensor inv_freq = 1.0 / at::pow(theta, exponents);
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq.to(f32);
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {emb.cos(), emb.sin()};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);  // broadcast over heads
  return (x * c + rotated * s).to(x.scalar_type());
}

}  // namespace hybrid
