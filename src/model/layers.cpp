#include "hybrid/model/layers.h"

#include <ATen/ATen.h>

#include "hybrid/ops/gated_rms_norm.h"
#include "hybrid/ops/rms_norm.h"
#include "hybrid/ops/swiglu.h"

namespace hybrid {

ProjectionImpl::ProjectionImpl(int64_t in, int64_t out) { weight = register_parameter("weight", at::empty({out, in})); }

at::Tensor ProjectionImpl::forward(const at::Tensor& x) { return at::linear(x, weight); }

EmbeddingImpl::EmbeddingImpl(int64_t vocab, int64_t dim) { weight = register_parameter("weight", at::empty({vocab, dim})); }

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) { return at::embedding(weight, ids); }

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
  gate_proj = register_module("gate_proj", Projection(d_model, hidden));
  up_proj = register_module("up_proj", Projection(d_model, hidden));
  down_proj = register_module("down_proj", Projection(hidden, d_model));
}

at::Tensor MLPImpl::forward(const at::Tensor& x, const at::Tensor& residual) {
  // One group: the activation's gradient comes back as one tensor, which the projection's
  // backward reads as it is.
  const at::Tensor gate_up = project(x, {{gate_proj, up_proj}})[0];
  return project(ops::swiglu(gate_up), down_proj->weight, residual);
}

}  // namespace hybrid
