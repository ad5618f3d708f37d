#include "delta_rule_common.h"

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>
#include <tuple>
#include <vector>


namespace hybrid::ops::detail {
namespace {

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("chunk_gated_delta_rule: " + what);
}

std::string shape(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

}  // namespace

DeltaRuleOutput run_per_sequence(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& g, const at::Tensor& beta, const DeltaRuleArgs& args,
                                 const SequenceFn& one) {
  check(q.dim() == 4 && k.sizes() == q.sizes(), "q and k must be [B, T, Hk, K] of one shape, got " + shape(q) + " and " + shape(k));
  const int64_t B = q.size(0), T = q.size(1), Hk = q.size(2), K = q.size(3);
  check(v.dim() == 4 && v.size(0) == B && v.size(1) == T, "v must be [B, T, Hv, V], got " + shape(v));
  const int64_t Hv = v.size(2), V = v.size(3);
  check(Hv % Hk == 0, "value heads " + std::to_string(Hv) + " are not a multiple of key heads " + std::to_string(Hk));
  check(g.dim() == 3 && g.size(0) == B && g.size(1) == T && g.size(2) == Hv, "g must be [B, T, Hv], got " + shape(g));
  check(beta.sizes() == g.sizes(), "beta must be [B, T, Hv], got " + shape(beta));

  // The recurrence runs in float32 (float64 for float64 inputs) whatever autocast says: bf16
  // matmuls in the WY solve and the state pass lose the accuracy the thresholds ask for.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const double scale = args.scale != 0 ? args.scale : 1.0 / std::sqrt(static_cast<double>(K));

  // Documents of cu_seqlens (packed in a single row), else the batch rows as they are.
  std::vector<int64_t> offsets;
  if (args.cu_seqlens) {
    check(B == 1, "cu_seqlens needs batch size 1, got " + std::to_string(B));
    at::Tensor cu = args.cu_seqlens->to(at::kCPU, at::kLong).contiguous();
    check(cu.dim() == 1 && cu.numel() >= 2, "cu_seqlens must be [N+1] offsets");
    offsets.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
    check(offsets.front() == 0 && offsets.back() == T, "cu_seqlens must start at 0 and end at T = " + std::to_string(T));
    for (size_t i = 0; i + 1 < offsets.size(); ++i) check(offsets[i + 1] >= offsets[i], "cu_seqlens must not decrease");
  }
  const int64_t N = args.cu_seqlens ? static_cast<int64_t>(offsets.size()) - 1 : B;
  if (args.initial_state)
    check(args.initial_state->sizes() == at::IntArrayRef({N, Hv, K, V}),
          "initial_state must be [N, Hv, K, V] = [" + std::to_string(N) + ", " + std::to_string(Hv) + ", " +
              std::to_string(K) + ", " + std::to_string(V) + "], got " + shape(*args.initial_state));

  // [B,T,H,D] -> [B,H,T,D] in compute precision; key heads repeated for grouped values.
  const int64_t group = Hv / Hk;
  auto heads_first = [&](const at::Tensor& x) { return x.to(compute).transpose(1, 2); };
  at::Tensor qh = heads_first(q), kh = heads_first(k), vh = heads_first(v);
  if (group > 1) qh = qh.repeat_interleave(group, 1), kh = kh.repeat_interleave(group, 1);
  at::Tensor gh = g.to(compute).transpose(1, 2), bh = beta.to(compute).transpose(1, 2);

  at::Tensor state = args.initial_state ? args.initial_state->to(compute)
                                       : at::zeros({N, Hv, K, V}, q.options().dtype(compute));
  at::Tensor o, final_state;
  if (!args.cu_seqlens) {
    std::tie(o, final_state) = one(Sequence{qh, kh, vh, gh, bh, state}, scale);
  } else {
    std::vector<at::Tensor> outs, finals;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t start = offsets[n], len = offsets[n + 1] - offsets[n];
      auto doc = [&](const at::Tensor& x) { return x.narrow(2, start, len); };
      auto [o_n, s_n] = one(Sequence{doc(qh), doc(kh), doc(vh), doc(gh), doc(bh), state.narrow(0, n, 1)}, scale);
      outs.push_back(o_n);
      finals.push_back(s_n);
    }
    o = at::cat(outs, 2);
    final_state = at::cat(finals, 0);
  }
  DeltaRuleOutput out;
  out.o = o.transpose(1, 2).to(v.scalar_type());  // [N(=B),H,T,V] -> [B,T,H,V]
  if (args.output_final_state) out.final_state = final_state;
  return out;
}

}  // namespace hybrid::ops::detail
