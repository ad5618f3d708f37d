// The chunk-local terms of the chunked delta rule from ATen ops (CPU, float64, head dims the
// kernels do not take, or no CUDA kernels); see delta_chunk_terms.h.
#include "delta_chunk_terms.h"

#include <algorithm>
#include <array>
#include <limits>

#include "chunk_matmul.h"

namespace hybrid::ops::detail {
namespace {

// The kernels take float32 CUDA tensors in chunks of 64.
[[maybe_unused]] bool on_kernels(const at::Tensor& x) {
  return x.is_cuda() && x.scalar_type() == at::kFloat && x.size(-2) == 64;
}

// Gamma_ij = exp(gc_i - gc_j) on and below the diagonal, 0 above. Above the diagonal gc_i - gc_j
// may be positive and overflow: masked to -inf before exp.
at::Tensor gate_matrix(const at::Tensor& gc) {
  const int64_t C = gc.size(-1);
  at::Tensor upper = at::ones({C, C}, gc.options().dtype(at::kBool)).triu(1);
  return (gc.unsqueeze(-1) - gc.unsqueeze(-2)).masked_fill(upper, -std::numeric_limits<double>::infinity()).exp();
}

}  // namespace

ChunkTerms chunk_terms(const at::Tensor& q, const at::Tensor& k, const at::Tensor& g, const at::Tensor& beta,
                       bool for_backward, bool want_QG, const RawRows& raw, PassSplits splits) {
#ifdef HYBRID_CUDA_KERNELS
  if (on_kernels(q) && q.size(-1) % 16 == 0 && q.size(-1) <= 256)
    return chunk_terms_cuda(q, k, g, beta, for_backward, want_QG, raw, splits);
#else
  (void)raw, (void)splits;  // the float32 rows are the same values; T stays whole here
#endif
  const int64_t C = q.size(-2);
  ChunkTerms c;
  c.gc = g.cumsum(-1);
  at::Tensor gc_last = c.gc.narrow(-1, C - 1, 1);
  c.gamma = c.gc.exp();
  c.eta = (gc_last - c.gc).exp();
  c.last = gc_last.squeeze(-1).exp();
  const at::Tensor Gamma = gate_matrix(c.gc);
  at::Tensor KKG = at::matmul(k, mT(k)) * Gamma;
  at::Tensor Lg = (beta.unsqueeze(-1) * KKG).tril(-1);
  // unitriangular: the solver reads only Lg's strict lower triangle and takes the diagonal as 1.
  at::Tensor eye = at::eye(C, q.options()).expand_as(Lg);
  at::Tensor Ag = at::linalg_solve_triangular(Lg, eye, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  c.T = Ag * beta.unsqueeze(-2);
  c.QKG = at::matmul(q, mT(k)) * Gamma;
  if (want_QG) c.QG = c.gamma.unsqueeze(-1) * q;
  if (for_backward) c.Ag = Ag, c.KKG = KKG;
  return c;
}

WyFactors factors_in(const WyFactors& f, at::ScalarType dtype) {
  auto in = [&](const at::Tensor& x) { return x.scalar_type() == dtype ? x : x.to(dtype); };
  return {in(f.dvnew), in(f.W), in(f.dO), in(f.vnew), f.from_pass};
}

WyGrads wy_backward(const ChunkTerms& c, const WyFactors& f, const at::Tensor& beta, double scale, const at::Tensor& q,
                    const at::Tensor& k, bool tf32, const RawRows* raw, bool leave_products) {
  TORCH_CHECK(f.dvnew.defined() && f.W.defined() && f.dO.defined() && f.vnew.defined(),
              "wy_backward: every factor (dvnew, W, dO, vnew) must be given");
#ifdef HYBRID_CUDA_KERNELS
  if (on_kernels(c.QKG)) return wy_backward_cuda(c, f, beta, scale, q, k, tf32, raw, leave_products);
  TORCH_CHECK(f.from_pass.count == 0, "wy_backward: chunks from a pass only on the CUDA kernel");
#else
  (void)raw, (void)leave_products;  // the float32 rows are the same values; dq and dk always formed here
#endif
  const WyFactors x = factors_in(f, beta.scalar_type());
  const at::Tensor dT = chunk_matmul(x.dvnew, mT(x.W), tf32), dP = chunk_matmul(x.dO, mT(x.vnew), tf32);
  const at::Tensor Gamma = gate_matrix(c.gc);
  WyGrads w;
  const at::Tensor dQK = dP * Gamma * scale;
  at::Tensor dAg = (dT * beta.unsqueeze(-2)).tril();
  at::Tensor dLg = -at::matmul(at::matmul(mT(c.Ag), dAg), mT(c.Ag)).tril(-1);
  w.dbeta = (dT * c.Ag).sum(-2) + (dLg * c.KKG).sum(-1);
  const at::Tensor D = dLg * beta.unsqueeze(-1) * Gamma, dKK = D + mT(D);
  at::Tensor Z = dP * c.QKG * scale + dLg * (beta.unsqueeze(-1) * c.KKG).tril(-1);
  w.dgc = Z.sum(-1) - Z.sum(-2);
  w.dq = chunk_matmul(dQK, k, tf32);
  w.dk = chunk_matmul(dKK, k, tf32, 1, chunk_matmul(mT(dQK), q, tf32));
  return w;
}

FinishProducts finish_products(const FinishInputs& in) {
  return {chunk_matmul(in.dO, mT(in.h), in.tf32), chunk_matmul(in.dW, mT(in.h), in.tf32),
          chunk_matmul(in.vnew, mT(in.dhC), in.tf32)};
}

#ifndef HYBRID_CUDA_KERNELS
bool finish_takes_wy_split(int64_t, int64_t, bool) { return false; }
bool finish_takes_bf16_kept(int64_t, int64_t, bool) { return false; }
bool finish_forms_state_dot(int64_t, int64_t, bool) { return false; }
bool finish_forms_wy_dp(int64_t, int64_t) { return false; }
#endif

at::Tensor finish_gradients(const FinishInputs& given_in, at::Tensor& dq, at::Tensor& dk) {
  // dW, V', h and dhC in bf16 (the state passes keep them so), and dO (o's bf16 gradient), where
  // the CUDA kernel's path takes them (all five), in the gates' dtype everywhere else.
  FinishInputs in = given_in;
  const std::array<at::Tensor*, 5> kept = {&in.dO, &in.dW, &in.vnew, &in.h, &in.dhC};
  const auto bf16 = [](const at::Tensor* x) { return x->scalar_type() == at::kBFloat16; };
  if (std::any_of(kept.begin(), kept.end(), bf16) &&
      !(in.wy_split.defined() && finish_takes_bf16_kept(in.q.size(-1), in.dO.size(-1), in.tf32) &&
        std::all_of(kept.begin(), kept.end(), bf16)))
    for (at::Tensor* x : kept) *x = x->to(in.gamma.scalar_type());
#ifdef HYBRID_CUDA_KERNELS
  if (on_kernels(in.q) && in.q.size(-1) % 16 == 0 &&
      (in.wy_split.defined() || (dq.is_contiguous() && dk.is_contiguous()))) {
    if (finish_forms_products(in.q.size(-1), in.dO.size(-1))) return finish_gradients_cuda(in, dq, dk);
    const FinishProducts given = finish_products(in);
    return finish_gradients_cuda(in, dq, dk, &given);
  }
#endif
  TORCH_CHECK(!in.tokens.dq.defined() && !in.wy_split.defined(),
              "finish_gradients: into the tokens and from the WY split operands only on the CUDA kernels");
  const auto [dOh, dWh, vdh] = finish_products(in);
  const at::Tensor gamma = in.gamma.unsqueeze(-1), eta = in.eta.unsqueeze(-1);
  dq.addcmul_(gamma, dOh, in.scale);
  dk.addcmul_(eta, vdh).addcmul_(gamma, dWh, -1);
  at::Tensor to_end = in.eta * (in.k * vdh).sum(-1);
  at::Tensor dgc = in.gamma * ((in.q * dOh).sum(-1) * in.scale - (in.k * dWh).sum(-1)) - to_end + in.wy_dgc;
  const at::Tensor state_dot = in.state_dot.defined() ? in.state_dot.sum(-1) : (in.dhC * in.h).sum({-2, -1});
  dgc.select(-1, dgc.size(-1) - 1).add_(to_end.sum(-1) + in.last * state_dot);
  return dgc.flip(-1).cumsum(-1).flip(-1);
}

}  // namespace hybrid::ops::detail
