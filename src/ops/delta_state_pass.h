// The one sequential part of the chunked delta rule: a pass over the chunks of every
// sequence carrying a K x V state per (sequence, head). Forward and backward are both
// instances of it. For each chunk c of sequence n, in order (or in reverse order):
//   before[c] = S
//   X = diag(a) K S + add                 (C x V)
//   Y = M X                               (C x V)
//   S = last * S + extra[c] + K^T diag(b) Y
// S starts at init[n] and ends in final[n].
//   forward:  a = -gamma, add = V, M = T,   b = gamma_C / gamma            (Y = V', before = h)
//   backward: a = gamma_C / gamma, add = P^T dO, M = T^T, b = -gamma,
//             extra = s (diag(gamma) Q)^T dO, init = dS_final             (X = dV', Y = dW)
// Tensors are in the chunk layout: heads first, then all chunks of all sequences.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace hybrid::ops::detail {

// Where a pass that forms the whole output writes it when not in the chunk layout: straight into
// the tokens, [B, T, H, V] contiguous in dtype (bf16 or float32). Chunk row r of a head holds
// token gather[r] (B * T for padding, not written), or with gather undefined the B rows of T
// tokens, each row starting a new chunk (src/ops/delta_chunk_layout.h).
struct OutputTokens {
  bool wanted = false;
  at::Tensor gather;
  int64_t B = 0, T = 0;
  at::ScalarType dtype = at::kBFloat16;
};

// The CUDA kernels of a pass on raw keys at K = 96 or 128 (StatePassInputs::kernel): the mma.sync
// pass, the registers pass with blocks of two 64-column chains (kRegisters) or of one.
enum class StatePassKernel { kFastest, kWarps, kRegisters, kRegistersSingle };
// The kernel a name says: "warps", "registers", "registers-single", or none (null or empty) for
// kFastest; any other name is an error that names `what` (where the name came from, e.g. an
// environment variable).
StatePassKernel state_pass_kernel_named(const char* name, const char* what);

struct StatePassInputs {
  at::Tensor k;      // [H, NC, C, K]
  // Optional (the CUDA pass only): k = diag(k_scale) k_raw with k_raw [H, NC, C, K] exact in bf16
  // and k_scale [H, NC, C] (the L2 norm's factors): the keys' products then need two bf16
  // products instead of three, and no split pass.
  at::Tensor k_raw, k_scale;
  at::Tensor a, b;   // [H, NC, C]
  // With k_raw: a and b already hold the keys' scales (a k_scale, b k_scale: ChunkTerms'
  // neg_gamma_k and eta_k), which the CUDA pass otherwise multiplies in itself.
  bool scaled_by_keys = false;
  at::Tensor last;   // [H, NC]
  at::Tensor add;    // [H, NC, C, V]; the CUDA reverse pass takes it in bf16 too (output_grad's)
  // Optional, forward, CUDA pass (state_pass_takes_value_tokens): add = V from the tokens, bf16
  // [B, T, H, V] (a column window of a wider tensor too), for the layout of the batch's B rows,
  // or with add_token_runs (ChunkLayout::runs, [NC, 2] int64) for documents (B = 1); `add` then
  // only carries the shape and is not read.
  at::Tensor add_tokens, add_token_runs;
  at::Tensor M;      // [H, NC, C, C]
  // Or, for the CUDA pass, M already in split rows (split_rows.h's split_chunk_matrices: int32 of
  // M's shape, swizzled rows; M undefined).
  at::Tensor M_split;
  at::Tensor extra;  // [H, NC, K, V], or undefined for none
  // Optional, only where state_pass_takes_queries says so: the raw queries q_raw [H, NC, C, K] bf16
  // (exact) and their row factors q_factor [H, NC, C]. Reversed, with dO [H, NC, C, V] (float32, or
  // bf16 where o's gradient is: read so where the kept intermediates are kept in bf16): extra =
  // q_raw^T diag(q_factor) dO computed in the pass (extra itself undefined). Forward: also
  // out.O = diag(q_factor) q_raw S for the state S entering each chunk.
  at::Tensor q_raw, q_factor, dO;
  // Optional, forward with q_raw and only where state_pass_forms_output says so: QKG [H, NC, C, C]
  // (the chunks' Q K^T * Gamma): the pass then returns the whole output, out.o = output_scale QKG Y
  // + diag(q_factor) q_raw S, instead of out.O (whose caller adds the first term itself).
  at::Tensor QKG;
  at::Tensor QKG_split;  // optional with QKG: its split rows (ChunkTerms::QKG_split), for the CUDA pass
  double output_scale = 1;
  OutputTokens o_tokens;  // with QKG: out.o in the tokens instead
  // Optional: dot_with [H, NC, K, V], for the dots <before[c], dot_with[c]> (the backward's
  // <dS_C, S0> for the log-gates, read here where dS_C is at hand instead of from both tensors).
  at::Tensor dot_with;
  at::Tensor init;   // [N, H, K, V]; undefined: zeros (the reverse pass without the final state's gradient)
  std::vector<int64_t> chunk_offsets;  // N + 1: sequence n owns chunks [chunk_offsets[n], chunk_offsets[n+1])
  at::Tensor chunk_offsets_on_device;  // optional: the same, int64 on the device (else copied there a pass)
  bool reverse = false;
  // Which CUDA kernel takes the pass where several can: the fastest by measured step times
  // (kFastest), the mma.sync pass (kWarps) or the one with the state in registers (kRegisters: two
  // chains a block; kRegistersSingle: one; state_pass_on_registers); HYBRID_STATE_PASS=warps,
  // =registers or =registers-single in the environment says the same where this is kFastest. The
  // tests hold one against the other.
  StatePassKernel kernel = StatePassKernel::kFastest;
  // false: `before` is not wanted (the CUDA pass then leaves out its stores and returns it
  // undefined; the ATen pass computes it anyway).
  bool want_before = true;
  // false: Y is not wanted (the forward that forms o whole and keeps nothing for a backward): the
  // registers kernel then leaves out its stores and returns it undefined; the other passes store it.
  bool want_y = true;
  // Asks for the kept intermediates (before, X, Y) in bf16, half the bytes stored and read:
  // honoured where the registers kernel takes the pass or the mma.sync one boxes all three
  // (StatePassOutputs' before, X, Y then bf16), reversed only beside dO in bf16; float32 elsewhere.
  bool kept_bf16 = false;
  // Optional, reversed (the CUDA pass): int32 [H NC + 1], zeros, to hand chunks to a reader on
  // another stream as they are done (chunk_ready.cuh): where the pass runs on the registers kernel
  // with one chain a block and keeps bf16, it counts into element hc each chain's chunk hc once its
  // X (dV') is in global memory, and into the last element each of its blocks as it starts;
  // StatePassOutputs::ready_count says whether it did.
  at::Tensor chunk_ready;
};

