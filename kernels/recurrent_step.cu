// One decoding step of the gated delta rule for every (sequence, value head), in place:
//   S <- exp(g) S;   v' = beta (v - S^T k);   S <- S + k v'^T;   o = scale S^T q
// Shapes: q, k [N, Hk, K]; v [N, Hv, V]; g, beta [N, Hv]; state [N, Hv, K, V] float32;
// o [N, Hv, V] in v's dtype. Value head h reads key head h / (Hv / Hk) (grouped values).
// Generation's step (decode_step_cuda) forms its inputs in the same kernel, from GDN's packed qkv
// row and raw gate inputs: q and k L2-normalised (x / sqrt(sum x^2 + 1e-6)), g = -exp(A_log)
// softplus(a + dt_bias), beta = sigmoid(b) (x 2): one launch a layer and token where the op's
// preparation had been about thirty small ones (a float32 token of a 1b.yaml-size model took 8.9
// ms, launch-bound; docs/benchmarks.md, fiftieth session).
//
// Tiles: one block per (n, h, 32 state columns), 8 warps; lane c owns column c of the block's
// tile and warp w rows w, w + 8, w + 16, ... of it (ceil(K / 8) <= kRows, in registers): a warp
// reads and writes 32 consecutive floats of a row at a time (coalesced), the state is read once
// and written once, and the column sums S^T k and S^T q add the warps' partial sums through shared
// memory. q and k of the block's key head sit in shared memory. Arithmetic in float32. (One
// block per (n, h) walking whole columns, before, used 16 SMs for a 1b.yaml-size model's 16 heads
// at one row and took 11.2 us a layer and token; these blocks take 4.4, docs/benchmarks.md,
// fifty-second session.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "hybrid/ops/delta_rule.h"

