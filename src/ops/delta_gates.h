// The log-gates and betas of the chunked delta rule, formed from the raw gate and beta inputs
// (DeltaRuleArgs' A_log, dt_bias, beta_from_logit, allow_neg_eigval: delta_gates_math.h) and
// written straight into the chunk layout, differentiable: one pass each way, where ATen's ops (a
// cast, the bias add, softplus, the products, sigmoid, then the layout's pad and permute copies)
// took about a dozen small kernels forward and as many backward (some 60 us a 7b-width GDN
// layer's fwd+bwd).
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "delta_chunk_layout.h"
#include "delta_gates_math.h"
#include "hybrid/ops/delta_rule.h"

namespace hybrid::ops::detail {

// One call's shapes and options: the inputs [B, T, H], the layout [H, NC, C] (rows of the batch,
// chunks_a_row chunks each, or the documents' gather map on the inputs' device).
struct GateProblem {
  int64_t B = 0, T = 0, H = 0, NC = 0, C = 0, chunks_a_row = 0;
  at::Tensor gather;
  at::ScalarType compute = at::kFloat;
  GateOptions options;
};

#ifdef HYBRID_CUDA_KERNELS
void gates_forward_cuda(const GateProblem& p, const at::Tensor& g, const at::Tensor& beta, const at::Tensor& A_log,
                        const at::Tensor& dt_bias, at::Tensor& g_out, at::Tensor& beta_out);
void gates_backward_cuda(const GateProblem& p, const at::Tensor& g, const at::Tensor& beta, const at::Tensor& A_log,
                         const at::Tensor& dt_bias, const at::Tensor& dg, const at::Tensor& dbeta, at::Tensor& dg_in,
                         at::Tensor& dbeta_in, at::Tensor& dA_log, at::Tensor& ddt_bias);
#endif

// g and beta [B, T, H] (any strides, any float dtype) -> {g, beta} [H, NC, C] in compute (float32
// or float64), padding rows zero; gradients to g, beta, A_log and dt_bias. On CUDA one kernel
// forward and one backward (plus a sum of per-block partials for A_log's and dt_bias's
// gradients, in a fixed order); elsewhere the same loop on the CPU.
std::pair<at::Tensor, at::Tensor> gates_in_chunks(const at::Tensor& g, const at::Tensor& beta,
                                                  const DeltaRuleArgs& args, const ChunkLayout& lay,
                                                  at::ScalarType compute);

}  // namespace hybrid::ops::detail
