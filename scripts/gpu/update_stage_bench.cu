// On the GPU machine: is one stage of the state pass shorter on wgmma? The stage timed is the
// state update S = last S + K^T (diag(b) Y) at K = 96, BV = 32, C = 64 (the OLMo shape's tile),
// with what surrounds it in the pass: Y's split planes written to shared memory (the previous
// stage's epilogue), a barrier, the product, S's split planes written back, a barrier. Keys raw
// bf16 (one plane), Y split (two planes), the state float32 in registers, as in
// kernels/delta_state_pass.cu. Two versions over the same data:
//   mma.sync: the pass's own code (warp_gemm_split, 8 warps, three 16 x 8 state tiles a warp);
//   wgmma:    two warpgroups, m64n32k16, A = K^T from registers (ldmatrix.trans, the mma.sync A
//             fragment), B = Y's planes from shared memory as 8 x 8 core matrices, MN-major,
//             through descriptors with LBO = the core-matrix distance along k and SBO along n
//             (scripts/gpu/wgmma_probe.cu's answer); rows 96..127 of the second warpgroup are
//             zero keys (the padding a K = 96 pass would carry).
// Each runs ITERS stages in 2 blocks an SM on every SM (as the pass at the OLMo shape); prints
// cycles a stage (clock64 in every block, averaged) and the largest relative difference of the
// two final states. The pass's chunk step is three such stages (kernel notes, step 11). Written
// in the twelfth session after its device time was spent: compiles for sm_90a, not yet run.
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -I kernels -o /tmp/update_stage_bench \
//     scripts/gpu/update_stage_bench.cu && /tmp/update_stage_bench
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "bf16_split.cuh"
#include "cuda_check.h"
#include "wgmma.cuh"

using namespace hybrid::ops::detail;

constexpr int kC = 64, kK = 96, kBV = 32, kThreads = 256, kIters = 512;
constexpr int kKeyRow = 2 * (kK + 8);     // bytes: 13 units of 16, odd (no ldmatrix conflicts)
constexpr int kPlaneRow = 2 * (kBV + 8);  // bytes: 5 units of 16
constexpr int kCoreK = 4 * 128;           // core layout: a k-block of 8 rows is 4 n-blocks of 128 bytes
constexpr int kCorePlane = (kC / 8) * kCoreK;
constexpr float kLast = 0.5f;

struct Shared {
  uint8_t keys[kC * kKeyRow];
  uint8_t y_rows[2 * kC * kPlaneRow];  // mma.sync: Y's hi and lo planes in padded rows
  __align__(128) uint8_t y_core[2 * kCorePlane];  // wgmma: the same as core matrices
  uint8_t s_rows[2 * kK * kPlaneRow];  // S's split planes, written back every stage
};

// Y's value at (k, n): fixed, with a lo part (not exact in bf16) so both planes matter.
__device__ __forceinline__ float y_value(int k, int n) { return 0.01f * ((k * 7 + n * 3) % 17 - 8) + 1e-4f * (n + 1); }

// Y's split planes (the previous stage's epilogue), hi at hi + at(k, n) bytes for the pair (k, n),
// (k, n + 1), lo lo_bytes further on.
template <class At>
__device__ __forceinline__ void write_y_planes(uint8_t* hi, int lo_bytes, At at) {
  for (int i = threadIdx.x; i < kC * kBV / 2; i += kThreads) {
    const int k = i / (kBV / 2), n = 2 * (i % (kBV / 2));
    const SplitPair p = split_pair(y_value(k, n), y_value(k, n + 1));
    *reinterpret_cast<uint32_t*>(hi + at(k, n)) = p.hi;
    *reinterpret_cast<uint32_t*>(hi + lo_bytes + at(k, n)) = p.lo;
  }
}

__device__ void load_keys(Shared& sh, const uint16_t* keys) {
  for (int i = threadIdx.x; i < kC * kK; i += kThreads)
    *reinterpret_cast<uint16_t*>(sh.keys + (i / kK) * kKeyRow + 2 * (i % kK)) = keys[i];
}