namespace hybrid::ops {
namespace {

// Where a step's inputs are: sequence n's q, k and v rows at q + n q_row (elements), key head hk
// at + hk K, value head h at + h V; g and beta of (n, h) at g + n g_row + h and beta + n beta_row
// + h, float32 or (gates_in_input_dtype: GDN's projection output, read in place) in q's dtype, as
// they are or, with A_log (and dt_bias) and beta_from_logit, the gate's and beta's raw inputs.
struct StepInputs {
  const void *q, *k, *v;
  int64_t q_row, k_row, v_row;
  const void *g, *beta;
  int64_t g_row, beta_row;
  bool gates_in_input_dtype;
  const float *A_log, *dt_bias;
  bool l2norm, beta_from_logit;
  float beta_scale;
};

template <class scalar_t>
__device__ float gate_input(const StepInputs& in, const void* p, int64_t row, int n, int h) {
  const int64_t at = n * row + h;
  return in.gates_in_input_dtype ? static_cast<float>(static_cast<const scalar_t*>(p)[at])
                                 : static_cast<const float*>(p)[at];
}

// The sums of x^2 over a block of threads (one per pair: q's and k's), for every thread.
__device__ float2 block_sum(float2 x, float2* partial) {
  for (int offset = 16; offset > 0; offset /= 2) {
    x.x += __shfl_xor_sync(0xffffffffu, x.x, offset);
    x.y += __shfl_xor_sync(0xffffffffu, x.y, offset);
  }
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = x;
  __syncthreads();
  float2 sum = make_float2(0.f, 0.f);
  for (int w = 0; w < (blockDim.x + 31) / 32; ++w) sum.x += partial[w].x, sum.y += partial[w].y;
  return sum;
}

__device__ float softplus(float x) { return x > 20.f ? x : log1pf(__expf(x)); }  // torch's threshold

constexpr int kWarps = 8;

template <class scalar_t, class out_t, int kRows>
__global__ void __launch_bounds__(kWarps * 32)
    recurrent_step_kernel(const StepInputs in, float* __restrict__ state, out_t* __restrict__ o, int Hk, int Hv, int K,
                          int V, float scale) {
  extern __shared__ float qk[];  // q then k of this block's key head, 2K floats
  __shared__ float2 partial[kWarps];
  __shared__ float column_sums[2][kWarps][32];  // S^T k, then S^T q: each warp's share of a column
  const int n = blockIdx.x / Hv, h = blockIdx.x % Hv, hk = h / (Hv / Hk);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, col = blockIdx.y * 32 + lane;
  const scalar_t* qh = static_cast<const scalar_t*>(in.q) + n * in.q_row + static_cast<int64_t>(hk) * K;
  const scalar_t* kh = static_cast<const scalar_t*>(in.k) + n * in.k_row + static_cast<int64_t>(hk) * K;
  float2 squares = make_float2(0.f, 0.f);
  for (int i = threadIdx.x; i < K; i += blockDim.x) {
    const float qi = static_cast<float>(qh[i]), ki = static_cast<float>(kh[i]);
    qk[i] = qi, qk[K + i] = ki;
    squares.x += qi * qi, squares.y += ki * ki;
  }
  if (in.l2norm) {  // block_sum's barrier also orders the writes above before the reads below
    const float2 sum = block_sum(squares, partial);
    const float q_scale = rsqrtf(sum.x + 1e-6f), k_scale = rsqrtf(sum.y + 1e-6f);
    for (int i = threadIdx.x; i < K; i += blockDim.x) qk[i] *= q_scale, qk[K + i] *= k_scale;
  }
  __syncthreads();
  const int64_t nh = static_cast<int64_t>(n) * Hv + h;
  float g = gate_input<scalar_t>(in, in.g, in.g_row, n, h), b = gate_input<scalar_t>(in, in.beta, in.beta_row, n, h);
  if (in.A_log) g = -__expf(in.A_log[h]) * softplus(in.dt_bias ? g + in.dt_bias[h] : g);
  if (in.beta_from_logit) b = in.beta_scale / (1.f + __expf(-b));
  const float a = __expf(g);
  const bool in_columns = col < V;  // the last tile of a V not a multiple of 32 is partly outside
  float* S = state + nh * K * V + col;
  auto row_of = [&](int r) { return warp + r * kWarps; };

  float s[kRows];
  float predicted = 0;  // this warp's share of (a S)^T k for the column
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = row_of(r);
    s[r] = in_columns && i < K ? S[static_cast<int64_t>(i) * V] : 0.f;
    if (i < K) predicted += s[r] * qk[K + i];
  }
  column_sums[0][warp][lane] = predicted;
  __syncthreads();
  predicted = 0;
  for (int w = 0; w < kWarps; ++w) predicted += column_sums[0][w][lane];
  const scalar_t* vh = static_cast<const scalar_t*>(in.v) + n * in.v_row + static_cast<int64_t>(h) * V;
  const float v_new = in_columns ? b * (static_cast<float>(vh[col]) - a * predicted) : 0.f;

  float out = 0;  // this warp's share of S^T q after the update
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = row_of(r);
    if (i >= K) continue;
    s[r] = a * s[r] + qk[K + i] * v_new;
    if (in_columns) S[static_cast<int64_t>(i) * V] = s[r];
    out += s[r] * qk[i];
  }
  column_sums[1][warp][lane] = out;
  __syncthreads();
  if (warp != 0 || !in_columns) return;
  out = 0;
  for (int w = 0; w < kWarps; ++w) out += column_sums[1][w][lane];
  o[nh * V + col] = static_cast<out_t>(scale * out);
}

