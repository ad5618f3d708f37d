// What the chunked delta rule keeps from its forward for its backward (DeltaRuleArgs::
// keep_intermediates), without torch: the dry run's memory estimate (hybrid_core, which must not
// see torch's headers) reads it, and the CUDA finish kernel picks its instances by the same rule
// (finish_takes_wy_split in kernels/delta_finish_gradients.cu), so the two cannot drift apart.
#pragma once

#include <cstdint>

namespace hybrid::ops {

// Whether the CUDA kernels keep the states entering each chunk, W and V' in bf16 when the op's
// output is bf16: TF32 products at K = 96 or 128, V a multiple of 8, the shapes whose finish
// kernel and WY backward take the WY split operands and read the kept values in bf16.
constexpr bool kernels_keep_bf16(int64_t K, int64_t V, bool tf32_products) {
  return tf32_products && (K == 96 || K == 128) && V % 8 == 0;
}

// Bytes a token and value head kept, for chunks of C = 64: K V / C + 2 V values (the states, W
// and V') in bf16 where the op runs on the CUDA kernels with a bf16 output (cuda_bf16: GDN under
// bf16 autocast on a GPU) and kernels_keep_bf16, float32 otherwise; K + 4 C + 3 float32 values
// besides (diag(gamma) Q's factors, the chunk's C x C terms, the gates).
constexpr double delta_rule_kept_bytes(int64_t K, int64_t V, bool cuda_bf16, bool tf32_products) {
  const double C = 64, k = static_cast<double>(K), v = static_cast<double>(V);
  const double kept = cuda_bf16 && kernels_keep_bf16(K, V, tf32_products) ? 2 : 4;
  return kept * (k * v / C + 2 * v) + 4 * (k + 4 * C + 3);
}

}  // namespace hybrid::ops
