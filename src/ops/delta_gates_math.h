// The gate and beta terms of one token and head (DeltaRuleArgs' A_log, dt_bias, beta_from_logit
// and allow_neg_eigval), and their derivatives, in the compute precision S: one definition for
// the CPU loop (delta_gates.cpp) and the CUDA kernels (kernels/delta_gates.cu).
//   log-gate g = -exp(A_log) softplus(a + dt_bias)   (g = a without A_log)
//   beta = beta_scale sigmoid(b)                      (beta = b without beta_from_logit)
// softplus and its derivative as ATen's softplus (threshold 20: x itself above it).
#pragma once

#include <cmath>

#include "host_device.h"

namespace hybrid::ops::detail {

struct GateOptions {
  bool log_gate = false;   // A_log given: g from the raw gate input a
  bool dt_bias = false;    // with log_gate: a + dt_bias
  bool from_logit = false; // beta = beta_scale sigmoid(b)
  double beta_scale = 1;   // 2 with allow_neg_eigval
};

template <class S>
HYBRID_HOST_DEVICE S softplus_of(S x) {
  using std::exp, std::log1p;
  return x > S(20) ? x : log1p(exp(x));
}
template <class S>
HYBRID_HOST_DEVICE S sigmoid_of(S x) {
  using std::exp;
  return S(1) / (S(1) + exp(-x));
}

// g from the raw input a: bias dt_bias[h] (0 without), decay = exp(A_log[h]).
template <class S>
HYBRID_HOST_DEVICE S gate_of(S a, S bias, S decay, bool log_gate) {
  return log_gate ? -decay * softplus_of(a + bias) : a;
}
template <class S>
HYBRID_HOST_DEVICE S beta_of(S b, S scale, bool from_logit) {
  return from_logit ? scale * sigmoid_of(b) : b;
}

// d/da of gate_of times dg (also d/d dt_bias); d/dA_log is dg g.
template <class S>
HYBRID_HOST_DEVICE S gate_input_grad(S dg, S a, S bias, S decay, bool log_gate) {
  using std::exp;
  if (!log_gate) return dg;
  const S x = a + bias, d = -decay * dg;
  if (x > S(20)) return d;
  const S z = exp(x);
  return d * z / (z + S(1));
}
template <class S>
HYBRID_HOST_DEVICE S beta_input_grad(S dbeta, S b, S scale, bool from_logit) {
  if (!from_logit) return dbeta;
  const S s = sigmoid_of(b);
  return dbeta * scale * s * (S(1) - s);
}

// Where element (token, h) of a [B, T, H] input lies, through its strides (token = b T + t).
HYBRID_HOST_DEVICE int64_t token_head_offset(const int64_t* strides, int64_t token, int64_t T, int64_t h) {
  return token / T * strides[0] + token % T * strides[1] + h * strides[2];
}

// The token a chunk-layout row (chunk c, row r of C) holds, or -1 for padding: rows of length T
// (chunks_a_row of them a row of the batch), or the documents' gather map (tokens >= tokens_total
// are padding).
HYBRID_HOST_DEVICE int64_t token_of_row(int64_t c, int64_t r, int64_t C, int64_t T, int64_t chunks_a_row,
                                       const int64_t* gather, int64_t tokens_total) {
  if (gather) {
    const int64_t token = gather[c * C + r];
    return token < tokens_total ? token : -1;
  }
  const int64_t b = c / chunks_a_row, t = (c % chunks_a_row) * C + r;
  return t < T ? b * T + t : -1;
}

}  // namespace hybrid::ops::detail