at::Tensor floats(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

// o [N, Hv, V] in `output`: float32 or the inputs' `dtype` (q's, k's and v's, which must share it),
// rounded once from the float32 sums.
at::Tensor launch_step(const StepInputs& in, at::ScalarType dtype, at::ScalarType output, at::Tensor& state, int64_t N,
                       int64_t Hk, int64_t Hv, int64_t K, int64_t V, double scale) {
  TORCH_CHECK(output == dtype || output == at::kFloat, "recurrent_step_cuda: o in float32 or in its inputs' dtype");
  at::Tensor o = at::empty({N, Hv, V}, state.options().dtype(output));
  const int rows = static_cast<int>((K + kWarps - 1) / kWarps);  // a thread's rows of the state
  TORCH_CHECK(rows <= 32, "recurrent_step_cuda: K up to 256, got ", K);
  const dim3 blocks(static_cast<unsigned>(N * Hv), static_cast<unsigned>((V + 31) / 32));
  const size_t shared = 2 * K * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "recurrent_step_cuda", [&] {
    auto launch = [&](auto* out) {
      using out_t = std::remove_pointer_t<decltype(out)>;
      // Registers for the rows, rounded up to a power of two (unused rows are never loaded).
      const auto kernel = rows <= 4    ? recurrent_step_kernel<scalar_t, out_t, 4>
                          : rows <= 8  ? recurrent_step_kernel<scalar_t, out_t, 8>
                          : rows <= 16 ? recurrent_step_kernel<scalar_t, out_t, 16>
                                       : recurrent_step_kernel<scalar_t, out_t, 32>;
      kernel<<<blocks, kWarps * 32, shared, stream>>>(in, state.data_ptr<float>(), out, Hk, Hv, K, V,
                                                      static_cast<float>(scale));
    };
    if (output == at::kFloat) launch(o.data_ptr<float>());
    else launch(o.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o;
}

}  // namespace

at::Tensor recurrent_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                               const at::Tensor& beta, at::Tensor& state, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0), Hk = q.size(1), K = q.size(2), Hv = v.size(1), V = v.size(2);
  at::Tensor qc = q.contiguous(), kc = k.to(q.scalar_type()).contiguous(), vc = v.to(q.scalar_type()).contiguous();
  const at::Tensor gc = floats(g), bc = floats(beta);
  const StepInputs in{qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), Hk * K, Hk * K, Hv * V, gc.data_ptr<float>(),
                      bc.data_ptr<float>(), Hv, Hv, false, nullptr, nullptr, false, false, 1.f};
  return launch_step(in, q.scalar_type(), q.scalar_type(), state, N, Hk, Hv, K, V, scale).to(v.scalar_type());
}

at::Tensor decode_step_cuda(const at::Tensor& qkv, const QkvHeads& heads, const at::Tensor& g, const at::Tensor& beta,
                            at::Tensor& state, const DeltaRuleArgs& args, double scale, at::ScalarType output) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  const int64_t N = qkv.size(0), Hk = heads.k_heads, K = heads.k_dim, Hv = heads.v_heads, V = heads.v_dim;
  const at::Tensor rows = qkv.stride(-1) == 1 ? qkv : qkv.contiguous();  // [N, 1, 2 Hk K + Hv V]
  const at::ScalarType dtype = rows.scalar_type();
  // g and beta [N, 1, Hv]: windows of GDN's projection output in qkv's dtype are read in place
  // (two copies a layer and token otherwise); anything else as float32 [N, Hv].
  const bool in_place = g.scalar_type() == dtype && beta.scalar_type() == dtype && g.stride(-1) == 1 &&
                        beta.stride(-1) == 1;
  const at::Tensor gc = in_place ? g : floats(g).view({N, Hv}), bc = in_place ? beta : floats(beta).view({N, Hv});
  const at::Tensor A_log = args.A_log ? floats(*args.A_log) : at::Tensor(),
                   dt_bias = args.A_log && args.dt_bias ? floats(*args.dt_bias) : at::Tensor();
  const int64_t row = rows.stride(0), element = rows.element_size();
  const char* base = static_cast<const char*>(rows.data_ptr());
  const StepInputs in{base, base + Hk * K * element, base + 2 * Hk * K * element, row, row, row, gc.data_ptr(),
                      bc.data_ptr(), gc.stride(0), bc.stride(0), in_place,
                      A_log.defined() ? A_log.data_ptr<float>() : nullptr,
                      dt_bias.defined() ? dt_bias.data_ptr<float>() : nullptr,
                      args.qk_l2norm, args.beta_from_logit, args.allow_neg_eigval ? 2.f : 1.f};
  // o rounded once: straight in qkv's dtype where asked for it, else in float32 and then cast.
  return launch_step(in, dtype, output == dtype ? dtype : at::kFloat, state, N, Hk, Hv, K, V, scale).to(output);
}

}  // namespace hybrid::ops
