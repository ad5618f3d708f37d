// The parts of the chunked delta rule that every chunk computes on its own (no state), for all
// chunks at once. Per chunk (C = 64 rows), with gc the chunk-local cumulative log-gate:
//   gamma = exp(gc), eta = exp(gc_C - gc), last = gamma_C, Gamma_ij = exp(gc_i - gc_j) (j <= i)
//   KKG = K K^T * Gamma,  Lg = StrictTril(diag(beta) KKG),  Ag = (I + Lg)^-1,
//   T = Ag diag(beta),    QKG = Q K^T * Gamma,    QG = diag(gamma) Q
// and, in the backward, given dT and dP = dO V'^T (s the scale):
//   dQK = s dP * Gamma,  dbeta = colsum(dT * Ag) + rowsum(dLg * KKG),
//   dLg = -StrictTril(Ag^T Tril(dT diag(beta)) Ag^T),  dKK = dLg * diag(beta) Gamma (+ its transpose),
//   dgc = rowsum(Z) - colsum(Z) with Z = s dP * QKG + dLg * Lg   (Gamma_ij moves with gc_i - gc_j).
// Tensors are in the chunk layout: [H, NC, C, D], [H, NC, C, C], gates [H, NC, C].
#pragma once

#include <ATen/ATen.h>

