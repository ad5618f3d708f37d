// The gated delta rule token by token, from ATen ops: slow, obviously right, differentiable
// by ATen's autograd. The oracle the chunked implementation is tested against.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <vector>

#include "delta_rule_common.h"

namespace hybrid::ops {
namespace {

// q, k [N, T, H, K], v [N, T, H, V], g, beta [N, T, H], S [N, H, K, V] -> o [N, T, H, V], final S.
std::pair<at::Tensor, at::Tensor> recur(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& g, const at::Tensor& beta, at::Tensor S, double scale) {
  const int64_t T = q.size(1);
  std::vector<at::Tensor> outs;
  outs.reserve(T);
  for (int64_t t = 0; t < T; ++t) {
    at::Tensor qt = q.select(1, t), kt = k.select(1, t), vt = v.select(1, t);  // [N,H,D]
    S = g.select(1, t).exp().unsqueeze(-1).unsqueeze(-1) * S;
    at::Tensor predicted = at::matmul(kt.unsqueeze(-2), S).squeeze(-2);  // S^T k: [N,H,V]
    at::Tensor v_new = beta.select(1, t).unsqueeze(-1) * (vt - predicted);
    S = S + kt.unsqueeze(-1) * v_new.unsqueeze(-2);
    outs.push_back(at::matmul(qt.unsqueeze(-2), S).squeeze(-2) * scale);
  }
  return {T ? at::stack(outs, 1) : v.clone(), S};
}

}  // namespace

DeltaRuleOutput recurrent_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& g, const at::Tensor& beta, const DeltaRuleArgs& args) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const detail::Problem p = detail::check_arguments(q, k, v, g, beta, args);
  const detail::Inputs in = detail::prepare_inputs(q, k, v, g, beta, p, args);
  auto keys = [&](const at::Tensor& x) { return args.qk_l2norm ? detail::l2_normalize(x, p.compute) : x.to(p.compute); };
  const at::Tensor qe = keys(in.q), ke = keys(in.k), ve = in.v.to(p.compute);
  const at::Tensor &ge = in.g, &be = in.beta;
  at::Tensor o, final_state;
  if (!args.cu_seqlens) {
    std::tie(o, final_state) = recur(qe, ke, ve, ge, be, p.initial_state, p.scale);
  } else {  // one document at a time
    std::vector<at::Tensor> outs, finals;
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t start = p.offsets[n], len = p.offsets[n + 1] - start;
      auto doc = [&](const at::Tensor& x) { return x.narrow(1, start, len); };
      auto [o_n, s_n] = recur(doc(qe), doc(ke), doc(ve), doc(ge), doc(be), p.initial_state.narrow(0, n, 1), p.scale);
      outs.push_back(o_n);
      finals.push_back(s_n);
    }
    o = at::cat(outs, 1);
    final_state = at::cat(finals, 0);
  }
  DeltaRuleOutput out;
  out.o = o.to(p.output);
  if (args.output_final_state) out.final_state = final_state;
  return out;
}

}  // namespace hybrid::ops
