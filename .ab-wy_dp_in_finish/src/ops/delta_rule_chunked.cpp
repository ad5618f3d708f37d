// The chunked gated delta rule (chunk C = 64) with a hand-derived backward. Per chunk, with
// gc = cumsum(g) inside the chunk, gamma = exp(gc), eta = gamma_C / gamma, Gamma_ij =
// gamma_i / gamma_j (0 above the diagonal) and S0 the state entering the chunk:
//   Lg = StrictTril(diag(beta) K K^T * Gamma),  Ag = (I + Lg)^-1,  T = Ag diag(beta)
//   V' = T (V - diag(gamma) K S0)                       (the WY form of the delta rule)
//   O  = s (diag(gamma) Q S0 + (Q K^T * Gamma) V')
//   S_C = gamma_C S0 + K^T diag(eta) V'
// The chunk-local terms (gates, the WY inverse, Q K^T, and their backward) are chunk_terms and
// wy_backward, the pass over chunks forward and backward is state_pass, the way into the chunk
// layout (with q and k's L2 norm) is to_chunks (CUDA kernels on the GPU, ATen elsewhere); the
// remaining products are batched over all chunks (cuBLAS on the GPU).
// Backward, per chunk, with dS_C the gradient of the state leaving it:
//   dV' = diag(eta) K dS_C + s (Q K^T * Gamma)^T dO,  dW = T^T dV',  dV = dW,
//   dS0 = gamma_C dS_C + s (diag(gamma) Q)^T dO - (diag(gamma) K)^T dW     (the reverse pass)
//   dQ  = s diag(gamma) dO S0^T + dQK K,  dQK = s (dO V'^T) * Gamma
//   dK  = dQK^T Q + diag(eta) V' dS_C^T - diag(gamma) dW S0^T + (dKK + dKK^T) K
//   dT  = dV' W^T;  dbeta_j = sum_i dT_ij Ag_ij + sum_j' dLg_jj' (K K^T * Gamma)_jj'
//   dLg = -StrictTril(Ag^T (dT diag(beta)) Ag^T),  dKK = diag(beta) dLg * Gamma
// and the log-gates collect <x, dx> of every factor gamma scales, then a reverse cumsum
// (finish_gradients: the row-wise last terms of dQ and dK, and the log-gates' gradient).
// Everything in float32 (float64 for float64 inputs). The forward's intermediates (the chunk
// terms and the pass's h, W, V') are kept for the backward, or, with DeltaRuleArgs::
// keep_intermediates off, recomputed there so that memory stays at the inputs.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <string>

#include "chunk_matmul.h"
#include "delta_chunk_layout.h"
#include "delta_chunk_terms.h"
#include "delta_gates.h"
#include "delta_rule_common.h"
#include "delta_state_pass.h"
#include "wy_beside_pass.h"

namespace hybrid::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using detail::ChunkTerms;
using detail::mT;

// The keys and queries as the CUDA state pass and chunk terms can also take them (RawRows:
// exact bf16 rows and their scales from keys_to_chunks, or undefined). Outside the tensor
// arguments: apply cannot take undefined ones.
using detail::RawRows;

// The state pass's inputs with the keys (and their raw form, when there is one) and the layout's
// chunk offsets (already on the device) filled in.
detail::StatePassInputs pass_with_keys(const at::Tensor& k, const RawRows& raw, const detail::ChunkLayout& lay) {
  detail::StatePassInputs in;
  in.k = k, in.k_raw = raw.keys, in.k_scale = raw.scale;
  in.chunk_offsets = lay.chunk_offsets, in.chunk_offsets_on_device = lay.offsets_on_device;
  return in;
}

// Whether the forward pass, given the raw queries, forms the whole output (state_pass_forms_output
// with the shapes of the op's chunk-layout tensors).
bool pass_forms_output(const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& chunk_offsets) {
  return detail::state_pass_forms_output(k.device(), k.size(0), k.size(3), v.size(3),
                                         static_cast<int64_t>(chunk_offsets.size()) - 1);
}

// The queries' row factors e = s gamma sq for the passes: from the chunk terms where they made
// them (PassSplits::factors), else here.
at::Tensor query_factor(const ChunkTerms& c, const RawRows& raw, double scale) {
  return c.query_factor.defined() ? c.query_factor : c.gamma * raw.query_scale * scale;
}