namespace hybrid::ops::detail {

struct ChunkTerms {
  at::Tensor gc, gamma, eta;  // [H, NC, C]
  at::Tensor last;            // [H, NC]
  at::Tensor T, QKG;          // [H, NC, C, C]
  at::Tensor QG;              // [H, NC, C, K]: diag(gamma) Q
  at::Tensor Ag, KKG;         // [H, NC, C, C], only for the backward
  // With PassSplits::T (the CUDA kernel): T as the CUDA state passes take it, in split rows
  // (split_rows.h's split_chunk_matrices: int32 of T's shape, swizzled rows), for the forward pass
  // and (T^T, for_backward) the reverse one, in place of T: the passes then split nothing. With
  // PassSplits::QKG, QKG's split rows too, beside QKG (for the forward pass that forms the whole
  // output).
  at::Tensor T_split, Tt_split, QKG_split;
  // With PassSplits::factors (raw rows on the CUDA kernel): the state passes' row factors with
  // the keys' scales folded in, -gamma sk and eta sk (the forward pass's a and b, the reverse
  // pass's b and a), and the queries' e = s gamma sq [H, NC, C], where ATen ops made them from
  // gamma, eta and the scales at every pass (ten small launches a fwd+bwd).
  at::Tensor neg_gamma_k, eta_k, query_factor;
};

// Which terms the CUDA kernel also writes as the CUDA state passes take them (ChunkTerms' splits).
struct PassSplits {
  bool T = false;    // T_split (and Tt_split) in place of T
  bool QKG = false;  // QKG_split beside QKG
  bool factors = false;  // neg_gamma_k, eta_k and query_factor (with raw rows), the last with `scale`
  double scale = 1;
};

// The keys and queries also as exact bf16 rows and their scales (k = diag(scale) keys, q =
// diag(query_scale) queries), where the chunk layout wrote them (bf16 inputs): [H, NC, C, K] bf16
// and [H, NC, C] float32, or undefined.
struct RawRows {
  at::Tensor keys, scale, queries, query_scale;
  // Optional: v as the tokens hold it (bf16 [B, T, H, V]), which the forward state pass reads in
  // place of the float32 chunk layout's v (StatePassInputs::add_tokens); v is then a stand-in.
  // With documents also the layout's runs (ChunkLayout::runs).
  at::Tensor values, value_runs;
};

// for_backward: also Ag and KKG. want_QG false: QG left undefined (the state passes that take the
// raw queries do without it). With both raw keys and raw queries the CUDA kernel's products take
// them (exact bf16 products) instead of q and k. splits: where the CUDA kernel runs (T and no
// splits elsewhere).
ChunkTerms chunk_terms(const at::Tensor& q, const at::Tensor& k, const at::Tensor& g, const at::Tensor& beta,
                       bool for_backward, bool want_QG = true, const RawRows& raw = {}, PassSplits splits = {});

// These terms' shares of dq and dk come as the products dq = dQK K and dk = dQK^T Q + dKK K
// (dKK symmetric): the CUDA kernel forms them from dQK and dKK in shared memory instead of
// writing both C x C matrices for batched products to read back.
struct WyGrads {
  at::Tensor dq, dk;  // [H, NC, C, K]
  at::Tensor dbeta;   // [H, NC, C]
  at::Tensor dgc;     // [H, NC, C]: these terms' share of the gradient of gc
  // Where the caller left the products to the finish kernel (wy_backward's leave_products) and the
  // CUDA kernel's factor path ran: dq and dk undefined, and instead the C x C operands of their
  // products, S = diag(sq) dQK diag(sk) and R = diag(sk) dKK diag(sk) with the raw rows' scales,
  // split into bf16 hi and lo in swizzled rows (bf16_split.cuh), [H, NC, 2, C, C] as float32 storage:
  //   dq = diag(1/sq) S k_raw,   dk = diag(1/sk) (S^T q_raw + R k_raw)
  // From bf16 factors, where finish_forms_wy_dp, R alone ([H, NC, 1, C, C]): the finish kernel then
  // forms dP = dO V'^T, S from it and dP's share of the gates' gradient (the row sums of s dP * QKG
  // less its column sums), which dgc here leaves out (FinishInputs' gc and QKG).
  at::Tensor split;
};

// The factors of the terms' incoming gradients dT = dV' W^T and dP = dO V'^T ([H, NC, C, V]
// each): the CUDA kernel's raw path forms both products inside (from slices TMA loads, TF32 on
// wgmma), where batched products wrote the two C x C matrices for it to read back.
// dV' as a reverse state pass on another stream writes it, handing its chunks over as they are done
// (StatePassInputs::chunk_ready): the counters, the count each chunk reaches and the pass's blocks
// (StatePassOutputs' ready_count and blocks), over a layout of `sequences` sequences of equal
// chunk counts, the first early_pairs (sequence, head) pairs done before the pass's last wave
// (reverse_pass_order.h). count 0: none.
struct ChunksFromPass {
  at::Tensor counters;
  int count = 0;
  int64_t pass_blocks = 0, sequences = 1;
  int early_pairs = 0;
};
struct WyFactors {
  at::Tensor dvnew, W, dO, vnew;  // float32 (float64), or all four bf16 (the passes' kept copies, o's gradient)
  // Optional (CUDA): dvnew still being written (the CUDA kernel takes each chunk once it is done,
  // in the pass's order: on the SMs the pass leaves, beside it).
  ChunksFromPass from_pass;
};
// The factors in dtype (those in another converted), for the paths that do not take bf16 ones.
WyFactors factors_in(const WyFactors& f, at::ScalarType dtype);

// q, k the chunked queries and keys; tf32: the products dT, dP, dq, dk on TF32 tensor cores (as
// chunk_matmul's), float32 accuracy otherwise. raw (optional): q and k's raw rows and scales,
// which the CUDA kernel's TF32 path reads in their place (K up to 128: half the bytes, and the
// products on bf16 tensor cores from the exact raw rows).
// leave_products: return WyGrads::split instead of dq, dk where the CUDA factor path runs (the
// finish kernel's raw instances at K = 96 and 128 then form them: finish_takes_wy_split).
WyGrads wy_backward(const ChunkTerms& c, const WyFactors& f, const at::Tensor& beta, double scale, const at::Tensor& q,
                    const at::Tensor& k, bool tf32, const RawRows* raw = nullptr, bool leave_products = false);

// The end of the backward, row by row (s the scale), from the products dOh = dO S0^T,
// dWh = dW S0^T and vdh = V' dS_C^T ([H, NC, C, K], formed here: on CUDA inside the kernel):
//   dq += s diag(gamma) dOh,   dk += diag(eta) vdh - diag(gamma) dWh     (in place, or into
//   FinishTokens)
// and returns the gradient of gc ([H, NC, C]) before its reverse cumsum: every gamma- and
// eta-scaled factor contributes <x, dx>, where (diag(gamma) Q S0) . dO = gamma <q, dOh> and
// (diag(gamma) K S0) . dW = gamma <k, dWh>, so no C x V product is needed:
//   dgc_i = s gamma_i <q_i, dOh_i> - gamma_i <k_i, dWh_i> - eta_i <k_i, vdh_i> + wy_dgc_i
//   dgc_C += sum_i eta_i <k_i, vdh_i> + last <dS_C, S0>
// Optional: dq and dk written into the tokens (bf16) instead of updated in place, through the L2
// norm's backward where the chunk layout applied it (CUDA only; to_chunks' gradient done here);
// and dv = dW into the tokens too, where the kernel streams dW for its products anyway
// (finish_forms_products; otherwise dv is left undefined here, for the layout kernel).
struct FinishTokens {
  at::Tensor dq, dk;            // bf16 [B, T, H, K], unit stride in K (windows of one tensor may be)
  at::Tensor dv;                // or undefined: bf16 [B, T, H, V], unit stride in V
  at::Tensor q_scale, k_scale;  // [H, NC, C] float32: the norm's scales (keys_to_chunks), undefined without it
  at::Tensor gather;            // the chunk layout's (undefined: rows of the batch)
  // Optional: q and k's raw rows, bf16 [H, NC, C, K], and their scales, float32 [H, NC, C] (RawRows;
  // scales of 1 without the norm), which the kernels at K = 96 and 128 read in place of
  // FinishInputs' q and k: the same values (q = raw s), half the bytes.
  at::Tensor q_raw, k_raw, q_raw_scale, k_raw_scale;
};

struct FinishInputs {
  at::Tensor q, k;                 // [H, NC, C, K]
  at::Tensor dO, dW, vnew;         // [H, NC, C, V]
  at::Tensor h, dhC;               // [H, NC, K, V]: the state entering each chunk, its gradient leaving it
                                   // (dO, dW, vnew, h, dhC float32, or all five bf16: finish_takes_bf16_kept)
  at::Tensor gamma, eta, wy_dgc;   // [H, NC, C]
  at::Tensor last;                 // [H, NC]
  // [H, NC, parts]: <dS_C, S0> as partial sums (StatePassOutputs::dots); or undefined: formed from h
  // and dhC (on CUDA by the kernel, only where finish_forms_state_dot)
  at::Tensor state_dot;
  double scale = 1;
  bool tf32 = false;               // the three products in TF32 (chunk_matmul.h)
  FinishTokens tokens;             // optional
  // Optional, CUDA: WyGrads::split, the WY terms' dq, dk products left to the finish kernel
  // (finish_takes_wy_split; into the tokens from the raw rows); the dq, dk given are not read then.
  at::Tensor wy_split;
  // With a wy_split of R alone (finish_forms_wy_dp): the chunk terms' gc and QKG ([H, NC, C] and
  // [H, NC, C, C]), from which the kernel forms S and dP's share of the gates' gradient.
  at::Tensor gc, QKG;
};

// The three products dOh, dWh, vdh (chunk_matmul), where no kernel forms them itself.
struct FinishProducts {
  at::Tensor dOh, dWh, vdh;
};
FinishProducts finish_products(const FinishInputs& in);

// dq and dk's last terms (in place, or into in.tokens), and the returned log-gates' gradient dg
// [H, NC, C]: each row's term dgc summed from that row to the chunk's end (dg_i = sum_{j >= i}
// dgc_j: the gates enter as a cumulative sum; on CUDA the kernel sums them).
at::Tensor finish_gradients(const FinishInputs& in, at::Tensor& dq, at::Tensor& dk);

// Whether the CUDA finish kernel can take the WY terms' split operands (FinishInputs::wy_split) at
// this shape: TF32, K = 96 or 128, its products formed, into the tokens from the raw rows. False
// in a build without the CUDA kernels.
bool finish_takes_wy_split(int64_t K, int64_t V, bool tf32);
// Whether the CUDA finish kernel takes dO, dW, V', h and dhC in bf16 (FinishInputs; dO exact in
// bf16 where o left the op so): its instances with the WY terms' products at K = 96, 128
// (finish_takes_wy_split). False in a build without the CUDA kernels; finish_gradients converts
// them to the gates' dtype where its path does not take them.
bool finish_takes_bf16_kept(int64_t K, int64_t V, bool tf32);
// Whether the CUDA finish kernel forms <dS_C, S0> itself from the slices it streams
// (FinishInputs::state_dot left undefined): its TF32 wgmma instances, K = 96 or 128. False in a
// build without the CUDA kernels (the ATen finish forms it from h and dhC when it is absent).
bool finish_forms_state_dot(int64_t K, int64_t V, bool tf32);
// Whether the CUDA finish kernel's bf16 instance with the WY products can also form dP = dO V'^T
// (and from it S) at this shape: K = 96 or 128 with V small enough that dO and V' stay in its
// shared memory whole at two blocks an SM (V = 192 at K = 96 and V = 128 at K = 128 do). wy_backward
// then leaves WyGrads::split R alone. False in a build without the CUDA kernels.
bool finish_forms_wy_dp(int64_t K, int64_t V);

#ifdef HYBRID_CUDA_KERNELS
// float32 CUDA tensors, K a multiple of 16 up to 256.
ChunkTerms chunk_terms_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& g, const at::Tensor& beta,
                            bool for_backward, bool want_QG, const RawRows& raw, PassSplits splits);
WyGrads wy_backward_cuda(const ChunkTerms& c, const WyFactors& f, const at::Tensor& beta, double scale,
                         const at::Tensor& q, const at::Tensor& k, bool tf32, const RawRows* raw, bool leave_products);
// float32 CUDA tensors, K a multiple of 16; dq and dk contiguous. The products are formed in the
// kernel where finish_forms_products(K, V), otherwise given.
bool finish_forms_products(int64_t K, int64_t V);
at::Tensor finish_gradients_cuda(const FinishInputs& in, at::Tensor& dq, at::Tensor& dk,
                                 const FinishProducts* given = nullptr);
#endif

}  // namespace hybrid::ops::detail
