// On the GPU machine: which shared-memory descriptors make Hopper's wgmma read a B operand laid
// out as the state pass would lay it out, before the pass is rewritten on wgmma (kernel notes,
// "Next" 1). One warpgroup computes D = A B for A [64 x 32] bf16 from registers (the mma.sync
// m16n8k16 A fragment, warp w rows 16w..) and B [32 x 32] bf16 from shared memory in 8 x 8
// "core matrices" (128 contiguous bytes: 8 rows of 16 bytes), with no swizzle, for both
// majors (MN-major: a core-matrix row holds 8 consecutive n of one k, imm-trans-b 1; K-major: 8
// consecutive k of one n, imm-trans-b 0), two placements of the core matrices and both readings
// of the descriptor's two strides (leading / stride byte offset), in two k16 steps (the second
// accumulating, its descriptor's start two k-blocks on). Prints each variant's largest error
// against a float32 reference on the host; the variants at 0 are the layouts to build on.
//   nvcc -gencode=arch=compute_90a,code=sm_90a -o /tmp/wgmma_probe scripts/gpu/wgmma_probe.cu && /tmp/wgmma_probe
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda_check.h"
#include "wgmma.cuh"

constexpr int kM = 64, kK = 32, kN = 32;

// b_core: B's core matrices as laid out on the host (b_elems bf16); k16_bytes: how far the
// second k16 step's descriptor starts after the first's.
template <int kTransB>
__global__ void probe(const uint16_t* a, const uint16_t* b_core, int b_elems, float* d_out, uint32_t lbo,
                      uint32_t sbo, uint32_t k16_bytes) {
  __shared__ __align__(1024) uint16_t bs[2048];
  for (int i = threadIdx.x; i < b_elems; i += blockDim.x) bs[i] = b_core[i];
  __syncthreads();
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, r0 = 16 * warp;
  auto pack = [&](int r, int c) { return static_cast<uint32_t>(a[r * kK + c]) | static_cast<uint32_t>(a[r * kK + c + 1]) << 16; };
  float d[16];
  for (float& x : d) x = 0.f;
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
  for (int step = 0; step < kK / 16; ++step) {
    const int k0 = 16 * step;
    const uint32_t frag[4] = {pack(r0 + g, k0 + 2 * t), pack(r0 + g + 8, k0 + 2 * t), pack(r0 + g, k0 + 2 * t + 8),
                              pack(r0 + g + 8, k0 + 2 * t + 8)};
    const uint32_t b_addr = static_cast<uint32_t>(__cvta_generic_to_shared(bs)) + step * k16_bytes;
    wgmma_m64n32k16<kTransB>(d, frag, wgmma_descriptor(b_addr, lbo, sbo), step);
  }
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  // The accumulator: a stack of m16n8 fragments, n8 block j in d[4j .. 4j + 3].
  for (int j = 0; j < kN / 8; ++j) {
    d_out[(r0 + g) * kN + 8 * j + 2 * t] = d[4 * j], d_out[(r0 + g) * kN + 8 * j + 2 * t + 1] = d[4 * j + 1];
    d_out[(r0 + g + 8) * kN + 8 * j + 2 * t] = d[4 * j + 2], d_out[(r0 + g + 8) * kN + 8 * j + 2 * t + 1] = d[4 * j + 3];
  }
}

int main() {
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> small(-8, 8);  // exact in bf16, exact sums in float32
  std::vector<uint16_t> a(kM * kK), b(kK * kN);
  for (auto& x : a) x = to_bf16(static_cast<float>(small(rng)));
  for (auto& x : b) x = to_bf16(static_cast<float>(small(rng)));
  std::vector<float> ref(kM * kN, 0.f);
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n)
      for (int k = 0; k < kK; ++k) ref[m * kN + n] += from_bf16(a[m * kK + k]) * from_bf16(b[k * kN + n]);

  uint16_t *da, *db;
  float* dd;
  CHECK(cudaMalloc(&da, a.size() * 2));
  CHECK(cudaMalloc(&db, 4096));
  CHECK(cudaMalloc(&dd, ref.size() * 4));
  CHECK(cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice));

  // Core matrix (kb, nb) of B (k in 8 kb .., n in 8 nb ..) at byte kb * step_k + nb * step_n.
  struct Placement {
    const char* name;
    int step_k, step_n;
  };
  const Placement placements[] = {{"n-blocks adjacent", 4 * 128, 128}, {"k-blocks adjacent", 128, 4 * 128}};
  std::printf("| B major | core matrices | LBO | SBO | max error |\n|---|---|---|---|---|\n");
  for (int mn_major = 1; mn_major >= 0; --mn_major)
    for (const Placement& pl : placements) {
      std::vector<uint16_t> core(kK * kN, 0);
      for (int k = 0; k < kK; ++k)
        for (int n = 0; n < kN; ++n) {
          const int base = ((k / 8) * pl.step_k + (n / 8) * pl.step_n) / 2;
          // MN-major: row k % 8 of the core matrix holds n % 8; K-major: row n % 8 holds k % 8.
          const int within = mn_major ? (k % 8) * 8 + n % 8 : (n % 8) * 8 + k % 8;
          core[base + within] = b[k * kN + n];
        }
      CHECK(cudaMemcpy(db, core.data(), core.size() * 2, cudaMemcpyHostToDevice));
      const uint32_t k16_bytes = 2 * pl.step_k;
      const uint32_t strides[2][2] = {{static_cast<uint32_t>(pl.step_k), static_cast<uint32_t>(pl.step_n)},
                                      {static_cast<uint32_t>(pl.step_n), static_cast<uint32_t>(pl.step_k)}};
      for (const auto& s : strides) {
        CHECK(cudaMemset(dd, 0, ref.size() * 4));
        const int elems = static_cast<int>(core.size());
        if (mn_major) probe<1><<<1, 128>>>(da, db, elems, dd, s[0], s[1], k16_bytes);
        else probe<0><<<1, 128>>>(da, db, elems, dd, s[0], s[1], k16_bytes);
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
        std::vector<float> got(ref.size());
        CHECK(cudaMemcpy(got.data(), dd, got.size() * 4, cudaMemcpyDeviceToHost));
        double err = 0;
        for (size_t i = 0; i < got.size(); ++i) err = std::fmax(err, std::fabs(got[i] - ref[i]));
        std::printf("| %s | %s | %u | %u | %g |\n", mn_major ? "MN" : "K", pl.name, s[0], s[1], err);
      }
    }
  return 0;
}
