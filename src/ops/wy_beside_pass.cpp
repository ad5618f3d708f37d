#include "wy_beside_pass.h"

#ifdef HYBRID_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "reverse_pass_order.h"

namespace hybrid::ops::detail {

#ifdef HYBRID_CUDA_KERNELS
c10::cuda::CUDAStream beside_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(device);
  if (it == streams.end()) it = streams.emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
  return it->second;
}
#endif

WyBesidePass::WyBesidePass(StatePassInputs& in, bool kept_bf16) {
#ifdef HYBRID_CUDA_KERNELS
  const std::vector<int64_t>& offsets = in.chunk_offsets;
  const int64_t H = in.k.size(0), NC = in.k.size(1), N = static_cast<int64_t>(offsets.size()) - 1;
  const char* asked = std::getenv("HYBRID_WY_BESIDE_PASS");
  bool equal = in.k.is_cuda() && kept_bf16 && N >= 1 && NC % N == 0 && !(asked && std::string(asked) == "0");
  for (int64_t n = 0; equal && n <= N; ++n) equal = offsets[n] == n * (NC / N);
  // The pass's blocks where it can hand chunks over: a 64-column chain each, one an SM; its last
  // wave must leave at least as many SMs idle as it holds.
  if (!equal) return;
  const int64_t chains = (in.add.size(3) + 63) / 64, sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (2 * last_wave_blocks(H * N, chains, sms) > sms) return;
  sequences_ = N;
  early_pairs_ = early_pairs(H * N, chains, sms);
  in.chunk_ready = at::zeros({H * NC + 1}, in.k.options().dtype(at::kInt));
  inputs_ready_.record(c10::cuda::getCurrentCUDAStream());
#else
  (void)in, (void)kept_bf16;
#endif
}

WyGrads WyBesidePass::run(const StatePassInputs& in, const StatePassOutputs& pass, WyFactors f,
                          const std::function<WyGrads(const WyFactors&)>& wy_backward) {
#ifdef HYBRID_CUDA_KERNELS
  if (sequences_ > 0 && pass.ready_count > 0) {
    f.from_pass = {in.chunk_ready, pass.ready_count, pass.blocks, sequences_, early_pairs_};
    const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
    const c10::cuda::CUDAStream side = beside_stream(main.device_index());
    inputs_ready_.block(side);
    WyGrads w;
    {
      const c10::cuda::CUDAStreamGuard on_side(side);
      w = wy_backward(f);
    }
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(main);
    // Made on the side stream, used and freed on the main one.
    for (at::Tensor* x : {&w.dq, &w.dk, &w.dbeta, &w.dgc, &w.split})
      if (x->defined()) x->record_stream(main);
    return w;
  }
#endif
  (void)in, (void)pass;
  return wy_backward(f);
}

}  // namespace hybrid::ops::detail