// The chunk terms' splits where the passes run on the CUDA kernel (on_kernel): T's split rows
// and the passes' row factors (scale: the op's).
detail::PassSplits pass_splits(bool on_kernel, double scale) {
  detail::PassSplits splits;
  splits.T = splits.factors = on_kernel, splits.scale = scale;
  return splits;
}

// want_w: also return W = V - diag(gamma) K S0 (the pass's X) and h, which the backward needs. With
// output_scale s, also the queries' share of the output, O = s diag(gamma) Q S0, where the pass
// takes the raw queries (otherwise O stays undefined), and with whole_output the whole output
// o = s QKG V' + O (the outputs' o) straight into those tokens where the pass can form it
// (state_pass_forms_output). kept_bf16: h, W and V' in bf16 where the pass can keep them so and
// they serve the backward alone (kept_in_bf16).
detail::StatePassOutputs forward_pass(const ChunkTerms& c, const at::Tensor& k, const RawRows& raw, const at::Tensor& v,
                                      const at::Tensor& h0, const detail::ChunkLayout& lay, bool want_w,
                                      bool kept_bf16, std::optional<double> output_scale = std::nullopt,
                                      const detail::OutputTokens* whole_output = nullptr) {
  detail::StatePassInputs in = pass_with_keys(k, raw, lay);
  in.last = c.last, in.add = v, in.add_tokens = raw.values;
  if (h0.numel() > 0) in.init = h0;  // empty: none given, zeros
  // The row factors with the keys' scales folded in where the chunk terms made them (no -gamma
  // formed then: a kernel a pass for nothing).
  if (c.neg_gamma_k.defined() && in.k_raw.defined()) in.a = c.neg_gamma_k, in.b = c.eta_k, in.scaled_by_keys = true;
  else in.a = -c.gamma, in.b = c.eta;
  in.add_token_runs = raw.value_runs;
  if (c.T_split.defined()) in.M_split = c.T_split;
  else in.M = c.T;
  if (output_scale && raw.queries.defined() && detail::state_pass_takes_queries(in)) {
    in.q_raw = raw.queries, in.q_factor = query_factor(c, raw, *output_scale);
    if (whole_output && pass_forms_output(k, v, lay.chunk_offsets))
      in.QKG = c.QKG, in.QKG_split = c.QKG_split, in.output_scale = *output_scale, in.o_tokens = *whole_output;
  }
  // h (the pass's `before`) serves the backward, and the output where the pass did not add its share.
  in.want_before = want_w || !in.q_raw.defined();
  // Y (V') serves the backward, and the output where the pass did not form it whole.
  in.want_y = want_w || !in.QKG.defined();
  in.kept_bf16 = kept_bf16 && want_w && in.q_raw.defined();
  return detail::state_pass(in, want_w);
}

// Whether the backward's kernels take the passes' kept intermediates in bf16 (h, W, V' of the
// forward, dS_C, dV', dW of the reverse: half the bytes the passes store and the backward reads),
// so that the passes keep them so where they can: the finish kernel's instance into the tokens
// from the raw rows with the WY products, at K = 96 or 128 in TF32 (finish_takes_bf16_kept), and
// wy_backward's factor products beside it. They take dO in bf16 too (half its bytes in the reverse
// pass, wy_backward and the finish kernel), exact only where o left the op in bf16 (its gradient
// is then bf16 too): output_bf16.
bool kept_in_bf16(int64_t K, int64_t V, const RawRows& raw, bool tf32, bool into_tokens, bool output_bf16) {
  return into_tokens && output_bf16 && raw.queries.defined() && raw.keys.defined() &&
         detail::finish_takes_bf16_kept(K, V, tf32);
}

// Whether the state passes run on the CUDA kernel, which takes T split by the chunk terms.
bool pass_on_kernel(const at::Tensor& k, const at::Tensor& v, const RawRows& raw,
                    const std::vector<int64_t>& chunk_offsets) {
  return k.scalar_type() == at::kFloat &&
         detail::state_pass_value_tile(k.device(), k.size(0), k.size(3), v.size(3),
                                       static_cast<int64_t>(chunk_offsets.size()) - 1, raw.keys.defined()) != 0;
}

// Whether the state pass in that direction takes the raw queries, so that QG is not needed there
// (state_pass_takes_queries with the shapes of the op's chunk-layout tensors).
bool pass_takes_queries(const RawRows& raw, const at::Tensor& k, const at::Tensor& v,
                        const std::vector<int64_t>& chunk_offsets, bool reverse) {
  return raw.queries.defined() && raw.keys.defined() && k.scalar_type() == at::kFloat &&
         detail::state_pass_takes_queries(k.device(), k.size(0), k.size(3), v.size(3),
                                          static_cast<int64_t>(chunk_offsets.size()) - 1, reverse);
}

