// On the GPU machine: how long is the forward state pass's chunk step at K = 128, BV = 64 when
// every product is a warpgroup product (wgmma) with both operands in shared memory? The probe
// that decides whether the pass is rewritten on wgmma (kernel notes, "Next" 4): the 64-column
// tile of kernels/delta_state_pass_kernel.cuh takes about 6.6 us a step on mma.sync (845 us for
// B8 T4096 H16 K128 V128's forward, two waves of 64 steps, thirty-fourth session).
//
// The step, for the chunk's keys K (C x K, exact in bf16), M (C x C, split into two bf16 planes),
// `add` (C x BV), row factors a, b and the chunk's decay `last`, with S the K x BV float32 state:
//   before = S;  X = diag(a) K S + add;  Y = M X;  S = last S + K^T diag(b) Y
// S, X and diag(b) Y split into hi and lo bf16 planes as the pass splits them (16 significant
// bits), products as the pass forms them: K S two (K exact), M X three (hi hi, hi lo, lo hi),
// K^T (b Y) two. The "output" timings add the forward's output products (q S on S's hi plane, QKG
// Y on Y's hi plane, QKG's two planes: the pass's kWholeOutput), with the keys standing in for the
// queries and M for QKG (their time, not their values), and o stored in bf16.
//
// Block: three warpgroups, 384 threads, one block an SM. Warpgroups 0 and 1 compute: warpgroup w
// holds rows 64 w .. 64 w + 63 of S in m64n64 accumulators (32 floats a thread) and forms columns
// 32 w .. 32 w + 31 of X and Y (m64n32), so that Y = M X needs only its own X (a warpgroup
// barrier), while K S and the update need the other's S and diag(b) Y (a barrier of both).
// Warpgroup 2's first thread copies each chunk's operands a chunk ahead (bulk copies on an
// mbarrier, two buffers; the operands laid out in global memory as in shared memory).
// Shared memory layouts: 8 x 8 bf16 core matrices (128 contiguous bytes), no swizzle
// (scripts/gpu/wgmma_probe.cu): keys [k/8][c/8][c%8][k%8] (A = K is K-major, A = K^T MN-major on
// the same bytes), M's planes [c'/8][c/8][c%8][c'%8] (K-major), the planes of S, X and diag(b) Y
// [k/8][v/8][k%8][v%8] (B, MN-major).
// Prints the relative RMS errors of X, Y, before and the final state against a float64 reference
// on the host (a small case; with K^T's descriptor strides both ways round, the second wrong), then
// the pass's time at B8 T4096 H16 K128 V128 with its stores plain (st.global from the registers),
// by bulk copies of boxes in shared memory, in float32 or bf16, or left out, and its loads from
// DRAM or from L2.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I kernels -o /tmp/wgmma_pass_bench \
//     scripts/gpu/wgmma_pass_bench.cu && /tmp/wgmma_pass_bench
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "bf16_split.cuh"
#include "cp_async.cuh"
#include "cuda_check.h"
#include "../../kernels/wgmma.cuh"

using namespace hybrid::ops::detail;

constexpr int kC = 64, kK = 128, kBV = 64, kThreads = 384;
constexpr int kKeyBytes = kC * kK * 2, kMBytes = 2 * kC * kC * 2, kAddBytes = kC * kBV * 2, kRowBytes = kC * 4;
constexpr int kSPlane = kK * kBV * 2, kXPlane = kC * kBV * 2;
// Shared memory: two buffers of the chunk operands, then the planes.
struct Buffer {
  alignas(128) uint16_t keys[kC * kK];
  alignas(128) uint16_t M[2 * kC * kC];
  alignas(128) uint16_t add[kC * kBV];  // bf16, as V comes from the tokens
  float a[kC], b[kC];
};
struct Shared {
  Buffer buf[2];
  alignas(128) uint16_t S[2 * kK * kBV];   // hi, lo
  alignas(128) uint16_t X[2 * kC * kBV];
  alignas(128) uint16_t bY[2 * kC * kBV];
  alignas(128) uint16_t Yhi[kC * kBV];     // OUTPUT: Y rounded, for QKG Y
  // stores 2: before, X and Y as boxes for bulk stores, in strips of 8 columns ([BV / 8][rows][8]).
  alignas(128) float box_before[kK * kBV];
  alignas(128) float box_X[kC * kBV];
  alignas(128) float box_Y[kC * kBV];
  alignas(8) uint64_t full[2], empty[2];
};

