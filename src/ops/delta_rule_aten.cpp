// The gated delta rule from ATen ops: the chunked WY form (the reference every device
// runs) and the token-by-token recurrence (the test oracle). Shapes per delta_rule.h.
//
// Chunked form, per chunk of C = 64 tokens entering with state S0 (K x V), with
// gc = cumsum(g) inside the chunk, gamma = exp(gc), Gamma_ij = gamma_i / gamma_j:
//   L  = StrictTril(diag(beta) K K^T * Gamma)          (C x C)
//   V' = (I + L)^-1 diag(beta) (V - diag(gamma) K S0)  = U - W S0, with
//        U = (I + L)^-1 diag(beta) V,  W = (I + L)^-1 diag(beta gamma) K
//   O  = scale (diag(gamma) Q S0 + Tril(Q K^T * Gamma) V')
//   S_C = gamma_C S0 + K^T diag(gamma_C / gamma) V'
// U, W and the masked Q K^T are computed for all chunks at once; only the state pass is
// sequential over chunks.
#include <ATen/ATen.h>

#include <limits>

#include "delta_rule_common.h"

namespace hybrid::ops {
namespace {

constexpr int64_t kChunk = 64;

std::pair<at::Tensor, at::Tensor> chunked(const detail::Sequence& s, double scale) {
  const int64_t N = s.q.size(0), H = s.q.size(1), T = s.q.size(2), K = s.q.size(3), V = s.v.size(3);
  if (T == 0) return {s.v.clone(), s.state.clone()};
  const int64_t C = kChunk, pad = (C - T % C) % C, n_chunks = (T + pad) / C;
  // Zero padding is inert: k = 0 and beta = 0 leave the state alone, g = 0 does not decay it.
  auto chunks = [&](const at::Tensor& x) {
    at::Tensor p = at::constant_pad_nd(x, {0, 0, 0, pad});
    return p.reshape({N, H, n_chunks, C, x.size(3)});
  };
  at::Tensor q = chunks(s.q), k = chunks(s.k), v = chunks(s.v);
  at::Tensor g = at::constant_pad_nd(s.g, {0, pad}).reshape({N, H, n_chunks, C});
  at::Tensor beta = at::constant_pad_nd(s.beta, {0, pad}).reshape({N, H, n_chunks, C});

  at::Tensor gc = g.cumsum(-1);                                    // [N,H,n,C]
  at::Tensor gamma = gc.exp();
  at::Tensor gamma_to_end = (gc.narrow(-1, C - 1, 1) - gc).exp();  // gamma_C / gamma_j
  at::Tensor gamma_last = gc.select(-1, C - 1).exp();             // [N,H,n]
  // Gamma_ij = exp(gc_i - gc_j) for j <= i; above the diagonal the difference may be
  // positive and overflow, so it is masked to -inf before exp.
  at::Tensor upper = at::ones({C, C}, q.options().dtype(at::kBool)).triu(1);
  at::Tensor Gamma = (gc.unsqueeze(-1) - gc.unsqueeze(-2)).masked_fill(upper, -std::numeric_limits<double>::infinity()).exp();

  at::Tensor eye = at::eye(C, q.options());
  at::Tensor L = (beta.unsqueeze(-1) * at::matmul(k, k.transpose(-1, -2)) * Gamma).masked_fill(eye.to(at::kBool), 0);
  at::Tensor rhs = at::cat({beta.unsqueeze(-1) * v, (beta * gamma).unsqueeze(-1) * k}, -1);
  at::Tensor UW = at::linalg_solve_triangular(eye + L, rhs, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  at::Tensor U = UW.narrow(-1, 0, V), W = UW.narrow(-1, V, K);
  at::Tensor P = at::matmul(q, k.transpose(-1, -2)) * Gamma;  // Gamma is 0 above the diagonal
  at::Tensor q_gamma = gamma.unsqueeze(-1) * q;
  at::Tensor k_to_end = gamma_to_end.unsqueeze(-1) * k;

  at::Tensor S = s.state;
  std::vector<at::Tensor> outs;
  outs.reserve(n_chunks);
  for (int64_t c = 0; c < n_chunks; ++c) {
    at::Tensor v_new = U.select(2, c) - at::matmul(W.select(2, c), S);
    outs.push_back(at::matmul(q_gamma.select(2, c), S) + at::matmul(P.select(2, c), v_new));
    S = gamma_last.select(2, c).unsqueeze(-1).unsqueeze(-1) * S +
        at::matmul(k_to_end.select(2, c).transpose(-1, -2), v_new);
  }
  at::Tensor o = at::stack(outs, 2).reshape({N, H, n_chunks * C, V}).narrow(2, 0, T) * scale;
  return {o, S};
}

std::pair<at::Tensor, at::Tensor> recurrent(const detail::Sequence& s, double scale) {
  const int64_t T = s.q.size(2);
  at::Tensor S = s.state;
  std::vector<at::Tensor> outs;
  outs.reserve(T);
  for (int64_t t = 0; t < T; ++t) {
    at::Tensor q = s.q.select(2, t), k = s.k.select(2, t), v = s.v.select(2, t);  // [N,H,D]
    at::Tensor a = s.g.select(2, t).exp().unsqueeze(-1).unsqueeze(-1);
    at::Tensor beta = s.beta.select(2, t).unsqueeze(-1);
    S = a * S;
    at::Tensor predicted = at::matmul(k.unsqueeze(-2), S).squeeze(-2);  // S^T k: [N,H,V]
    at::Tensor v_new = beta * (v - predicted);
    S = S + k.unsqueeze(-1) * v_new.unsqueeze(-2);
    outs.push_back(at::matmul(q.unsqueeze(-2), S).squeeze(-2) * scale);
  }
  at::Tensor o = T ? at::stack(outs, 2) : s.v.clone();
  return {o, S};
}

}  // namespace

DeltaRuleOutput chunk_gated_delta_rule_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& g, const at::Tensor& beta, const DeltaRuleArgs& args) {
  return detail::run_per_sequence(q, k, v, g, beta, args, chunked);
}

DeltaRuleOutput recurrent_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& g, const at::Tensor& beta, const DeltaRuleArgs& args) {
  return detail::run_per_sequence(q, k, v, g, beta, args, recurrent);
}

DeltaRuleOutput chunk_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& g, const at::Tensor& beta, const DeltaRuleArgs& args) {
  return chunk_gated_delta_rule_aten(q, k, v, g, beta, args);
}

}  // namespace hybrid::ops