// diag(gamma) Q: the chunk terms' QG, or made here where they left it out.
at::Tensor gated_queries(const ChunkTerms& c, const at::Tensor& q) {
  return c.QG.defined() ? c.QG : c.gamma.unsqueeze(-1) * q;
}

// chunk_matmul with one call's tf32 setting: mm(a, b, alpha = 1, into = {}).
auto products(bool tf32) {
  return [tf32](const at::Tensor& a, const at::Tensor& b, double alpha = 1, const at::Tensor& into = {}) {
    return detail::chunk_matmul(a, b, tf32, alpha, into);
  };
}

// What the backward needs from the forward: the chunk terms and the forward pass's h (state
// entering each chunk), W (its X) and V' (its Y). Kept from the forward, or recomputed. T, or
// where the chunk terms split it only its transpose's split (the forward's split is done with).
struct ForwardState {
  ChunkTerms c;
  at::Tensor h, W, vnew;

  std::vector<at::Tensor> to_list() const {
    return {c.gc, c.gamma, c.eta, c.last, c.T, c.Tt_split, c.QKG, c.QG, c.Ag, c.KKG, c.neg_gamma_k, c.eta_k,
            c.query_factor, h, W, vnew};
  }
  static ForwardState from_list(const std::vector<at::Tensor>& x) {
    ForwardState s;
    s.c.gc = x[0], s.c.gamma = x[1], s.c.eta = x[2], s.c.last = x[3], s.c.T = x[4], s.c.Tt_split = x[5],
    s.c.QKG = x[6], s.c.QG = x[7], s.c.Ag = x[8], s.c.KKG = x[9], s.c.neg_gamma_k = x[10], s.c.eta_k = x[11],
    s.c.query_factor = x[12], s.h = x[13], s.W = x[14], s.vnew = x[15];
    return s;
  }
};

// The forward saves its six tensor inputs (q, k, v, g, beta, h0), then a kept ForwardState.
constexpr size_t kSavedInputs = 6;

// The chunk layout, for the backward to take dO out of the tokens.
void save_layout(AutogradContext* ctx, const detail::ChunkLayout& lay) {
  ctx->saved_data["chunk_offsets"] = lay.chunk_offsets;
  if (lay.offsets_on_device.defined()) ctx->saved_data["offsets_on_device"] = lay.offsets_on_device;
  ctx->saved_data["layout"] = std::vector<int64_t>{lay.n_chunks, lay.B, lay.T, lay.rows};
  if (lay.gather.defined()) ctx->saved_data["gather"] = lay.gather, ctx->saved_data["scatter"] = lay.scatter;
}
detail::ChunkLayout saved_layout(AutogradContext* ctx) {
  detail::ChunkLayout lay;
  lay.chunk_offsets = ctx->saved_data["chunk_offsets"].toIntVector();
  if (ctx->saved_data.count("offsets_on_device"))
    lay.offsets_on_device = ctx->saved_data["offsets_on_device"].toTensor();
  const std::vector<int64_t> sizes = ctx->saved_data["layout"].toIntVector();
  lay.n_chunks = sizes[0], lay.B = sizes[1], lay.T = sizes[2], lay.rows = sizes[3] != 0;
  if (ctx->saved_data.count("gather"))
    lay.gather = ctx->saved_data["gather"].toTensor(), lay.scatter = ctx->saved_data["scatter"].toTensor();
  return lay;
}

// The whole output straight into the tokens, where the pass can write its dtype and index them.
detail::OutputTokens output_tokens(const detail::ChunkLayout& lay, at::ScalarType dtype) {
  detail::OutputTokens tokens;
  tokens.wanted = (dtype == at::kBFloat16 || dtype == at::kFloat) && lay.B * lay.T < (int64_t{1} << 32);
  tokens.gather = lay.gather, tokens.B = lay.B, tokens.T = lay.T, tokens.dtype = dtype;
  return tokens;
}