// S's pair (r, c), (r, c + 1) split into the planes the next stage (X = K S) would read.
__device__ __forceinline__ void store_state_pair(Shared& sh, int r, int c, float s0, float s1) {
  const SplitPair p = split_pair(s0, s1);
  *reinterpret_cast<uint32_t*>(sh.s_rows + r * kPlaneRow + 2 * c) = p.hi;
  *reinterpret_cast<uint32_t*>(sh.s_rows + kK * kPlaneRow + r * kPlaneRow + 2 * c) = p.lo;
}

__global__ void __launch_bounds__(kThreads, 2) stage_mma_sync(const uint16_t* keys, float* out, long long* cycles) {
  extern __shared__ __align__(128) uint8_t smem[];
  Shared& sh = *reinterpret_cast<Shared*>(smem);
  load_keys(sh, keys);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const SplitOperand K_op{shared_address(sh.keys), kKeyRow, 0};
  const SplitOperand Y_op{shared_address(sh.y_rows), kPlaneRow, kC * kPlaneRow};
  constexpr int kTiles = (kK / 16) * (kBV / 8) / 8;  // 16 x 8 state tiles a warp: 3
  auto row0 = [&](int r) { return 16 * ((warp + 8 * r) / (kBV / 8)); };
  auto col0 = [&](int r) { return 8 * ((warp + 8 * r) % (kBV / 8)); };
  float S[kTiles][4] = {};
  __syncthreads();
  const long long start = clock64();
  for (int it = 0; it < kIters; ++it) {
    write_y_planes(sh.y_rows, kC * kPlaneRow, [](int k, int n) { return k * kPlaneRow + 2 * n; });
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kTiles; ++r) {
      float acc[1][2][4] = {};
      warp_gemm_split<1, true, false>(K_op, row0(r), Y_op, col0(r), kC / 16, lane, acc);
#pragma unroll
      for (int e = 0; e < 4; ++e) S[r][e] = kLast * S[r][e] + acc[0][0][e] + acc[0][1][e];
#pragma unroll
      for (int half = 0; half < 2; ++half)
        store_state_pair(sh, row0(r) + g + 8 * half, col0(r) + 2 * t, S[r][2 * half], S[r][2 * half + 1]);
    }
    __syncthreads();
  }
  const long long stop = clock64();
  if (threadIdx.x == 0) cycles[blockIdx.x] = stop - start;
  if (blockIdx.x == 0)
#pragma unroll
    for (int r = 0; r < kTiles; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        out[(row0(r) + g + 8 * (e / 2)) * kBV + col0(r) + 2 * t + e % 2] = S[r][e];
}

