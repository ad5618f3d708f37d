// The parts of the chunked delta rule that every chunk computes on its own (no state), for all
// chunks at once. Per chunk (C = 64 rows), with gc the chunk-local cumulative log-gate:
//   gamma = exp(gc), eta = exp(gc_C - gc), last = gamma_C, Gamma_ij = exp(gc_i - gc_j) (j <= i)
//   KKG = K K^T * Gamma,  Lg = StrictTril(diag(beta) KKG),  Ag = (I + Lg)^-1,
//   T = Ag diag(beta),    QKG = Q K^T * Gamma
// and, in the backward, given dT and dP = dO V'^T (s the scale):
//   dQK = s dP * Gamma,  dbeta = colsum(dT * Ag) + rowsum(dLg * KKG),
//   dLg = -StrictTril(Ag^T Tril(dT diag(beta)) Ag^T),  dKK = dLg * diag(beta) Gamma (+ its transpose),
//   dgc = rowsum(Z) - colsum(Z) with Z = s dP * QKG + dLg * Lg   (Gamma_ij moves with gc_i - gc_j).
// Tensors are in the chunk layout: [H, NC, C, D], [H, NC, C, C], gates [H, NC, C].
#pragma once

#include <ATen/ATen.h>

namespace hybrid::ops::detail {

struct ChunkTerms {
  at::Tensor gc, gamma, eta;  // [H, NC, C]
  at::Tensor last;            // [H, NC]
  at::Tensor T, QKG;          // [H, NC, C, C]
  at::Tensor Ag, KKG;         // [H, NC, C, C], only for the backward
};

// for_backward: also Ag and KKG.
ChunkTerms chunk_terms(const at::Tensor& q, const at::Tensor& k, const at::Tensor& g, const at::Tensor& beta,
                       bool for_backward);

struct WyGrads {
  at::Tensor dQK;    // [H, NC, C, C]: dq += dQK K, dk += dQK^T Q
  at::Tensor dKK;    // [H, NC, C, C], symmetric: dk += dKK K
  at::Tensor dbeta;  // [H, NC, C]
  at::Tensor dgc;    // [H, NC, C]: these terms' share of the gradient of gc
};

WyGrads wy_backward(const ChunkTerms& c, const at::Tensor& dT, const at::Tensor& dP, const at::Tensor& beta,
                    double scale);

#ifdef HYBRID_CUDA_KERNELS
// float32 CUDA tensors, K a multiple of 16 up to 256.
ChunkTerms chunk_terms_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& g, const at::Tensor& beta,
                            bool for_backward);
WyGrads wy_backward_cuda(const ChunkTerms& c, const at::Tensor& dT, const at::Tensor& dP, const at::Tensor& beta,
                         double scale);
#endif

}  // namespace hybrid::ops::detail