// The op's forward on the chunk layout, for the autograd nodes below: q, k [H, NC, C, K]; v [H,
// NC, C, V]; g, beta [H, NC, C]; h0 [N, H, K, V] or empty (zeros), all contiguous, in the chunk
// layout lay; o comes out of it, [B, T, H, V] in dtype `output`, with the final state. keep: save
// the forward's intermediates (ForwardState) for the backward instead of recomputing them there:
// one state pass and one chunk-terms call fewer for (K V / C + 2 V + K + 4 C + 3) floats a token
// and head.
variable_list forward_chunks(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& g, const at::Tensor& beta, const at::Tensor& h0, const RawRows& raw,
                             const detail::ChunkLayout& lay, at::ScalarType output, double scale, bool tf32,
                             bool keep) {
  const std::vector<int64_t>& chunk_offsets = lay.chunk_offsets;
  ctx->set_materialize_grads(false);  // an unused output's gradient: zeros made where needed (backward)
  save_layout(ctx, lay);
  if (raw.keys.defined()) ctx->saved_data["k_raw"] = raw.keys, ctx->saved_data["k_scale"] = raw.scale;
  if (raw.queries.defined()) ctx->saved_data["q_raw"] = raw.queries, ctx->saved_data["q_scale"] = raw.query_scale;
  if (raw.values.defined() && !keep) {  // for the recomputed forward pass
    ctx->saved_data["v_tokens"] = raw.values;
    if (raw.value_runs.defined()) ctx->saved_data["v_runs"] = raw.value_runs;
  }
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["tf32"] = tf32;
  ctx->saved_data["value_dim"] = v.size(-1);  // (h0 may be empty, and v is not saved where kept)
  const auto mm = products(tf32);
  ForwardState s;
  const bool want_QG = !pass_takes_queries(raw, k, v, chunk_offsets, false) ||
                       (keep && !pass_takes_queries(raw, k, v, chunk_offsets, true));
  // The pass forms o whole in place of the TF32 product s QKG Y (its products are split bf16: more
  // accurate), not where all products are to be float32, and writes it into the tokens; QKG's
  // split rows then come from the chunk terms.
  const detail::OutputTokens tokens = output_tokens(lay, output);
  detail::PassSplits splits = pass_splits(pass_on_kernel(k, v, raw, chunk_offsets), scale);
  splits.QKG = splits.T && tf32 && pass_takes_queries(raw, k, v, chunk_offsets, false) &&
               pass_forms_output(k, v, chunk_offsets);
  s.c = detail::chunk_terms(q, k, g, beta, /*for_backward=*/keep, want_QG, raw, splits);
  auto pass = forward_pass(s.c, k, raw, v, h0, lay, /*want_w=*/keep,
                           keep && kept_in_bf16(k.size(-1), v.size(-1), raw, tf32, tokens.wanted,
                                                output == at::kBFloat16),
                           scale, tf32 ? &tokens : nullptr);
  // o = s (QKG Y + QG h): the second term from the pass where it took the queries, both from the
  // pass where it formed o.
  at::Tensor o = pass.o;
  if (o.defined() && !tokens.wanted) {
    o = detail::from_chunks(o, lay, output);
  } else if (!o.defined()) {
    if (pass.O.defined()) {
      o = mm(s.c.QKG, pass.Y, scale, pass.O);
    } else {
      o = mm(s.c.QKG, pass.Y, scale);
      mm(gated_queries(s.c, q), pass.before, scale, o);
    }
    o = detail::from_chunks(o, lay, output);
  }
  // v and g only serve a recomputation.
  std::vector<at::Tensor> saved = {q, k, keep ? at::Tensor() : v, keep ? at::Tensor() : g, beta, h0};
  if (keep) {
    s.h = pass.before, s.W = pass.X, s.vnew = pass.Y;
    for (const at::Tensor& x : s.to_list()) saved.push_back(x);
  }
  ctx->save_for_backward(saved);
  return {o, pass.final_state};
}

