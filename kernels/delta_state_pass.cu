// The chunked delta rule's sequential state pass (src/ops/delta_state_pass.h) on CUDA, float32:
// for each chunk c of a sequence, in order or reversed, with S the K x BV state tile:
//   before[c] = S;  X = diag(a) K S + add;  Y = M X;  S = last S + extra[c] + K^T diag(b) Y
//
// Tiles: one block of 256 threads per (value tile of BV = 32 or 16 columns, head, sequence;
// 16 when 32 leaves SMs idle);
// state columns are independent, so value tiles never talk. Shared memory holds the state
// tile S (K x BV), the chunk's keys (C x K, C = 64), M (C x C) and X, diag(b) Y (C x BV each),
// at most 132 KB (K = 256). Each thread owns one column j and C * BV / 256 rows of X and Y,
// and one column and 4-row groups of the state; keys are read as float4 broadcasts.
// Plain fp32 FMAs on CUDA cores: the correct baseline the tensor-core version is measured against.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../src/ops/delta_state_pass.h"

namespace hybrid::ops::detail {
namespace {

constexpr int kC = 64;          // chunk length
constexpr int kThreads = 256;

struct Params {
  const float *k, *a, *b, *last, *add, *M, *extra, *init;
  const int64_t* chunk_offsets;
  float *before, *X, *Y, *final_state;
  int H, NC, K, V;
  bool reverse;
};

// acc[r] = sum_l A[row_r][l] B[l][j] over l < n (a multiple of 4), for this thread's rows
// row_r = row0 + (kThreads / BV) r of the row-major A (leading dimension lda) and its column j
// of B ([n][BV] in shared memory). A's rows are read as float4 broadcasts.
template <int BV, int kRows>
__device__ __forceinline__ void rows_times_column(const float* A, int lda, const float* B, int n, int row0, int j,
                                                  float (&acc)[kRows]) {
  constexpr int kRowStride = kThreads / BV;
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  for (int l = 0; l < n; l += 4) {
    const float b0 = B[l * BV + j], b1 = B[(l + 1) * BV + j], b2 = B[(l + 2) * BV + j], b3 = B[(l + 3) * BV + j];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float4 a = *reinterpret_cast<const float4*>(&A[(row0 + kRowStride * r) * lda + l]);
      acc[r] += a.x * b0 + a.y * b1 + a.z * b2 + a.w * b3;
    }
  }
}

template <int BV>
__global__ void __launch_bounds__(kThreads) state_pass_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];
  const int K = p.K, V = p.V, tid = threadIdx.x, j = tid % BV;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  float* S = smem;                 // [K][BV]
  float* keys = S + K * BV;        // [C][K]
  float* Ms = keys + kC * K;       // [C][C]
  float* Xs = Ms + kC * kC;        // [C][BV]
  float* Ys = Xs + kC * BV;        // [C][BV], scaled by b
  float* as = Ys + kC * BV;        // [C]
  float* bs = as + kC;             // [C]

  constexpr int kRowStride = kThreads / BV;  // rows of X / Y: tid / BV + kRowStride * r
  constexpr int kRows = kC / kRowStride;
  const int row0 = tid / BV;

  const int64_t state_base = (static_cast<int64_t>(n) * p.H + h) * K * V + v0 + j;
  for (int kk = row0; kk < K; kk += kRowStride) S[kk * BV + j] = p.init[state_base + static_cast<int64_t>(kk) * V];

  const int64_t begin = p.chunk_offsets[n], end = p.chunk_offsets[n + 1];
  for (int64_t step = 0; step < end - begin; ++step) {
    const int64_t c = p.reverse ? end - 1 - step : begin + step;
    const int64_t hc = static_cast<int64_t>(h) * p.NC + c;  // (head, chunk) index
    __syncthreads();  // the previous chunk is done with keys, Ms, as, bs; S is up to date
    const float4* kg = reinterpret_cast<const float4*>(p.k + hc * kC * K);
    for (int i = tid; i < kC * K / 4; i += kThreads) reinterpret_cast<float4*>(keys)[i] = kg[i];
    const float4* mg = reinterpret_cast<const float4*>(p.M + hc * kC * kC);
    for (int i = tid; i < kC * kC / 4; i += kThreads) reinterpret_cast<float4*>(Ms)[i] = mg[i];
    if (tid < kC) {
      as[tid] = p.a[hc * kC + tid];
      bs[tid] = p.b[hc * kC + tid];
    }
    __syncthreads();

    // X = diag(a) K S + add
    {
      float acc[kRows];
      rows_times_column<BV>(keys, K, S, K, row0, j, acc);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = row0 + kRowStride * r;
        const int64_t at = (hc * kC + i) * V + v0 + j;
        const float x = as[i] * acc[r] + p.add[at];
        Xs[i * BV + j] = x;
        if (p.X) p.X[at] = x;
      }
    }
    __syncthreads();

    // Y = M X; keep diag(b) Y for the state update
    {
      float acc[kRows];
      rows_times_column<BV>(Ms, kC, Xs, kC, row0, j, acc);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = row0 + kRowStride * r;
        p.Y[(hc * kC + i) * V + v0 + j] = acc[r];
        Ys[i * BV + j] = bs[i] * acc[r];
      }
    }
    __syncthreads();

    // S = last S + extra + K^T (diag(b) Y), in groups of 4 state rows per thread
    const float last = p.last[hc];
    const int64_t chunk_state = hc * K * V + v0 + j;
    for (int g4 = row0; g4 < K / 4; g4 += kRowStride) {
      float acc[4] = {};
      for (int i = 0; i < kC; ++i) {
        const float y = Ys[i * BV + j];
        const float4 kv = *reinterpret_cast<const float4*>(&keys[i * K + 4 * g4]);
        acc[0] += kv.x * y, acc[1] += kv.y * y, acc[2] += kv.z * y, acc[3] += kv.w * y;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int kk = 4 * g4 + u;
        const int64_t at = chunk_state + static_cast<int64_t>(kk) * V;
        const float old = S[kk * BV + j];
        p.before[at] = old;
        S[kk * BV + j] = last * old + acc[u] + (p.extra ? p.extra[at] : 0.f);
      }
    }
  }
  __syncthreads();
  for (int kk = row0; kk < K; kk += kRowStride) p.final_state[state_base + static_cast<int64_t>(kk) * V] = S[kk * BV + j];
}

