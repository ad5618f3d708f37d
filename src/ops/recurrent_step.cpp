#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>

#include "hybrid/ops/delta_rule.h"
#include "argument_check.h"
#include "delta_chunk_layout.h"
#include "delta_rule_common.h"

namespace hybrid::ops {

#ifdef HYBRID_CUDA_KERNELS
at::Tensor recurrent_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                               const at::Tensor& beta, at::Tensor& state, double scale);
at::Tensor decode_step_cuda(const at::Tensor& qkv, const QkvHeads& heads, const at::Tensor& g, const at::Tensor& beta,
                            at::Tensor& state, const DeltaRuleArgs& args, double scale, at::ScalarType output);
#endif

at::Tensor recurrent_gated_delta_rule_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& g, const at::Tensor& beta, at::Tensor& state, double scale) {
  const detail::ArgumentCheck check{"recurrent_gated_delta_rule_step"};
  check(q.dim() == 3 && k.sizes() == q.sizes(), "q and k must be [N, Hk, K] of one shape");
  const int64_t N = q.size(0), Hk = q.size(1), K = q.size(2);
  check(v.dim() == 3 && v.size(0) == N && v.size(1) % Hk == 0, "v must be [N, Hv, V] with Hv a multiple of Hk");
  const int64_t Hv = v.size(1), V = v.size(2);
  check(g.sizes() == at::IntArrayRef({N, Hv}) && beta.sizes() == g.sizes(), "g and beta must be [N, Hv]");
  check(state.sizes() == at::IntArrayRef({N, Hv, K, V}), "state must be [N, Hv, K, V]");
  check(state.is_contiguous(), "state must be contiguous (it is updated in place)");
  if (scale == 0) scale = 1.0 / std::sqrt(static_cast<double>(K));
  at::NoGradGuard no_grad;
#ifdef HYBRID_CUDA_KERNELS
  if (q.is_cuda() && state.scalar_type() == at::kFloat) return recurrent_step_cuda(q, k, v, g, beta, state, scale);
#endif
  const auto dt = state.scalar_type();
  at::Tensor qe = q.to(dt).repeat_interleave(Hv / Hk, 1), ke = k.to(dt).repeat_interleave(Hv / Hk, 1);
  state.mul_(g.to(dt).exp().unsqueeze(-1).unsqueeze(-1));
  at::Tensor predicted = at::matmul(ke.unsqueeze(-2), state).squeeze(-2);  // S^T k: [N, Hv, V]
  at::Tensor v_new = beta.to(dt).unsqueeze(-1) * (v.to(dt) - predicted);
  state.add_(ke.unsqueeze(-1) * v_new.unsqueeze(-2));
  return (at::matmul(qe.unsqueeze(-2), state).squeeze(-2) * scale).to(v.scalar_type());
}

at::Tensor gated_delta_rule_decode_step(const at::Tensor& qkv, const QkvHeads& heads, const at::Tensor& g,
                                        const at::Tensor& beta, at::Tensor& state, const DeltaRuleArgs& args) {
  const detail::ArgumentCheck check{"gated_delta_rule_decode_step"};
  const detail::QkvWindows x = detail::windows_of(qkv, heads);
  check(!args.cu_seqlens && !args.initial_state, "takes no cu_seqlens or initial_state (the state is its argument)");
  const detail::Problem p = detail::check_arguments(x.q, x.k, x.v, g, beta, args, /*zero_state=*/false);
  check(p.T == 1, "decodes one token a sequence, got T = " + std::to_string(p.T));
  check(state.scalar_type() == p.compute && state.device() == qkv.device(),
        std::string("state must be ") + c10::toString(p.compute) + " on qkv's device");
  check(state.sizes() == at::IntArrayRef({p.N, p.Hv, p.K, p.V}) && state.is_contiguous(),
        "state must be contiguous [N, Hv, K, V] (it is updated in place)");
  at::NoGradGuard no_grad;
#ifdef HYBRID_CUDA_KERNELS
  // The inputs formed in the step kernel itself (one launch where the preparation below is many).
  if (qkv.is_cuda() && state.scalar_type() == at::kFloat)
    return decode_step_cuda(qkv, heads, g, beta, state, args, p.scale, p.output).unsqueeze(1);
#endif
  const detail::Inputs in = detail::prepare_inputs(x.q, x.k, x.v, g, beta, p, args);
  auto token = [&](const at::Tensor& t) { return t.select(1, 0).to(p.compute); };
  at::Tensor q = token(in.q), k = token(in.k);
  if (args.qk_l2norm) q = detail::l2_normalize(q, p.compute), k = detail::l2_normalize(k, p.compute);
  at::Tensor o = recurrent_gated_delta_rule_step(q, k, token(in.v), token(in.g), token(in.beta), state, p.scale);
  return o.to(p.output).unsqueeze(1);
}

}  // namespace hybrid::ops