// The descriptor of an operand at shared address p, no swizzle (kernels/wgmma.cuh).
__device__ __forceinline__ uint64_t desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return wgmma_descriptor(static_cast<uint32_t>(__cvta_generic_to_shared(p)), lbo, sbo);
}

// bytes of shared memory to global memory (a contiguous tile), in the thread's current bulk group.
__device__ __forceinline__ void bulk_store_1d(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
               "r"(static_cast<uint32_t>(__cvta_generic_to_shared(src))), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void store_pair(uint16_t* plane_hi, int plane_elems, int k, int n, int n_total, float x0,
                                           float x1, bool split = true) {
  const int off = core_offset(k, n, n_total);
  char* hi = reinterpret_cast<char*>(plane_hi);
  if (split) {
    const SplitPair s = split_pair(x0, x1);
    *reinterpret_cast<uint32_t*>(hi + off) = s.hi;
    *reinterpret_cast<uint32_t*>(hi + 2 * plane_elems + off) = s.lo;
  } else {
    *reinterpret_cast<uint32_t*>(hi + off) = bf16x2(x0, x1);
  }
}

struct Params {
  const uint16_t* keys;  // [H NC][core layout]
  const uint16_t* M;     // [H NC][2 planes, core layout]
  const uint16_t* add;   // [H NC][V / BV][C][BV] bf16
  const float *a, *b, *last;
  const float* init;     // [N][H][K][V]
  // before [H NC][K][V]; X, Y [H NC][C][V]; with bulk stores [H NC][V / BV][BV / 8][rows][8]
  float *before, *X, *Y, *final_state;
  uint16_t* o;  // [H NC][C][V] bf16
  int H, NC, V, chunks_per_sequence;
  int swap_transposed;  // 1: the K^T descriptor's two strides the other way round (a probe of the layout)
  // Probes of where the step's time goes: stores 0 leaves out the stores of before, X, Y and o; 1
  // stores before, X and Y in float32 from the registers, 2 by bulk copies of boxes in shared
  // memory (one thread, one group a step), 3 and 4 the same in bf16 (half the bytes);
  // loads_from_l2 1 copies the first two chunks' operands over and over (L2 hits, no DRAM reads).
  int stores, loads_from_l2;
};

template <bool kOutput>
__global__ void __launch_bounds__(kThreads, 1) wgmma_pass(const Params p) {
  extern __shared__ __align__(1024) char smem_raw[];
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int tile = blockIdx.x, h = blockIdx.y, n = blockIdx.z, v0 = tile * kBV, V = p.V;
  const int64_t first = static_cast<int64_t>(h) * p.NC + static_cast<int64_t>(n) * p.chunks_per_sequence;
  const int steps = p.chunks_per_sequence;
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) mbarrier_init(&sh.full[i], 1), mbarrier_init(&sh.empty[i], 256);
  }
  __syncthreads();

  if (wg == 2) {  // the producer
    if (threadIdx.x != 256) return;
    for (int s = 0; s < steps; ++s) {
      const int bi = s % 2;
      if (s >= 2) mbarrier_wait(&sh.empty[bi], ((s / 2) - 1) & 1);
      const int64_t hc = first + (p.loads_from_l2 ? bi : s);
      Buffer& B = sh.buf[bi];
      mbarrier_arrive_expect_bytes(&sh.full[bi], kKeyBytes + kMBytes + kAddBytes + 2 * kRowBytes);
      bulk_copy(B.keys, p.keys + hc * kC * kK, kKeyBytes, &sh.full[bi]);
      bulk_copy(B.M, p.M + hc * 2 * kC * kC, kMBytes, &sh.full[bi]);
      bulk_copy(B.add, p.add + (hc * (V / kBV) + tile) * kC * kBV, kAddBytes, &sh.full[bi]);
      bulk_copy(B.a, p.a + hc * kC, kRowBytes, &sh.full[bi]);
      bulk_copy(B.b, p.b + hc * kC, kRowBytes, &sh.full[bi]);
    }
    return;
  }

  // f(r, c, d0, d1) for each pair of an m64nN accumulator this thread holds (wgmma.cuh).
  auto pairs = [&](auto& d, int row0, int col0, auto f) {
    for_each_accumulator_pair(d, row0, col0, lane, [&](int, int, int r, int c, float& x0, float& x1) { f(r, c, x0, x1); });
  };
  auto store2 = [](float* at, float x0, float x1) { *reinterpret_cast<float2*>(at) = make_float2(x0, x1); };
  // The kept intermediates (stores 1 and 2 in float32, 3 and 4 in bf16): element i of a tensor
  // of those that starts at `base` (in bf16, the same buffer read as bf16).
  const bool plain = p.stores == 1 || p.stores == 3, bulk = p.stores == 2 || p.stores == 4, half = p.stores >= 3;
  auto keep = [&](float* base, int64_t i, float x0, float x1) {
    if (half) *reinterpret_cast<uint32_t*>(reinterpret_cast<uint16_t*>(base) + i) = bf16x2(x0, x1);
    else store2(base + i, x0, x1);
  };
  // Boxes in strips of 8 columns: (r, c) of a box of `rows` rows at ((c / 8) rows + r) 8 + c % 8.
  auto strip = [](int rows, int r, int c) { return ((c / 8) * rows + r) * 8 + c % 8; };
  const uint32_t element_bytes = half ? 2 : 4;

  // The state: rows 64 wg + 16 warp (+ g, + 8), all 64 columns; X and Y: rows 16 warp (+ g, + 8),
  // columns 32 wg ...
  float S[8][4];
  const int srow = 64 * wg + 16 * warp, xrow = 16 * warp, xcol0 = 32 * wg;
  const float* init = p.init + ((static_cast<int64_t>(n) * p.H + h) * kK) * V + v0;
  pairs(S, srow, 0, [&](int r, int c, float& s0, float& s1) {
    s0 = init[r * V + c], s1 = init[r * V + c + 1];
    store_pair(sh.S, kK * kBV, r, c, kBV, s0, s1);
  });
  fence_async_shared();
  named_barrier(1, 256);

  for (int s = 0; s < steps; ++s) {
    const int bi = s % 2;
    const int64_t hc = first + s;
    Buffer& B = sh.buf[bi];
    mbarrier_wait(&sh.full[bi], (s / 2) & 1);
    const float last = p.last[hc];
    const char *keys = reinterpret_cast<const char*>(B.keys), *Mb = reinterpret_cast<const char*>(B.M);
    constexpr int kMPlane = kC * kC * 2;

    // X = diag(a) K S + add: A = K (K-major: k-blocks 1024 bytes apart, m-blocks 128), B = S's planes.
    float x[4][4];
    [[maybe_unused]] float o[4][4];
    wgmma_fence();
    {
      const char* Sb = reinterpret_cast<const char*>(sh.S) + 128 * (xcol0 / 8);
#pragma unroll
      for (int plane = 0; plane < 2; ++plane)
#pragma unroll
        for (int ks = 0; ks < kK / 16; ++ks)
          wgmma_bf16<4, 0, 1>(x, desc(keys + 2048 * ks, 1024, 128), desc(Sb + plane * kSPlane + 2048 * ks, 1024, 128),
                        plane + ks);
      if constexpr (kOutput)  // q S on S's hi plane (the keys stand in for the queries)
#pragma unroll
        for (int ks = 0; ks < kK / 16; ++ks)
          wgmma_bf16<4, 0, 1>(o, desc(keys + 2048 * ks, 1024, 128), desc(Sb + 2048 * ks, 1024, 128), ks);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(x);
    pairs(x, xrow, xcol0, [&](int r, int c, float& x0, float& x1) {
      const float2 v = bf16x2_floats(*reinterpret_cast<const uint32_t*>(B.add + r * kBV + c));
      x0 = B.a[r] * x0 + v.x, x1 = B.a[r] * x1 + v.y;
      store_pair(sh.X, kC * kBV, r, c, kBV, x0, x1);
      if (bulk) keep(sh.box_X, strip(kC, r, c), x0, x1);
    });
    if (bulk)
      pairs(S, srow, 0, [&](int r, int c, float& s0, float& s1) { keep(sh.box_before, strip(kK, r, c), s0, s1); });
    fence_async_shared();
    named_barrier(2 + wg, 128);  // this warpgroup's X planes complete
    if (plain) {
      const int64_t x_at = hc * kC * V + v0, before_at = hc * kK * V + v0;
      pairs(x, xrow, xcol0, [&](int r, int c, float& x0, float& x1) { keep(p.X, x_at + r * V + c, x0, x1); });
      pairs(S, srow, 0, [&](int r, int c, float& s0, float& s1) { keep(p.before, before_at + r * V + c, s0, s1); });
    }

    // Y = M X: A = M's planes (K-major), B = X's planes, this warpgroup's columns: hi hi, hi lo, lo hi.
    float y[4][4];
    wgmma_fence();
    {
      const char* Xb = reinterpret_cast<const char*>(sh.X) + 128 * (xcol0 / 8);
#pragma unroll
      for (int ks = 0; ks < kC / 16; ++ks) {
        wgmma_bf16<4, 0, 1>(y, desc(Mb + 2048 * ks, 1024, 128), desc(Xb + 2048 * ks, 1024, 128), ks);
        wgmma_bf16<4, 0, 1>(y, desc(Mb + 2048 * ks, 1024, 128), desc(Xb + kXPlane + 2048 * ks, 1024, 128), 1);
        wgmma_bf16<4, 0, 1>(y, desc(Mb + kMPlane + 2048 * ks, 1024, 128), desc(Xb + 2048 * ks, 1024, 128), 1);
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(y);
    pairs(y, xrow, xcol0, [&](int r, int c, float& y0, float& y1) {
      store_pair(sh.bY, kC * kBV, r, c, kBV, B.b[r] * y0, B.b[r] * y1);
      if (bulk) keep(sh.box_Y, strip(kC, r, c), y0, y1);
      if constexpr (kOutput) store_pair(sh.Yhi, kC * kBV, r, c, kBV, y0, y1, false);
    });
    fence_async_shared();
    named_barrier(1, 256);  // diag(b) Y complete, both halves (and the boxes)
    if (bulk && threadIdx.x == 0) {
      const int64_t box = hc * (V / kBV) + tile;
      auto at = [&](float* base, int64_t i) { return reinterpret_cast<char*>(base) + i * element_bytes; };
      bulk_store_1d(at(p.before, box * kK * kBV), sh.box_before, kK * kBV * element_bytes);
      bulk_store_1d(at(p.X, box * kC * kBV), sh.box_X, kC * kBV * element_bytes);
      bulk_store_1d(at(p.Y, box * kC * kBV), sh.box_Y, kC * kBV * element_bytes);
      bulk_stores_commit();
    }
    if (plain) {
      const int64_t y_at = hc * kC * V + v0;
      pairs(y, xrow, xcol0, [&](int r, int c, float& y0, float& y1) { keep(p.Y, y_at + r * V + c, y0, y1); });
    }

    // S = last S + K^T diag(b) Y: A = K^T (MN-major on the keys: k-blocks 128 bytes apart, m-blocks
    // 1024; this warpgroup's rows 64 wg ..), B = diag(b) Y's planes, all 64 columns.
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[j][e] *= last;
    wgmma_fence();
    {
      const uint32_t lbo = p.swap_transposed ? 1024 : 128, sbo = p.swap_transposed ? 128 : 1024;
#pragma unroll
      for (int plane = 0; plane < 2; ++plane)
#pragma unroll
        for (int ks = 0; ks < kC / 16; ++ks)
          wgmma_bf16<8, 1, 1>(S, desc(keys + 8192 * wg + 256 * ks, lbo, sbo),
                        desc(reinterpret_cast<const char*>(sh.bY) + plane * kXPlane + 2048 * ks, 1024, 128), 1);
    }
    if constexpr (kOutput) {  // o += QKG Y on Y's hi plane (M stands in for QKG)
      const char* Yb = reinterpret_cast<const char*>(sh.Yhi) + 128 * (xcol0 / 8);
#pragma unroll
      for (int plane = 0; plane < 2; ++plane)
#pragma unroll
        for (int ks = 0; ks < kC / 16; ++ks)
          wgmma_bf16<4, 0, 1>(o, desc(Mb + plane * kMPlane + 2048 * ks, 1024, 128), desc(Yb + 2048 * ks, 1024, 128), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(S);
    mbarrier_arrive(&sh.empty[bi]);  // this thread is done with the chunk's operands
    pairs(S, srow, 0, [&](int r, int c, float& s0, float& s1) { store_pair(sh.S, kK * kBV, r, c, kBV, s0, s1); });
    if (kOutput && p.stores) {
      wgmma_hold(o);
      uint16_t* out = p.o + hc * kC * V + v0;
      pairs(o, xrow, xcol0, [&](int r, int c, float& o0, float& o1) {
        *reinterpret_cast<uint32_t*>(out + r * V + c) = bf16x2(o0, o1);
      });
    }
    if (bulk && threadIdx.x == 0) bulk_stores_wait_reads();  // the boxes free for the next chunk
    fence_async_shared();
    named_barrier(1, 256);  // S's planes complete for the next chunk's K S
  }
  if (bulk && threadIdx.x == 0) bulk_stores_wait();
  float* fin = p.final_state + ((static_cast<int64_t>(n) * p.H + h) * kK) * V + v0;
  pairs(S, srow, 0, [&](int r, int c, float& s0, float& s1) { store2(fin + r * V + c, s0, s1); });
}

// ---------------------------------------------------------------- host
int core_km(int m, int k, int m_total) { return (k / 8) * (m_total / 8) * 64 + (m / 8) * 64 + (m % 8) * 8 + k % 8; }

struct Problem {
  int B, H, T, V;
  int NC() const { return B * (T / kC); }
  std::vector<float> keys, M, add, a, b, last, init;  // keys [H NC][C][K] (bf16 values), M [H NC][C][C]
};

Problem make(int B, int H, int T, int V, uint32_t seed) {
  Problem pr{B, H, T, V};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  const int64_t chunks = static_cast<int64_t>(H) * pr.NC();
  pr.keys.resize(chunks * kC * kK), pr.M.resize(chunks * kC * kC), pr.add.resize(chunks * kC * V);
  pr.a.resize(chunks * kC), pr.b.resize(chunks * kC), pr.last.resize(chunks);
  pr.init.resize(static_cast<int64_t>(B) * H * kK * V);
  for (auto& x : pr.keys) x = from_bf16(to_bf16(normal(rng) / std::sqrt(static_cast<float>(kK))));
  for (int64_t c = 0; c < chunks; ++c)
    for (int i = 0; i < kC; ++i)
      for (int j = 0; j < kC; ++j) pr.M[(c * kC + i) * kC + j] = i == j ? 1.f : i > j ? 0.1f * normal(rng) : 0.f;
  for (auto& x : pr.add) x = from_bf16(to_bf16(normal(rng)));
  for (auto& x : pr.a) x = -uni(rng);
  for (auto& x : pr.b) x = 0.5f * uni(rng);
  for (auto& x : pr.last) x = 0.5f + 0.5f * uni(rng);
  for (auto& x : pr.init) x = 0.5f * normal(rng);
  return pr;
}

struct Device {
  uint16_t *keys, *M, *add, *o;
  float *a, *b, *last, *init, *before, *X, *Y, *final_state;
};

int upload(const Problem& pr, Device& d) {
  const int64_t chunks = static_cast<int64_t>(pr.H) * pr.NC(), V = pr.V;
  std::vector<uint16_t> keys(chunks * kC * kK), M(chunks * 2 * kC * kC), add(chunks * kC * V);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int i = 0; i < kC; ++i)
      for (int k = 0; k < kK; ++k) keys[c * kC * kK + core_km(i, k, kC)] = to_bf16(pr.keys[(c * kC + i) * kK + k]);
    for (int i = 0; i < kC; ++i)
      for (int j = 0; j < kC; ++j) {
        const float m = pr.M[(c * kC + i) * kC + j];
        const uint16_t hi = to_bf16(m);
        M[c * 2 * kC * kC + core_km(i, j, kC)] = hi;
        M[c * 2 * kC * kC + kC * kC + core_km(i, j, kC)] = to_bf16(m - from_bf16(hi));
      }
    for (int tile = 0; tile < V / kBV; ++tile)
      for (int i = 0; i < kC; ++i)
        for (int j = 0; j < kBV; ++j)
          add[((c * (V / kBV) + tile) * kC + i) * kBV + j] = to_bf16(pr.add[(c * kC + i) * V + tile * kBV + j]);
  }
  const size_t state = static_cast<size_t>(chunks) * kK * V * 4, rows = static_cast<size_t>(chunks) * kC * V * 4;
  CHECK(cudaMalloc(&d.keys, keys.size() * 2));
  CHECK(cudaMalloc(&d.M, M.size() * 2));
  CHECK(cudaMalloc(&d.add, add.size() * 2));
  CHECK(cudaMalloc(&d.a, pr.a.size() * 4));
  CHECK(cudaMalloc(&d.b, pr.b.size() * 4));
  CHECK(cudaMalloc(&d.last, pr.last.size() * 4));
  CHECK(cudaMalloc(&d.init, pr.init.size() * 4));
  CHECK(cudaMalloc(&d.final_state, pr.init.size() * 4));
  CHECK(cudaMalloc(&d.before, state));
  CHECK(cudaMalloc(&d.X, rows));
  CHECK(cudaMalloc(&d.Y, rows));
  CHECK(cudaMalloc(&d.o, rows / 2));
  CHECK(cudaMemcpy(d.keys, keys.data(), keys.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d.M, M.data(), M.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d.add, add.data(), add.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d.a, pr.a.data(), pr.a.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d.b, pr.b.data(), pr.b.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d.last, pr.last.data(), pr.last.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d.init, pr.init.data(), pr.init.size() * 4, cudaMemcpyHostToDevice));
  return 0;
}

template <bool kOutput>
int launch(const Problem& pr, const Device& d, int swap = 0, int stores = 1, int loads_from_l2 = 0) {
  const Params p{d.keys, d.M, d.add, d.a, d.b, d.last, d.init, d.before, d.X, d.Y, d.final_state, d.o,
                 pr.H, pr.NC(), pr.V, pr.T / kC, swap, stores, loads_from_l2};
  CHECK(cudaFuncSetAttribute(wgmma_pass<kOutput>, cudaFuncAttributeMaxDynamicSharedMemorySize, sizeof(Shared)));
  wgmma_pass<kOutput><<<dim3(pr.V / kBV, pr.H, pr.B), kThreads, sizeof(Shared)>>>(p);
  CHECK(cudaGetLastError());
  return 0;
}

// The largest relative RMS error over X, Y, before and the final state, against float64.
int check(const Problem& pr, const Device& d) {
  const int V = pr.V, NC = pr.NC(), per = pr.T / kC;
  const size_t rows = static_cast<size_t>(pr.H) * NC * kC * V, state = static_cast<size_t>(pr.H) * NC * kK * V;
  std::vector<float> X(rows), Y(rows), before(state), fin(pr.init.size());
  CHECK(cudaMemcpy(X.data(), d.X, rows * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(Y.data(), d.Y, rows * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(before.data(), d.before, state * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(fin.data(), d.final_state, fin.size() * 4, cudaMemcpyDeviceToHost));
  double err[4][2] = {};  // sum of squared differences, of squares
  auto acc = [&](int which, double got, double want) {
    err[which][0] += (got - want) * (got - want), err[which][1] += want * want;
  };
  for (int h = 0; h < pr.H; ++h)
    for (int n = 0; n < pr.B; ++n) {
      std::vector<double> S(static_cast<size_t>(kK) * V), x(static_cast<size_t>(kC) * V), y(x.size());
      for (int i = 0; i < kK * V; ++i) S[i] = pr.init[((static_cast<size_t>(n) * pr.H + h) * kK) * V + i];
      for (int s = 0; s < per; ++s) {
        const size_t c = static_cast<size_t>(h) * NC + n * per + s;
        for (int i = 0; i < kK * V; ++i) acc(2, before[c * kK * V + i], S[i]);
        for (int i = 0; i < kC; ++i)
          for (int v = 0; v < V; ++v) {
            double sum = 0;
            for (int k = 0; k < kK; ++k) sum += pr.keys[(c * kC + i) * kK + k] * S[k * V + v];
            x[i * V + v] = pr.a[c * kC + i] * sum + pr.add[(c * kC + i) * V + v];
          }
        for (int i = 0; i < kC; ++i)
          for (int v = 0; v < V; ++v) {
            double sum = 0;
            for (int j = 0; j < kC; ++j) sum += static_cast<double>(pr.M[(c * kC + i) * kC + j]) * x[j * V + v];
            y[i * V + v] = sum;
          }
        for (int i = 0; i < kC * V; ++i) acc(0, X[c * kC * V + i], x[i]), acc(1, Y[c * kC * V + i], y[i]);
        for (int k = 0; k < kK; ++k)
          for (int v = 0; v < V; ++v) {
            double sum = 0;
            for (int i = 0; i < kC; ++i) sum += pr.keys[(c * kC + i) * kK + k] * pr.b[c * kC + i] * y[i * V + v];
            S[k * V + v] = pr.last[c] * S[k * V + v] + sum;
          }
      }
      for (int i = 0; i < kK * V; ++i) acc(3, fin[((static_cast<size_t>(n) * pr.H + h) * kK) * V + i], S[i]);
    }
  const char* names[4] = {"X", "Y", "before", "final state"};
  for (int i = 0; i < 4; ++i) std::printf("relative RMS error %s: %.2e\n", names[i], std::sqrt(err[i][0] / err[i][1]));
  return 0;
}

template <bool kOutput>
int time_pass(const Problem& pr, const Device& d, const char* what, int stores = 1, int loads_from_l2 = 0) {
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i)
    if (launch<kOutput>(pr, d, 0, stores, loads_from_l2)) return 1;
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    CHECK(cudaEventRecord(e0));
    if (launch<kOutput>(pr, d, 0, stores, loads_from_l2)) return 1;
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float m;
    CHECK(cudaEventElapsedTime(&m, e0, e1));
    ms.push_back(m);
  }
  std::sort(ms.begin(), ms.end());
  const double steps = static_cast<double>(pr.T / kC) *
                       std::ceil(static_cast<double>(pr.B) * pr.H * (pr.V / kBV) / 132.0);
  std::printf("| B%d T%d H%d K%d V%d | %s | %.1f us | %.2f us a step (%g sequential steps an SM) |\n", pr.B, pr.T, pr.H,
              kK, pr.V, what, 1e3 * ms[ms.size() / 2], 1e3 * ms[ms.size() / 2] / steps, steps);
  return 0;
}

int main() {
  std::printf("shared memory a block: %zu bytes\n", sizeof(Shared));
  {
    const Problem small = make(2, 2, 512, 128, 1);
    Device d{};
    if (upload(small, d)) return 1;
    for (int swap = 0; swap < 2; ++swap) {
      std::printf("K^T strides %s:\n", swap ? "swapped" : "as K's roles say (LBO along k, SBO along m)");
      if (launch<false>(small, d, swap)) return 1;
      CHECK(cudaDeviceSynchronize());
      if (check(small, d)) return 1;
    }
    if (launch<true>(small, d)) return 1;  // the output products change none of the pass's values
    CHECK(cudaDeviceSynchronize());
    if (check(small, d)) return 1;
  }
  const Problem big = make(8, 16, 4096, 128, 2);
  Device d{};
  if (upload(big, d)) return 1;
  std::printf("| shape | products | pass | step |\n|---|---|---|---|\n");
  if (time_pass<false>(big, d, "chain (K S, M X, update)") || time_pass<true>(big, d, "chain + output (q S, QKG Y)") ||
      time_pass<true>(big, d, "chain + output, before X Y by bulk stores", 2) ||
      time_pass<false>(big, d, "chain, before X Y by bulk stores", 2) ||
      time_pass<true>(big, d, "chain + output, before X Y in bf16, plain", 3) ||
      time_pass<true>(big, d, "chain + output, before X Y in bf16 by bulk stores", 4) ||
      time_pass<true>(big, d, "chain + output, no stores", 0) ||
      time_pass<true>(big, d, "chain + output, loads from L2", 1, 1) ||
      time_pass<true>(big, d, "chain + output, no stores, loads from L2", 0, 1) ||
      time_pass<false>(big, d, "chain, no stores, loads from L2", 0, 1))
    return 1;
  return 0;
}