struct StatePassOutputs {
  at::Tensor before;  // [H, NC, K, V]: the state entering each chunk (in the direction of the pass)
  at::Tensor X;       // [H, NC, C, V], only when asked for
  at::Tensor Y;       // [H, NC, C, V], unless not wanted
  at::Tensor final_state;  // [N, H, K, V]
  at::Tensor dots;  // [H, NC, parts] with dot_with: partial sums of each chunk's dot over its last dim
  at::Tensor O;     // [H, NC, C, V] forward with q_raw, without QKG
  at::Tensor o;     // [H, NC, C, V] forward with QKG, or [B, T, H, V] with o_tokens
  // With chunk_ready, where the pass counts into it: the count each chunk reaches (its chains) and
  // the pass's blocks (which all count as they start); 0 where it does not.
  int ready_count = 0;
  int64_t blocks = 0;
};

// A CUDA kernel for float32 CUDA tensors with K and V multiples of 16 up to 256, ATen ops
// otherwise. All inputs of one dtype.
StatePassOutputs state_pass(const StatePassInputs& in, bool want_x);

// Whether state_pass takes q_raw and q_factor (and dO) on these inputs (everything else filled in,
// and extra too when reversed): the CUDA pass on raw keys, where the queries' shared memory costs
// it no waves of blocks.
bool state_pass_takes_queries(const StatePassInputs& in);
// The same asked before the inputs exist (the forward, deciding whether to keep raw queries): a
// pass in that direction on raw keys over `sequences` sequences of H heads of float32 K x V states.
bool state_pass_takes_queries(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences, bool reverse);

// Whether a forward state_pass with q_raw also takes QKG and returns the whole output (the CUDA
// pass where the shared memory for QKG and Y's split costs it no waves of blocks).
bool state_pass_forms_output(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences);

// Whether a forward state_pass takes StatePassInputs::add_tokens = x, [B, T, H, V] bf16: the CUDA
// pass with 16-byte rows (a token's row of x 16-byte aligned and its strides multiples of 8), the
// batch rows one after another (x's tokens at one stride: a column window of [B, T, W] is).
bool state_pass_takes_value_tokens(const at::Tensor& x);

// Whether the CUDA pass on raw keys can run with the state in registers
// (kernels/delta_state_pass_registers.cuh; StatePassInputs::kernel) in that direction, with the
// queries and (forward) the whole output, without dot_with: K = 96 or 128 and V a multiple of 64
// where the mma.sync pass's wide tiles serve (it then takes the pass by default where its waves
// times its step are the shorter).
bool state_pass_on_registers(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences, bool reverse);

// The value columns a block of the CUDA pass takes on such a pass (64, 48, 32 or 16), 0 where the
// pass runs on ATen ops. raw_keys: keys as bf16 rows (the bf16 training path).
int state_pass_value_tile(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences, bool raw_keys);

#ifdef HYBRID_CUDA_KERNELS
StatePassOutputs state_pass_cuda(const StatePassInputs& in, bool want_x);
bool state_pass_cuda_takes_queries(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences,
                                   bool reverse);
bool state_pass_cuda_forms_output(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences);
int state_pass_cuda_value_tile(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences, bool raw_keys);
bool state_pass_cuda_on_registers(at::Device device, int64_t H, int64_t K, int64_t V, int64_t sequences,
                                  bool reverse);
#endif

}  // namespace hybrid::ops::detail