__global__ void __launch_bounds__(kThreads, 2) stage_wgmma(const uint16_t* keys, float* out, long long* cycles) {
  extern __shared__ __align__(128) uint8_t smem[];
  Shared& sh = *reinterpret_cast<Shared*>(smem);
  load_keys(sh, keys);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // This warp's 16 rows of the state (of K^T): warpgroup w / 4 holds rows 64 (w / 4) .. + 63.
  const int r0 = 64 * (warp / 4) + 16 * (warp % 4);
  const bool real_rows = r0 < kK;
  const SplitOperand K_op{shared_address(sh.keys), kKeyRow, 0};
  const uint32_t y_hi = shared_address(sh.y_core), y_lo = y_hi + kCorePlane;
  float S[16] = {};  // n8 block j in S[4j .. 4j + 3], the mma.sync layout of each 16 x 8 tile
  __syncthreads();
  const long long start = clock64();
  for (int it = 0; it < kIters; ++it) {
    write_y_planes(sh.y_core, kCorePlane,
                   [](int k, int n) { return (k / 8) * kCoreK + (n / 8) * 128 + (k % 8) * 16 + (n % 8) * 2; });
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // generic stores, then async-proxy reads
    __syncthreads();
    // A = K^T's rows r0 .. + 15 for the four k16 steps, loaded before the first wgmma (its
    // registers must hold until the wait).
    uint32_t a[kC / 16][4] = {};
    const int m = lane / 8, row = lane % 8;
    if (real_rows)
#pragma unroll
      for (int ks = 0; ks < kC / 16; ++ks) ldsm_x4_trans(a[ks], K_op.at(16 * ks + (m / 2) * 8 + row, r0 + (m % 2) * 8));
#pragma unroll
    for (float& s : S) s *= kLast;
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int ks = 0; ks < kC / 16; ++ks) {
      wgmma_m64n32k16<1>(S, a[ks], wgmma_descriptor(y_lo + ks * 2 * kCoreK, kCoreK, 128), 1);  // small terms first
      wgmma_m64n32k16<1>(S, a[ks], wgmma_descriptor(y_hi + ks * 2 * kCoreK, kCoreK, 128), 1);
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    if (real_rows)
#pragma unroll
      for (int j = 0; j < kBV / 8; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          store_state_pair(sh, r0 + g + 8 * half, 8 * j + 2 * t, S[4 * j + 2 * half], S[4 * j + 2 * half + 1]);
    __syncthreads();
  }
  const long long stop = clock64();
  if (threadIdx.x == 0) cycles[blockIdx.x] = stop - start;
  if (blockIdx.x == 0 && real_rows)
#pragma unroll
    for (int e = 0; e < 16; ++e) out[(r0 + g + 8 * ((e % 4) / 2)) * kBV + 8 * (e / 4) + 2 * t + e % 2] = S[e];
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int blocks = 2 * sms;
  std::vector<uint16_t> keys(kC * kK);
  for (int i = 0; i < kC * kK; ++i) {  // bf16 of small values, exact
    const float x = 0.0625f * ((i * 37) % 31 - 15);
    uint32_t u;
    std::memcpy(&u, &x, 4);
    keys[i] = static_cast<uint16_t>(u >> 16);
  }
  uint16_t* dkeys;
  float *out_a, *out_b;
  long long* cycles;
  CHECK(cudaMalloc(&dkeys, keys.size() * 2));
  CHECK(cudaMalloc(&out_a, kK * kBV * 4));
  CHECK(cudaMalloc(&out_b, kK * kBV * 4));
  CHECK(cudaMalloc(&cycles, blocks * sizeof(long long)));
  CHECK(cudaMemcpy(dkeys, keys.data(), keys.size() * 2, cudaMemcpyHostToDevice));
  const int shared = static_cast<int>(sizeof(Shared));
  CHECK(cudaFuncSetAttribute(stage_mma_sync, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  CHECK(cudaFuncSetAttribute(stage_wgmma, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));

  auto run = [&](auto kernel, float* out, const char* name) {
    kernel<<<blocks, kThreads, shared>>>(dkeys, out, cycles);  // warm-up
    cudaEvent_t a, b;
    cudaEventCreate(&a), cudaEventCreate(&b);
    cudaEventRecord(a);
    kernel<<<blocks, kThreads, shared>>>(dkeys, out, cycles);
    cudaEventRecord(b);
    if (cudaEventSynchronize(b) != cudaSuccess) {
      std::printf("%s: %s\n", name, cudaGetErrorString(cudaGetLastError()));
      return 1;
    }
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    std::vector<long long> c(blocks);
    cudaMemcpy(c.data(), cycles, blocks * sizeof(long long), cudaMemcpyDeviceToHost);
    double mean = 0;
    for (long long x : c) mean += static_cast<double>(x) / blocks;
    std::printf("| %s | %.0f | %.3f |\n", name, mean / kIters, 1e3 * ms / kIters);
    return 0;
  };
  std::printf("update stage, K %d BV %d C %d, %d blocks of %d threads, %d stages\n", kK, kBV, kC, blocks, kThreads,
              kIters);
  std::printf("| version | cycles a stage (clock64, block mean) | us a stage (events) |\n|---|---|---|\n");
  if (run(stage_mma_sync, out_a, "mma.sync") || run(stage_wgmma, out_b, "wgmma")) return 1;
  std::vector<float> a(kK * kBV), b(kK * kBV);
  CHECK(cudaMemcpy(a.data(), out_a, a.size() * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(b.data(), out_b, b.size() * 4, cudaMemcpyDeviceToHost));
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i)
    diff = std::fmax(diff, std::fabs(a[i] - b[i])), scale = std::fmax(scale, std::fabs(a[i]));
  std::printf("final states: largest |mma.sync - wgmma| %.3g, largest |S| %.3g\n", diff, scale);
  return 0;
}
