#include "delta_rule_common.h"

#include <cmath>
#include <string>

#include "argument_check.h"

namespace hybrid::ops::detail {
namespace {

constexpr ArgumentCheck check{"chunk_gated_delta_rule"};

std::string shape(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

}  // namespace

Problem check_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                        const at::Tensor& beta, const DeltaRuleArgs& args, bool zero_state) {
  Problem p;
  check(q.dim() == 4 && k.sizes() == q.sizes(), "q and k must be [B, T, Hk, K] of one shape, got " + shape(q) + " and " + shape(k));
  p.B = q.size(0), p.T = q.size(1), p.Hk = q.size(2), p.K = q.size(3);
  check(v.dim() == 4 && v.size(0) == p.B && v.size(1) == p.T, "v must be [B, T, Hv, V], got " + shape(v));
  p.Hv = v.size(2), p.V = v.size(3);
  check(p.Hk > 0 && p.Hv % p.Hk == 0,
        "value heads " + std::to_string(p.Hv) + " are not a multiple of key heads " + std::to_string(p.Hk));
  check(g.dim() == 3 && g.size(0) == p.B && g.size(1) == p.T && g.size(2) == p.Hv, "g must be [B, T, Hv], got " + shape(g));
  check(beta.sizes() == g.sizes(), "beta must be [B, T, Hv], got " + shape(beta));
  check(k.device() == q.device() && v.device() == q.device() && g.device() == q.device() && beta.device() == q.device(),
        "q, k, v, g and beta must be on one device");
  p.compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.output = args.output_dtype.value_or(v.scalar_type());
  check(at::isFloatingType(p.output), std::string("output_dtype must be a floating type, got ") + c10::toString(p.output));
  p.scale = args.scale != 0 ? args.scale : 1.0 / std::sqrt(static_cast<double>(p.K));

  if (args.cu_seqlens) {
    check(p.B == 1, "cu_seqlens needs batch size 1, got " + std::to_string(p.B));
    at::Tensor cu = args.cu_seqlens->to(at::kCPU, at::kLong).contiguous();
    check(cu.dim() == 1 && cu.numel() >= 2, "cu_seqlens must be [N+1] offsets");
    p.offsets.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
    check(p.offsets.front() == 0 && p.offsets.back() == p.T, "cu_seqlens must start at 0 and end at T = " + std::to_string(p.T));
    for (size_t i = 0; i + 1 < p.offsets.size(); ++i) check(p.offsets[i + 1] >= p.offsets[i], "cu_seqlens must not decrease");
  } else {
    for (int64_t b = 0; b <= p.B; ++b) p.offsets.push_back(b * p.T);
  }
  for (const auto& [name, t] : {std::pair{"A_log", args.A_log}, std::pair{"dt_bias", args.dt_bias}})
    check(!t || (t->dim() == 1 && t->size(0) == p.Hv && t->device() == q.device()),
          std::string(name) + " must be [Hv] = [" + std::to_string(p.Hv) + "] on q's device");
  check(!args.dt_bias || args.A_log, "dt_bias needs A_log (the gate is computed only from both)");
  check(!args.allow_neg_eigval || args.beta_from_logit, "allow_neg_eigval needs beta_from_logit");
  p.N = static_cast<int64_t>(p.offsets.size()) - 1;
  if (args.initial_state) {
    check(args.initial_state->sizes() == at::IntArrayRef({p.N, p.Hv, p.K, p.V}),
          "initial_state must be [N, Hv, K, V] = [" + std::to_string(p.N) + ", " + std::to_string(p.Hv) + ", " +
              std::to_string(p.K) + ", " + std::to_string(p.V) + "], got " + shape(*args.initial_state));
    p.initial_state = args.initial_state->to(q.device(), p.compute);
  } else if (zero_state) {
    p.initial_state = at::zeros({p.N, p.Hv, p.K, p.V}, q.options().dtype(p.compute));
  }
  return p;
}

at::Tensor l2_normalize(const at::Tensor& x, at::ScalarType compute) {
  const at::Tensor sum_sq = at::linalg_vector_norm(x, 2, {-1}, /*keepdim=*/true, compute).square();
  return x * (sum_sq + 1e-6).rsqrt();  // in compute precision by type promotion
}

Inputs prepare_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                      const at::Tensor& beta, const Problem& p, const DeltaRuleArgs& args, bool form_gates) {
  auto heads = [&](const at::Tensor& x) { return p.Hv == p.Hk ? x : x.repeat_interleave(p.Hv / p.Hk, 2); };
  if (!form_gates) return Inputs{heads(q), heads(k), v, g, beta};
  Inputs in{heads(q), heads(k), v, g.to(p.compute), beta.to(p.compute)};
  if (args.A_log) {
    const at::Tensor a = args.dt_bias ? in.g + args.dt_bias->to(p.compute) : in.g;
    in.g = -args.A_log->to(p.compute).exp() * at::softplus(a);
  }
  if (args.beta_from_logit) in.beta = at::sigmoid(in.beta) * (args.allow_neg_eigval ? 2.0 : 1.0);
  return in;
}

}  // namespace hybrid::ops::detail
