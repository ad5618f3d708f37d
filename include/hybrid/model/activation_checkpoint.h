// Activation checkpointing per block: the forward keeps only the block's input; the backward
// runs the block again with gradients on and back-propagates through it (the reentrant scheme).
// The autocast state of the forward is restored for the recomputation.
#pragma once

#include <ATen/core/Tensor.h>

#include "hybrid/model/packing.h"

namespace hybrid {

class BlockImpl;

at::Tensor checkpointed_block(BlockImpl& block, const at::Tensor& x, const at::Tensor& positions, const Packing* packing);

}  // namespace hybrid
