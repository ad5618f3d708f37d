// The gated delta rule, the sequence mixer of Gated DeltaNet. Per value head, with the
// state S in [K, V] layout and a_t = exp(g_t):
//   S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,     o_t = scale * S_t^T q_t
// (the same as S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T).
//
// Shapes (what the projections produce, [B, T, heads, dim]):
//   q, k [B, T, Hk, K];  v [B, T, Hv, V];  g (log-gate, <= 0), beta [B, T, Hv];
//   Hv a multiple of Hk (grouped value attention: value head h reads key head h / (Hv/Hk)).
//   initial_state / final_state [N, Hv, K, V], N = B, or the number of sequences when
//   cu_seqlens ([N+1] int64 offsets, B must be 1) packs several documents in one row.
// Returns o [B, T, Hv, V] in v's dtype (or output_dtype) and, if asked, the final state in
// float32 (float64 for float64 inputs). Everything is differentiable, also through the initial state.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace hybrid::ops {

struct DeltaRuleOutput {
  at::Tensor o;
  at::Tensor final_state;  // undefined unless output_final_state
};

struct DeltaRuleArgs {
  double scale = 0;  // 0: 1/sqrt(K)
  std::optional<at::Tensor> initial_state;
  bool output_final_state = false;
  std::optional<at::ScalarType> output_dtype;  // o's dtype when not v's (e.g. float32 o from bf16 v)
  std::optional<at::Tensor> cu_seqlens;
  // What Gated DeltaNet computes before the recurrence, done by the op (FLA's
  // use_qk_l2norm_in_kernel and gating), differentiable like the rest:
  bool qk_l2norm = false;            // q, k <- x / sqrt(sum x^2 + 1e-6) over each head's K
  std::optional<at::Tensor> A_log;   // [Hv]: g is the raw gate input a, and the log-gate is
  std::optional<at::Tensor> dt_bias; //   -exp(A_log) softplus(a + dt_bias) (dt_bias [Hv], optional)
  bool beta_from_logit = false;      // beta <- sigmoid(beta) ...
  bool allow_neg_eigval = false;     // ... times 2, so beta lies in (0, 2)
  // On CUDA in float32, the batched products around the state pass (output, gradients, the pass's
  // inputs) run on TF32 tensor cores: about 4e-4 relative error each, inside the thresholds of
  // REFERENCE.md; the WY inverse and Q K^T keep float32 accuracy, the state pass 16-bit operands
  // (two bf16 each) with a float32 state. false: these products in float32.
  bool tf32_products = true;
  // Keep the forward's intermediates for the backward (the state entering each chunk, W, V',
  // diag(gamma) Q and the chunk's C x C terms: delta_rule_memory.h's bytes a token and value head)
  // rather than recompute them there (one pass over the sequence more). Only when a backward will run.
  bool keep_intermediates = true;
};

// The chunked WY-form algorithm (chunk 64) with its own backward, the front-end every caller
// uses: the pass over chunks is a CUDA kernel for CUDA tensors (float32 compute), ATen ops
// elsewhere (src/ops/delta_rule_chunked.cpp).
DeltaRuleOutput chunk_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& g, const at::Tensor& beta, const DeltaRuleArgs& args = {});

// q, k and v packed as the columns of one tensor qkv [B, T, 2 Hk K + Hv V] (q | k | v, each head's
// dims together: GDN's conv output). The same results as chunk_gated_delta_rule on its three
// column windows; on the CUDA kernels' path (bf16 qkv, Hk == Hv) the windows go into the chunk
// layout as one autograd node whose backward writes q, k and v's gradients side by side into one
// tensor of qkv's shape, instead of three tensors that the windows' backward would concatenate.
struct QkvHeads {
  int64_t k_heads = 0, k_dim = 0, v_heads = 0, v_dim = 0;
};
DeltaRuleOutput chunk_gated_delta_rule_packed(const at::Tensor& qkv, const QkvHeads& heads, const at::Tensor& g,
                                              const at::Tensor& beta, const DeltaRuleArgs& args = {});

// Token-by-token recurrence: slow, obviously right; the oracle for tests.
DeltaRuleOutput recurrent_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& g, const at::Tensor& beta, const DeltaRuleArgs& args = {});

// One decoding step (T = 1) for every sequence, updating `state` in place:
//   q, k [N, Hk, K]; v [N, Hv, V]; g, beta [N, Hv]; state [N, Hv, K, V] float32 (float64 allowed
//   on the CPU). Returns o [N, Hv, V]. A CUDA kernel on the GPU (kernels/recurrent_step.cu), ATen
//   ops elsewhere. Not differentiable: this is for generation.
at::Tensor recurrent_gated_delta_rule_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& g, const at::Tensor& beta, at::Tensor& state,
                                           double scale = 0);

// One decoding step of GDN's packed qkv [B, 1, 2 Hk K + Hv V] with chunk_gated_delta_rule's
// options (scale, qk_l2norm, A_log/dt_bias, beta_from_logit, allow_neg_eigval, output_dtype; no
// cu_seqlens): g, beta [B, 1, Hv] as that op takes them; `state` [B, Hv, K, V] in compute precision
// (float32, float64 for float64 qkv) is the step's initial state and becomes its final one, in
// place. Returns o [B, 1, Hv, V]; the same values as the chunked op on this one token. Runs
// recurrent_gated_delta_rule_step (the CUDA step kernel on the GPU). Not differentiable.
at::Tensor gated_delta_rule_decode_step(const at::Tensor& qkv, const QkvHeads& heads, const at::Tensor& g,
                                        const at::Tensor& beta, at::Tensor& state, const DeltaRuleArgs& args);

}  // namespace hybrid::ops