// The gradients of forward_chunks' inputs in the chunk layout (dv is dW); with `into`, dq and dk go
// into the tokens instead (FinishTokens) and come back undefined.
struct ChunkGrads {
  at::Tensor dq, dk, dv, dg, dbeta, dh0;
};
ChunkGrads backward_chunks(AutogradContext* ctx, const variable_list& grads, const detail::FinishTokens* into) {
  auto saved = ctx->get_saved_variables();
  const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &g = saved[3], &beta = saved[4], &h0 = saved[5];
  const detail::ChunkLayout lay = saved_layout(ctx);
  const std::vector<int64_t>& chunk_offsets = lay.chunk_offsets;
  const double scale = ctx->saved_data["scale"].toDouble();
  const bool tf32 = ctx->saved_data["tf32"].toBool();
  const auto mm = products(tf32);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  RawRows raw;
  if (ctx->saved_data.count("k_raw"))
    raw.keys = ctx->saved_data["k_raw"].toTensor(), raw.scale = ctx->saved_data["k_scale"].toTensor();
  if (ctx->saved_data.count("q_raw"))
    raw.queries = ctx->saved_data["q_raw"].toTensor(), raw.query_scale = ctx->saved_data["q_scale"].toTensor();
  if (ctx->saved_data.count("v_tokens")) raw.values = ctx->saved_data["v_tokens"].toTensor();
  if (ctx->saved_data.count("v_runs")) raw.value_runs = ctx->saved_data["v_runs"].toTensor();
  // o's gradient in bf16 (or none): exact as the bf16 operand of the kept intermediates' products.
  const bool kept16 = kept_in_bf16(k.size(-1), ctx->saved_data["value_dim"].toInt(), raw, tf32, into != nullptr,
                                   !grads[0].defined() || grads[0].scalar_type() == at::kBFloat16);
  ForwardState s;
  if (saved.size() > kSavedInputs) {
    s = ForwardState::from_list({saved.begin() + kSavedInputs, saved.end()});
  } else {
    s.c = detail::chunk_terms(q, k, g, beta, /*for_backward=*/true, !pass_takes_queries(raw, k, v, chunk_offsets, true),
                              raw, pass_splits(pass_on_kernel(k, v, raw, chunk_offsets), scale));
    auto pass = forward_pass(s.c, k, raw, v, h0, lay, /*want_w=*/true, kept16);
    s.h = pass.before, s.W = pass.X, s.vnew = pass.Y;
  }
  const ChunkTerms& c = s.c;
  const at::Tensor &h = s.h, &W = s.W, &vnew = s.vnew;
  // dS_C, dV', dW in bf16 only beside the forward's h, W, V' in bf16: the backward's kernels take
  // all six or none (the recomputed forward, whose pass is not the registers kernel, keeps float32);
  // and dO with them, in bf16 (o's gradient is: kept_in_bf16), which those kernels read so.
  const bool all_bf16 = kept16 && h.scalar_type() == at::kBFloat16 && W.scalar_type() == at::kBFloat16 &&
                        vnew.scalar_type() == at::kBFloat16;
  // o left the op in the tokens: its gradient comes back into the chunk layout, on CUDA with the
  // reverse pass's add = s QKG^T dO formed on the way.
  at::Tensor dO, add;
  if (grads[0].defined())
    if (auto x = detail::output_grad_into_chunks(grads[0], c.QKG, lay, scale, tf32, all_bf16))
      dO = x->dO, add = x->add;
  if (!dO.defined())
    dO = grads[0].defined() ? detail::to_chunks(grads[0], lay, beta.scalar_type(), false).contiguous()
                            : at::zeros(vnew.sizes(), beta.options());
  if (all_bf16) dO = dO.to(at::kBFloat16);  // exact: bf16 values (a no-op from the kernel above)
  // For the batched products where the pass does not form add or extra itself.
  const auto dO_float = [&] { return dO.to(beta.scalar_type()); };
  // Without the final state's gradient the reverse pass starts from zero itself (no fill).
  const at::Tensor dfinal = grads[1].defined() ? grads[1].contiguous() : at::Tensor();

  detail::StatePassInputs in = pass_with_keys(k, raw, lay);
  in.last = c.last, in.init = dfinal, in.reverse = true;
  if (c.neg_gamma_k.defined() && in.k_raw.defined()) in.a = c.eta_k, in.b = c.neg_gamma_k, in.scaled_by_keys = true;
  else in.a = c.eta, in.b = -c.gamma;
  in.add = add.defined() ? add : mm(mT(c.QKG), dO_float(), scale);
  if (c.Tt_split.defined()) in.M_split = c.Tt_split;
  else in.M = mT(c.T);  // split as transposed by the CUDA pass, without a copy
  // <dS_C, S0> for the log-gates: in the pass, which holds dS_C, unless the finish kernel forms it
  // from the S0 and dS_C slices it streams for its products anyway (then state_dot stays undefined).
  if (!detail::finish_forms_state_dot(k.size(-1), vnew.size(-1), tf32)) in.dot_with = h;
  // extra = s (diag(gamma) Q)^T dO, in the pass from the raw queries where it can.
  if (raw.queries.defined() && detail::state_pass_takes_queries(in))
    in.q_raw = raw.queries, in.q_factor = query_factor(c, raw, scale), in.dO = dO;
  else
    in.extra = mm(mT(gated_queries(c, q)), dO_float(), scale);
  in.kept_bf16 = all_bf16;
  detail::WyBesidePass beside(in, all_bf16);
  auto bwd = detail::state_pass(in, /*want_x=*/true);
  const at::Tensor &dhC = bwd.before, &dvnew = bwd.X, &dW = bwd.Y;

  // Into the tokens from the raw rows, the finish kernel also forms the WY terms' dq, dk products
  // where it can (wy.split then stands for them; kernels/delta_finish_gradients.cu).
  const bool raw_rows = into && raw.queries.defined() && raw.keys.defined();
  const bool leave_products = raw_rows && detail::finish_takes_wy_split(q.size(-1), vnew.size(-1), tf32);
  detail::WyGrads wy = beside.run(in, bwd, {dvnew, W, dO, vnew}, [&](const detail::WyFactors& f) {
    return detail::wy_backward(c, f, beta, scale, q, k, tf32, &raw, leave_products);
  });
  at::Tensor &dq = wy.dq, &dk = wy.dk;
  detail::FinishInputs fin;
  fin.wy_split = wy.split, fin.gc = c.gc, fin.QKG = c.QKG;
  fin.q = q, fin.k = k, fin.dO = dO, fin.dW = dW, fin.vnew = vnew, fin.h = h, fin.dhC = dhC, fin.tf32 = tf32;
  fin.gamma = c.gamma, fin.eta = c.eta, fin.wy_dgc = wy.dgc, fin.last = c.last, fin.state_dot = bwd.dots;
  fin.scale = scale;
  if (into) {
    fin.tokens = *into;
    if (raw_rows)
      fin.tokens.q_raw = raw.queries, fin.tokens.k_raw = raw.keys, fin.tokens.q_raw_scale = raw.query_scale,
      fin.tokens.k_raw_scale = raw.scale;
  }
  at::Tensor dg = detail::finish_gradients(fin, dq, dk);
  const at::Tensor dh0 = h0.numel() > 0 ? bwd.final_state : at::Tensor();  // none given: no gradient
  if (into) return {at::Tensor(), at::Tensor(), dW, dg, wy.dbeta, dh0};
  return {dq, dk, dW, dg, wy.dbeta, dh0};
}

