// wy_backward beside the reverse state pass (CUDA): where the blocks of the pass's last wave (a
// 64-column chain each, one an SM; its only wave at the benchmark shapes, the second at 7b.yaml's
// and 1b.yaml's micro batches) leave at least as many SMs idle as they hold, wy_backward runs on
// those on a stream of its own, taking each chunk's dV' as the pass hands it over (StatePassInputs::
// chunk_ready; kernels/chunk_ready.cuh; the earlier waves' chunks first: reverse_pass_order.h),
// where it ran after the pass. Why that much room: beside
// the pass its blocks slow the pass's steps (measured in the fifty-fifth session: the reverse pass
// 527 -> 687 us at B2 T16384, 264 -> 303 at the OLMo shape), which the overlap repays at B2 T16384
// (64 blocks on 132 SMs: fwd+bwd -3.6%) and not at the OLMo shape (90 blocks: +0.6%; kernel notes,
// step 55); beside a last wave, 7b.yaml's micro batch gains 1.6% (48 of 180 blocks; 1b.yaml's, 60
// of 192, nothing: step 56). Only over sequences of equal chunk counts (the batch's rows), whose order the kernel
// follows; the results are the same bit for bit (HYBRID_WY_BESIDE_PASS=0 in the environment: after
// the pass, for comparisons and timings). Elsewhere (no CUDA kernels, other shapes) wy_backward
// runs after the pass, as it always did.
#pragma once

#include <cstdint>
#include <functional>

#ifdef HYBRID_CUDA_KERNELS
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "delta_chunk_terms.h"
#include "delta_state_pass.h"

namespace hybrid::ops::detail {

class WyBesidePass {
 public:
  // Made before the reverse pass `in` is launched: zeroed counters in its chunk_ready where it may
  // hand chunks over.
  WyBesidePass(StatePassInputs& in, bool kept_bf16);

  // wy_backward(f) beside the pass `pass` (launched with in): on a stream of its own where the
  // pass hands chunks over, else after it.
  WyGrads run(const StatePassInputs& in, const StatePassOutputs& pass, WyFactors f,
              const std::function<WyGrads(const WyFactors&)>& wy_backward);

 private:
  int64_t sequences_ = 0;
  int early_pairs_ = 0;
#ifdef HYBRID_CUDA_KERNELS
  at::cuda::CUDAEvent inputs_ready_;
#endif
};

#ifdef HYBRID_CUDA_KERNELS
// The stream a device's kernels beside a pass run on: always the same one, because the caching
// allocator reuses a block only on the stream that allocated it: a pool stream taken anew each
// call (32 in turn) would have the outputs made there miss the cache for 32 calls (cudaMalloc on
// the host's path) and then hold up to 32 cached copies of them.
c10::cuda::CUDAStream beside_stream(c10::DeviceIndex device);
#endif

}  // namespace hybrid::ops::detail
