// Shared plumbing of the delta-rule implementations: argument checks, and the documents
// (rows of the batch, or the segments of cu_seqlens) every implementation iterates over.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "hybrid/ops/delta_rule.h"

namespace hybrid::ops::detail {

// One call's arguments, validated, in the terms every implementation uses.
struct Problem {
  int64_t B = 0, T = 0, Hk = 0, Hv = 0, K = 0, V = 0;
  int64_t N = 0;  // sequences: B, or the documents of cu_seqlens
  double scale = 0;
  at::ScalarType compute = at::kFloat;  // float32, or float64 for float64 inputs
  at::ScalarType output = at::kFloat;   // o's: DeltaRuleArgs::output_dtype, else v's
  // N + 1 offsets into the flattened [B * T] tokens: sequence n is tokens [offsets[n], offsets[n+1]).
  std::vector<int64_t> offsets;
  // [N, Hv, K, V] in compute precision (zeros when none was given, unless the caller keeps its own)
  at::Tensor initial_state;
};

// Throws std::invalid_argument naming the first argument that does not fit delta_rule.h's shapes.
// zero_state: Problem::initial_state as zeros where args give none (the decoding step, whose state
// is its own argument, says false: a state-sized fill a layer and token for nothing).
Problem check_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                        const at::Tensor& beta, const DeltaRuleArgs& args, bool zero_state = true);

// x / sqrt(sum x^2 + 1e-6) over the last dim (FLA's epsilon), the sum accumulated in compute
// precision straight from x (on CUDA without a copy), the result in compute precision.
at::Tensor l2_normalize(const at::Tensor& x, at::ScalarType compute);

// The op's inputs after DeltaRuleArgs' gate and beta options, with key heads repeated for
// grouped values: q, k [B, T, Hv, K], v [B, T, Hv, V], g, beta [B, T, Hv]. g and beta are in
// compute precision; q, k and v keep their dtype, and q and k are not yet normalised: the
// chunked path casts and normalises them in the same pass that changes their layout. Without
// form_gates, g and beta are the raw inputs as given (the chunked path forms them on the way into
// its layout: delta_gates.h).
struct Inputs {
  at::Tensor q, k, v, g, beta;
};
Inputs prepare_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                      const at::Tensor& beta, const Problem& p, const DeltaRuleArgs& args, bool form_gates = true);

}  // namespace hybrid::ops::detail
