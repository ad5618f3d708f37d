// Muon's update for a matrix parameter P (m x n) with gradient G (Jordan et al. 2024; scaled to
// AdamW's update RMS as in Liu et al. 2025, "Muon is scalable for LLM training", so that one
// learning rate serves both):
//   B = mu B + G,   U = G + mu B (Nesterov) or B,
//   O = NS(U),      P = P (1 - lr wd) - lr 0.2 sqrt(max(m, n)) O
// NS: X = U / ||U||_F on the short side (X^T where m > n), then `steps` times
//   A = X X^T,  X = a X + (b A + c A A) X,   (a, b, c) = (3.4445, -4.7750, 2.0315)
// which takes every singular value of X into about [0.7, 1.2] (O is about U's orthogonal factor,
// U V^T of its SVD) in a few matrix products, where an SVD would not run on tensor cores.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "hybrid/config/config.h"

namespace hybrid::train {

// Whether Muon takes this parameter (under optimizer.type: muon): the blocks' matrices, not the
// embedding, the LM head, norms, convolutions or the GDN gates' vectors.
bool muon_takes(const std::string& name, const at::Tensor& param);

// NS(u) above, its products in `dtype` (bfloat16 or float32); float32, u's shape. u is one matrix
// or a stack of them [n, m, k], each orthogonalized on its own (one batched product for all).
at::Tensor orthogonalize(const at::Tensor& u, int64_t steps, at::ScalarType dtype);

// The matrices of `params` in batches of one shape, each of at most max_elements elements in all
// (or one matrix), in the order of their first matrix. Why: a model's blocks repeat their shapes,
// and Newton-Schulz's products of many small matrices keep a GPU busy only in one batched product.
std::vector<std::vector<size_t>> muon_batches(const std::vector<at::Tensor>& params, int64_t max_elements);

// One Muon step, in place, of matrices of one shape from their gradients times grad_scale, with
// their momentum buffers.
void muon_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& momenta, double lr, double weight_decay, double grad_scale,
               const MuonConfig& cfg);

}  // namespace hybrid::train
