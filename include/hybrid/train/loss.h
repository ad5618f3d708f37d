// The language-model loss: next-token cross-entropy and the z-loss term (mean squared
// log-partition), computed a block of positions at a time so that no float32 copy of the
// whole [B, T, vocab] logits exists, forward or backward. At a 100k vocabulary and 16k tokens
// a micro batch, one float32 copy is 6 GiB and the plain formula keeps three or four alive.
// On CUDA (all but float64 logits) a kernel reads the logits once a pass instead
// (kernels/lm_loss.cu); a target outside [0, V) makes the loss NaN there, an error elsewhere.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace hybrid {

// logits [B, T, V] (any float dtype; float32 arithmetic inside, float64 for float64), tokens [B, T] int64: position
// t predicts token t + 1. Returns {cross-entropy, z-loss}, both means over the B (T - 1)
// predictions; differentiable with respect to logits (the gradient has logits' dtype).
// block_rows: positions per block of the ATen path (memory per block about 3 x block_rows x V float32).
// gradient_over_logits: the backward writes the gradient into the logits' own memory (one [B, T, V]
// tensor less at the loss's peak, 3 GiB at 16K tokens and a 100k vocabulary); for callers that
// never read the logits after the backward (the trainer).
std::pair<at::Tensor, at::Tensor> lm_loss(const at::Tensor& logits, const at::Tensor& tokens, int64_t block_rows = 1024,
                                          bool gradient_over_logits = false);

}  // namespace hybrid
