// The small building blocks: projections, the token embedding, RMSNorm, the GDN's gated RMSNorm
// and the SwiGLU MLP. Norms compute in float32 and return the input dtype, as OLMo-core and HF do.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <optional>

namespace hybrid {

// y = x weight^T, weight [out, in] without a bias (the model's matmuls read it through project()).
// Projections and the embedding are created uninitialized: their values come from
// initialize_parameters (model/hybrid_lm.h) or a checkpoint, on the device the model is moved to
// first (torch::nn::Linear's Kaiming fill runs on one CPU core: at the 387M values/s measured on
// this project's CPU machine, about 18 s of 7b.yaml's start, for values then overwritten).
class ProjectionImpl : public torch::nn::Module {
 public:
  ProjectionImpl(int64_t in, int64_t out);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
};
TORCH_MODULE(Projection);

// Rows of weight [vocab, dim] by token id.
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t vocab, int64_t dim);
  at::Tensor forward(const at::Tensor& ids);
  at::Tensor weight;
};
TORCH_MODULE(Embedding);

// y = x / sqrt(mean(x^2) + eps) * weight
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

// y = RMSNorm(x) * weight * silu(gate): the per-head output norm of Gated DeltaNet. y in x's
// dtype, or in `output` (x's or the gate's) when given.
class GatedRMSNormImpl : public torch::nn::Module {
 public:
  GatedRMSNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& gate, std::optional<at::ScalarType> output = std::nullopt);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(GatedRMSNorm);

// y = down(silu(gate(x)) * up(x)): gate and up as one projection, SwiGLU as one op on it. With a
// residual, residual + y as project() forms it (a pre-norm block's last add, in the projection).
class MLPImpl : public torch::nn::Module {
 public:
  MLPImpl(int64_t d_model, int64_t hidden);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& residual = {});
  Projection gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(MLP);

// Several projections of one input as one matmul (their weights concatenated along the output
// dim), split back into one view per group of projections: a group's outputs sit side by side
// (GDN's q, k and v, which the conv reads as one tensor). Under autocast the input is cast, and
// kept for the backward, once rather than once a projection, and its gradient is one matmul
// instead of a float32 sum of one low-precision product a projection; the weights' gradients
// come out of one matmul in float32, unrounded (src/model/project.cpp). The output width is
// padded with zero rows of weight to a multiple of 8 columns: cuBLAS picks its fast kernels only
// for 16-byte aligned rows (GDN's 17,340 columns at 7b.yaml fell back to kernels 2.4x slower).
// The groups' output gradients are assembled into one without a concatenation where a consumer
// writes its input's gradient as the same column window of a full-width buffer
// (util/column_window.h; the conv does), and a single unpadded group is not split at all. The
// weights' bf16 casts are kept between forwards while the weights are unchanged
// (model/weight_casts.h). The parameters stay separate (their names and shapes are HF's).
using ProjectionGroup = std::vector<Projection>;
std::vector<at::Tensor> project(const at::Tensor& x, const std::vector<ProjectionGroup>& groups);
// One projection x weight^T the same way (the output projections, the LM head): under autocast
// its weight gradient too is a float32 sum, unrounded, with no cast pass. With a residual,
// residual + x weight^T in the residual's dtype: for a float32 residual and a bf16 product on
// CUDA, one cuBLAS call adds the product's float32 sums to it, unrounded (a block's last add
// without a pass of its own; a bf16 product then added rounds them first).
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual = {});
// The dtype project() multiplies x in: autocast's for x's device where it is on, else x's. An
// input written in it already (a pre-norm block's norms) is read as it is, with no cast pass;
// its gradient then comes back in that dtype, where a float32 x gets a float32 one.
at::ScalarType projection_dtype(const at::Tensor& x);

}  // namespace hybrid