template <int BV>
void launch(const Params& p, int N, cudaStream_t stream) {
  const size_t shared = sizeof(float) * (p.K * BV + kC * p.K + kC * kC + 2 * kC * BV + 2 * kC);
  C10_CUDA_CHECK(cudaFuncSetAttribute(state_pass_kernel<BV>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  state_pass_kernel<BV><<<dim3(p.V / BV, p.H, N), kThreads, shared, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

StatePassOutputs state_pass_cuda(const StatePassInputs& in, bool want_x) {
  const c10::cuda::CUDAGuard guard(in.k.device());
  const int64_t H = in.k.size(0), NC = in.k.size(1), C = in.k.size(2), K = in.k.size(3), V = in.add.size(3);
  TORCH_CHECK(C == kC && K % 16 == 0 && K <= 256 && V % 16 == 0 && V <= 256 && NC < (int64_t{1} << 31),
              "state_pass_cuda: needs chunk 64, K and V multiples of 16 up to 256");
  // Batched ATen results can come back in other layouts (the triangular solve's are column-major).
  auto dense = [](const at::Tensor& t) {
    TORCH_CHECK(!t.defined() || t.scalar_type() == at::kFloat, "state_pass_cuda: float32 inputs");
    return t.defined() ? t.contiguous() : t;
  };
  const at::Tensor k = dense(in.k), a = dense(in.a), b = dense(in.b), last = dense(in.last), add = dense(in.add),
                   M = dense(in.M), extra = dense(in.extra), init = dense(in.init);
  const int64_t N = static_cast<int64_t>(in.chunk_offsets.size()) - 1;
  TORCH_CHECK(N >= 1 && N < 65536 && H < 65536, "state_pass_cuda: at most 65535 sequences and heads");

  StatePassOutputs out;
  out.before = at::empty({H, NC, K, V}, in.add.options());
  out.Y = at::empty({H, NC, C, V}, in.add.options());
  if (want_x) out.X = at::empty({H, NC, C, V}, in.add.options());
  out.final_state = at::empty_like(init);
  at::Tensor offsets = at::tensor(in.chunk_offsets, at::kLong).to(in.k.device());

  Params p{k.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), last.data_ptr<float>(),
           add.data_ptr<float>(), M.data_ptr<float>(), extra.defined() ? extra.data_ptr<float>() : nullptr,
           init.data_ptr<float>(), offsets.data_ptr<int64_t>(), out.before.data_ptr<float>(),
           want_x ? out.X.data_ptr<float>() : nullptr, out.Y.data_ptr<float>(), out.final_state.data_ptr<float>(),
           static_cast<int>(H), static_cast<int>(NC), static_cast<int>(K), static_cast<int>(V), in.reverse};
  auto stream = at::cuda::getCurrentCUDAStream();
  // The pass is latency-bound: when 32-column tiles give fewer than two blocks per SM (the OLMo
  // shape, B*H = 30, has 180), 16-column tiles double the warps in flight.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (V % 32 == 0 && (V / 32) * H * N >= 2 * sms) launch<32>(p, static_cast<int>(N), stream);
  else launch<16>(p, static_cast<int>(N), stream);
  return out;
}

}  // namespace hybrid::ops::detail
