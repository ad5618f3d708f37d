// Shared plumbing of the delta-rule implementations: argument checks, the [B,T,H,D] <->
// per-sequence [H,T,D] reshuffles, grouped-value expansion and varlen splitting.
#pragma once

#include <ATen/ATen.h>

#include <functional>

#include "hybrid/ops/delta_rule.h"

namespace hybrid::ops::detail {

// A batch of equal-length sequences in compute precision, heads first: q,k [N,H,T,K] (already
// expanded to the value heads), v [N,H,T,V], g, beta [N,H,T]; state [N,H,K,V] (zeros if none given).
struct Sequence {
  at::Tensor q, k, v, g, beta, state;
};

// Runs `one` (returning o [N,H,T,V] and the final state [N,H,K,V]) on the whole batch, or on
// each document of cu_seqlens, and assembles the front-end's outputs. Validates shapes first.
using SequenceFn = std::function<std::pair<at::Tensor, at::Tensor>(const Sequence&, double scale)>;
DeltaRuleOutput run_per_sequence(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& g, const at::Tensor& beta, const DeltaRuleArgs& args,
                                 const SequenceFn& one);

}  // namespace hybrid::ops::detail