struct ChunkedDeltaRule : torch::autograd::Function<ChunkedDeltaRule> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& g, const at::Tensor& beta, const at::Tensor& h0, const RawRows& raw,
                               const detail::ChunkLayout& lay, at::ScalarType output, double scale, bool tf32,
                               bool keep) {
    return forward_chunks(ctx, q, k, v, g, beta, h0, raw, lay, output, scale, tf32, keep);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const ChunkGrads d = backward_chunks(ctx, grads, nullptr);
    return {d.dq,         d.dk,         d.dv,         d.dg,         d.dbeta,     d.dh0,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

#ifdef HYBRID_CUDA_KERNELS
// How TokensDeltaRule's tokens stand: the packed qkv with its heads, or q, k and v.
struct TokenArgs {
  bool packed = false;
  QkvHeads heads;
  bool l2norm = false;
};

// Whether every reader of q and k's float32 rows in the chunk layout takes the raw rows and scales
// instead: the chunk terms' kernel, both state passes with the queries (so that no QG is formed),
// wy_backward's raw products and the finish kernel's raw instances (TF32, K = 96 or 128). Then
// the layout writes no float32 q, k (2 x 4 bytes a row element written, and kept for the
// backward) and stand-ins carry their shape.
bool raw_rows_suffice(const detail::QkvWindows& x, const detail::ChunkLayout& lay, bool tf32) {
  const int64_t H = x.k.size(2), K = x.k.size(3), V = x.v.size(3),
                N = static_cast<int64_t>(lay.chunk_offsets.size()) - 1;
  const at::Device device = x.k.device();
  return tf32 && (K == 96 || K == 128) && detail::finish_forms_products(K, V) &&
         detail::state_pass_value_tile(device, H, K, V, N, /*raw_keys=*/true) != 0 &&
         detail::state_pass_takes_queries(device, H, K, V, N, false) &&
         detail::state_pass_takes_queries(device, H, K, V, N, true);
}

// The op from the tokens, the chunk layout inside its node (detail::layout_in_op): tokens is {qkv}
// (packed) or {q, k, v}, [B, T, H, D] bf16. Its backward writes dq and dk straight into the tokens
// from the finish kernel (FinishTokens: the norm's gradient there), and dv where that kernel forms
// its products (it streams dW, which is dv, through shared memory for them; the layout kernel
// otherwise), where a layout node would have read float32 dq, dk and dv back; the packed
// gradient's windows side by side in one tensor, as QkvToChunksFused wrote them.
struct TokensDeltaRule : torch::autograd::Function<TokensDeltaRule> {
  static variable_list forward(AutogradContext* ctx, at::TensorList tokens, const at::Tensor& g, const at::Tensor& beta,
                               const at::Tensor& h0, const TokenArgs& a, const detail::ChunkLayout& lay,
                               at::ScalarType output, double scale, bool tf32, bool keep) {
    const detail::QkvWindows x = windows(tokens, a);
    for (size_t i = 0; i < tokens.size(); ++i) ctx->saved_data["token_shape" + std::to_string(i)] = tokens[i].sizes().vec();
    ctx->saved_data["heads"] = std::vector<int64_t>{a.heads.k_heads, a.heads.k_dim, a.heads.v_heads, a.heads.v_dim};
    ctx->saved_data["packed"] = a.packed;
    ctx->saved_data["l2norm"] = a.l2norm;
    // v straight from the tokens where the forward pass can read it there (rows 16-byte aligned;
    // documents by the layout's runs): the backward needs no v (dv is dW), so the float32 copy
    // would serve the forward pass alone.
    const bool values_in_tokens = detail::state_pass_takes_value_tokens(x.v);
    const detail::ChunkedQkv c =
        detail::qkv_into_chunks(x, lay, a.l2norm, values_in_tokens, !raw_rows_suffice(x, lay, tf32));
    return forward_chunks(ctx, c.q.k, c.keys.k, c.v, g, beta, h0,
                          RawRows{c.keys.raw, c.keys.scale, c.q.raw, c.q.scale, c.v_tokens,
                                  values_in_tokens ? lay.runs : at::Tensor()},
                          lay, output, scale, tf32, keep);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto h = ctx->saved_data["heads"].toIntVector();
    TokenArgs a;
    a.packed = ctx->saved_data["packed"].toBool(), a.heads = QkvHeads{h[0], h[1], h[2], h[3]};
    const auto opt = ctx->get_saved_variables()[0].options().dtype(at::kBFloat16);
    std::vector<at::Tensor> d;
    for (int i = 0; i < (a.packed ? 1 : 3); ++i)
      d.push_back(at::empty(ctx->saved_data["token_shape" + std::to_string(i)].toIntVector(), opt));
    const detail::QkvWindows dx = windows(d, a);
    const detail::ChunkLayout lay = saved_layout(ctx);
    detail::FinishTokens into;
    into.dq = dx.q, into.dk = dx.k, into.gather = lay.gather;
    const bool dv_in_finish = detail::finish_forms_products(dx.k.size(3), dx.v.size(3));
    if (dv_in_finish) into.dv = dx.v;
    if (ctx->saved_data["l2norm"].toBool())
      into.q_scale = ctx->saved_data["q_scale"].toTensor(), into.k_scale = ctx->saved_data["k_scale"].toTensor();
    const ChunkGrads c = backward_chunks(ctx, grads, &into);
    if (!dv_in_finish) {
      at::Tensor dv = dx.v;
      detail::values_into_tokens(c.dv, lay, dv);
    }
    variable_list out(d.begin(), d.end());
    for (const at::Tensor& x : {c.dg, c.dbeta, c.dh0}) out.push_back(x);
    out.resize(out.size() + 6);  // a, lay, output, scale, tf32, keep
    return out;
  }

 private:
  static detail::QkvWindows windows(at::TensorList t, const TokenArgs& a) {
    return a.packed ? detail::windows_of(t[0], a.heads) : detail::QkvWindows{t[0], t[1], t[2]};
  }
};
#endif

// The op on q, k and v, or on the packed qkv they are the windows of (undefined when not packed).
DeltaRuleOutput run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                    const at::Tensor& beta, const DeltaRuleArgs& args, const at::Tensor& qkv, const QkvHeads& heads) {
  // The recurrence runs in float32 (float64 for float64 inputs) whatever autocast says: bf16
  // matmuls in the WY solve and the state pass lose the accuracy the thresholds ask for.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // Without an initial state h0 is empty (no memory, no launch: the autograd nodes take no
  // undefined input), the forward pass starts from zero itself and h0 gets no gradient.
  const detail::Problem p = detail::check_arguments(q, k, v, g, beta, args, /*zero_state=*/false);
  const bool given = p.initial_state.defined();
  const at::Tensor h0 = given ? p.initial_state.contiguous() : at::empty({0}, q.options().dtype(p.compute));
  DeltaRuleOutput out;
  if (p.T == 0) {
    out.o = at::zeros_like(v, v.options().dtype(p.output));
    if (args.output_final_state)
      out.final_state = given ? h0.clone() : at::zeros({p.N, p.Hv, p.K, p.V}, q.options().dtype(p.compute));
    return out;
  }
  const detail::ChunkLayout lay = detail::chunk_layout(p, args.cu_seqlens.has_value(), q.device());
  const detail::Inputs in = detail::prepare_inputs(q, k, v, g, beta, p, args, /*form_gates=*/false);
  // The log-gates and betas formed on their way into the chunk layout.
  const auto [g_chunks, beta_chunks] = detail::gates_in_chunks(in.g, in.beta, args, lay, p.compute);
  // Nothing to keep when no backward will run (inference, or the first forward under activation
  // checkpointing): the forward then skips the extra outputs too.
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (in.q.requires_grad() || in.k.requires_grad() || in.v.requires_grad() ||
                           g_chunks.requires_grad() || beta_chunks.requires_grad() ||
                           h0.requires_grad());
  // The queries' raw rows serve the chunk terms' products (with the raw keys), a forward pass that
  // adds their share of o and a reverse pass that computes `extra` from them, where the passes
  // take them.
  const bool raw_queries = in.q.scalar_type() == at::kBFloat16 && p.compute == at::kFloat;
  const bool keep = args.keep_intermediates && needs_grad;
#ifdef HYBRID_CUDA_KERNELS
  // The layout inside the op's node where its kernels and the finish kernel's token rows serve.
  const bool packed = qkv.defined() && heads.k_heads == heads.v_heads;
  const detail::QkvWindows x = packed ? detail::windows_of(qkv, heads) : detail::QkvWindows{in.q, in.k, in.v};
  // (The finish kernel writes 4 bf16 at a time: the packed rows' width a multiple of 4.)
  if (raw_queries && in.q.size(-1) % 16 == 0 && in.q.size(-1) <= 256 && (!packed || qkv.size(-1) % 4 == 0) &&
      detail::layout_in_op(x, lay, p.compute)) {
    TokenArgs a;
    a.packed = packed, a.heads = heads, a.l2norm = args.qk_l2norm;
    auto res = packed ? TokensDeltaRule::apply(at::TensorList{qkv}, g_chunks, beta_chunks, h0, a, lay, p.output,
                                               p.scale, args.tf32_products, keep)
                      : TokensDeltaRule::apply(at::TensorList{in.q, in.k, in.v}, g_chunks, beta_chunks, h0, a,
                                               lay, p.output, p.scale, args.tf32_products, keep);
    out.o = res[0];
    if (args.output_final_state) out.final_state = res[1];
    return out;
  }
#endif
  std::optional<detail::ChunkedQkv> chunked;
  if (qkv.defined()) chunked = detail::packed_qkv_to_chunks(qkv, heads, lay, p.compute, args.qk_l2norm, raw_queries);
  if (!chunked) chunked = detail::qkv_to_chunks(in.q, in.k, in.v, lay, p.compute, args.qk_l2norm, raw_queries);
  const detail::ChunkedKeys &queries = chunked->q, &keys = chunked->keys;
  auto res = ChunkedDeltaRule::apply(queries.k, keys.k, chunked->v, g_chunks, beta_chunks, h0,
                                     RawRows{keys.raw, keys.scale, queries.raw, queries.scale}, lay, p.output,
                                     p.scale, args.tf32_products, keep);
  out.o = res[0];
  if (args.output_final_state) out.final_state = res[1];
  return out;
}

}  // namespace

DeltaRuleOutput chunk_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& g, const at::Tensor& beta, const DeltaRuleArgs& args) {
  return run(q, k, v, g, beta, args, at::Tensor(), QkvHeads{});
}

DeltaRuleOutput chunk_gated_delta_rule_packed(const at::Tensor& qkv, const QkvHeads& heads, const at::Tensor& g,
                                              const at::Tensor& beta, const DeltaRuleArgs& args) {
  const detail::QkvWindows x = detail::windows_of(qkv, heads);
  return run(x.q, x.k, x.v, g, beta, args, qkv, heads);
}

}  // namespace hybrid::ops
