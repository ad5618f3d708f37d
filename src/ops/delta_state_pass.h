// The one sequential part of the chunked delta rule: a pass over the chunks of every
// sequence carrying a K x V state per (sequence, head). Forward and backward are both
// instances of it. For each chunk c of sequence n, in order (or in reverse order):
//   before[c] = S
//   Y = diag(a) A S + add                 (C x V)
//   S = last * S + extra[c] + B^T diag(b) Y
// S starts at init[n] and ends in final[n]. Two products a chunk: the chunk-local factors
// (the WY inverse T) are folded into A, B and add beforehand, batched over all chunks.
//   forward:  A = w = T diag(gamma) K, a = -1, add = u = T V, B = K, b = gamma_C / gamma
//             (Y = V', before = h)
//   backward: A = K, a = gamma_C / gamma, add = s (Q K^T * Gamma)^T dO, B = w, b = -1,
//             extra = s (diag(gamma) Q)^T dO, init = dS_final      (Y = dV', before = dS_C)
// Tensors are in the chunk layout: heads first, then all chunks of all sequences.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace hybrid::ops::detail {

struct StatePassInputs {
  at::Tensor A, B;   // [H, NC, C, K]
  at::Tensor a, b;   // [H, NC, C]
  at::Tensor last;   // [H, NC]
  at::Tensor add;    // [H, NC, C, V]
  at::Tensor extra;  // [H, NC, K, V], or undefined for none
  at::Tensor init;   // [N, H, K, V]
  std::vector<int64_t> chunk_offsets;  // N + 1: sequence n owns chunks [chunk_offsets[n], chunk_offsets[n+1])
  bool reverse = false;
};

struct StatePassOutputs {
  at::Tensor before;  // [H, NC, K, V]: the state entering each chunk (in the direction of the pass)
  at::Tensor Y;       // [H, NC, C, V]
  at::Tensor final_state;  // [N, H, K, V]
};

// A CUDA kernel for float32 CUDA tensors with K and V multiples of 16 up to 256, ATen ops
// otherwise. All inputs of one dtype.
StatePassOutputs state_pass(const StatePassInputs& in);

#ifdef HYBRID_CUDA_KERNELS
StatePassOutputs state_pass_cuda(const StatePassInputs& in);
#endif

}  // namespace hybrid::ops::detail
