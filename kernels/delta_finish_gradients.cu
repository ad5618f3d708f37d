// The end of the chunked delta rule's backward (finish_gradients, src/ops/delta_chunk_terms.h)
// on CUDA, float32, one block of 8 warps per (head, chunk) of C = 64 rows:
//   dOh = dO S0^T,  dWh = dW S0^T,  vdh = V' dS_C^T                            (C x K each)
//   dq += s diag(gamma) dOh,  dk += diag(eta) vdh - diag(gamma) dWh            (in place)
//   dgc_i = s gamma_i <q_i, dOh_i> - gamma_i <k_i, dWh_i> - eta_i <k_i, vdh_i> + wy_dgc_i
//   dgc_C += sum_i eta_i <k_i, vdh_i> + last <dS_C, S0>
//   dg_i = sum_{j >= i} dgc_j                                  (the log-gates' gradient, written)
// (<dS_C, S0> comes as the reverse state pass's partial sums, one a value tile, or the wgmma
// instances form it from the S0 and dS_C slices they stream: finish_forms_state_dot.)
//
// The products (finish_products_kernel, K a multiple of 16 up to 128, V of 8): the value
// dimension streams through shared memory in slices of 16 columns, three stages in flight by
// cp.async (or up to K = 96 32 columns, two stages: products_slice): dO, dW and V' as C x 16,
// S0 and dS_C as K x 16, rows padded to 20 (36) floats (the fragments' 4 g + t lanes then fall
// on distinct banks). Warp w computes rows 16 (w % 4) .. + 15
// and columns (K / 2)(w / 4) .. + K / 2 - 1 of all three (S0's fragments serve two), TF32
// mma.sync where DeltaRuleArgs::tf32_products allows it, as cuBLAS's TF32 products did, 3xTF32
// otherwise; at K = 96 and 128 with TF32, warpgroup products (wgmma) on slices that TMA loads
// (finish_products_kernel's kWgmma). The results go through shared memory (rows of K + 4 floats)
// to the row pass. Batched
// products wrote the three C x K matrices for this kernel to read back, at neither a flop nor a
// byte ceiling (outputs 96 wide in tiles of 128: the largest product of the op's backward).
//
// The row pass: warp w takes rows w, w + 8, ..., its lanes float4 columns of the row, the three
// row dots reduce by shuffles. The rows' sum reduces over warps in shared memory and the dot's
// partial sums are added in a fixed order, so the result is deterministic. Without the products
// (K above 128) finish_kernel runs the row pass on products given.
//
// Into the tokens (kTokens, FinishTokens): the finished rows of dq and dk stay in registers and
// go out in bf16 straight into the tokens' gradients, through the L2 norm's backward where the
// layout applied it (y = s x the normalised row, s its scale):
//   dx = s (dy - y <y, dy>)                                     (dy without the norm)
// in place of the float32 rows the layout kernel read back to do the same (chunk_tokens.cuh
// gives each chunk row's token; padding rows have none). And dv = dW (FinishTokens::dv): each
// slice of dW, once in shared memory for the products, also goes out in bf16 into the tokens (a
// thread four columns of a row), where the layout kernel read dW back for it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "../src/ops/delta_chunk_terms.h"
#include "hybrid/ops/delta_rule_memory.h"
#include "bf16_split.cuh"
#include "chunk_tokens.cuh"
#include "cp_async.cuh"
#include "reductions.cuh"
#include "tensor_map.h"
#include "tf32x3.cuh"
#include "vector_access.cuh"
#include "wgmma.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kC = 64;
constexpr int kWarps = kCopyWarps;  // 8: copy_async's blocks
constexpr int kThreads = 32 * kWarps;
// The products' slices of the value dimension (columns), their rows padded by 4 floats, and
// the stages in flight: 16 columns in three stages, or where two blocks an SM still fit (K up to
// 96) 32 columns in two: half the barriers, and twice the products between two of them.
__host__ __device__ constexpr int slice_ld(int slice) { return slice + 4; }
__host__ __device__ constexpr int slice_stages(int slice, bool kept16 = false) {
  return slice == 32 && !kept16 ? 2 : 3;
}
int products_slice(int K) { return K <= 96 ? 32 : 16; }
// The slices of the bf16 instances (kept16): 32 columns (64-byte rows) in three stages, half the
// float32 slices' bytes.
constexpr int kKept16Slice = 32;
constexpr int kMaxTiles = 8;  // 8-column tiles a warp: K / 16, so K up to 128
constexpr int kMaxPieces = 2;  // float4 pieces of a row a lane: K up to 256

// Where kTokens writes dq and dk: bf16 [B, T, H, K] with these element strides (batch, token, head).
struct TokenRows {
  uint16_t* at;
  int64_t batch, token, head;
};

struct Params {
  const float *q, *k, *gamma, *eta, *wy_dgc, *last;
  const float* state_dot;  // [H, NC, parts], or null: formed from the slices (the wgmma instances)
  const float *dOh, *dWh, *vdh;         // finish_kernel: [H, NC, C, K]
  const float *dO, *dW, *vnew, *h, *dh;  // finish_products_kernel: [H, NC, C, V], [H, NC, K, V]
  float *dq, *dk, *dgc;
  // kTokens: dq and dk into these, through the norm's backward with the rows' scales (null: none);
  // dv = dW into dv_tokens (at null: not here) by finish_products_kernel
  TokenRows dq_tokens, dk_tokens, dv_tokens;
  const float *q_scale, *k_scale;  // [H, NC, C]
  // kRaw: q and k's raw bf16 rows [H, NC, C, K] and their scales [H, NC, C], read in place of q, k
  const uint16_t *q_raw, *k_raw;
  const float *q_raw_scale, *k_raw_scale;
  // kWy: the WY terms' product operands S and R (WyGrads::split, [H, NC, 2, C, C]) in place of dq, dk
  const float* wy_split;
  ChunkTokens tokens;
  int64_t NC;
  int K, V, parts;
  float scale;
};

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
// x + a * y, element-wise
__device__ __forceinline__ float4 axpy4(float4 x, float a, float4 y) {
  return make_float4(x.x + a * y.x, x.y + a * y.y, x.z + a * y.z, x.w + a * y.w);
}

// Where a chunk row's token row starts in `out` (head 0), or -1 for padding.
__device__ __forceinline__ int64_t token_offset(const TokenRows& out, Token tok) {
  return tok.b < 0 ? -1 : tok.b * out.batch + tok.t * out.token;
}

// A finished row's pieces into its token (`at`, token_offset's; -1: none): dx = s (dy - y <y, dy>),
// or dy (null scale).
__device__ __forceinline__ void row_to_token(const TokenRows& out, int64_t at, int64_t h, const float* scale,
                                             int64_t row, const float4 (&y)[kMaxPieces],
                                             const float4 (&dy)[kMaxPieces], int K4) {
  const int lane = threadIdx.x % 32;
  float ydy = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxPieces; ++i)
    if (lane + 32 * i < K4) ydy += dot4(y[i], dy[i]);
  ydy = warp_sum(ydy);
  if (at < 0) return;  // padding: no token
  const float s = scale ? scale[row] : 1.f, c = scale ? -ydy : 0.f;
  uint16_t* to = out.at + at + h * out.head;
#pragma unroll
  for (int i = 0; i < kMaxPieces; ++i) {
    const int f = lane + 32 * i;
    if (f >= K4) break;
    const float4 x = axpy4(dy[i], c, y[i]);
    *reinterpret_cast<uint2*>(to + 4 * f) = make_uint2(bf16x2(s * x.x, s * x.y), bf16x2(s * x.z, s * x.w));
  }
}

// A row's inputs from global memory in the row pass: its q, k and the dq, dk so far (float4
// pieces a lane), gamma, eta and the WY terms' share of its dgc. With kRaw, q and k as the raw
// bf16 rows' pieces and the rows' scales, widened where used: q = raw s is bit for bit the
// layout kernel's float32 row (one rounding, the same product), from half the bytes.
template <bool kRaw>
struct RowInputs {
  using Piece = std::conditional_t<kRaw, uint2, float4>;
  Piece q[kMaxPieces], k[kMaxPieces];
  float4 dq[kMaxPieces], dk[kMaxPieces];
  float gamma, eta, wy_dgc;
  float q_scale, k_scale;  // kRaw
};

__device__ __forceinline__ float4 row_piece(float4 x, float) { return x; }
__device__ __forceinline__ float4 row_piece(uint2 raw, float s) {
  const float4 x = bf16x4_floats(raw);
  return make_float4(x.x * s, x.y * s, x.z * s, x.w * s);
}

template <bool kRaw>
__device__ __forceinline__ void fetch_row(const Params& p, int64_t row, int K, RowInputs<kRaw>& x) {
  const int lane = threadIdx.x % 32;
  x.gamma = p.gamma[row], x.eta = p.eta[row], x.wy_dgc = p.wy_dgc[row];
  if constexpr (kRaw) x.q_scale = p.q_raw_scale[row], x.k_scale = p.k_raw_scale[row];
#pragma unroll
  for (int i = 0; i < kMaxPieces; ++i) {
    const int f = lane + 32 * i;
    if (f >= K / 4) break;
    const int64_t at = row * K + 4 * f;
    if constexpr (kRaw) {
      x.q[i] = *reinterpret_cast<const uint2*>(p.q_raw + at), x.k[i] = *reinterpret_cast<const uint2*>(p.k_raw + at);
    } else {
      x.q[i] = ld4(p.q + at), x.k[i] = ld4(p.k + at);
    }
    x.dq[i] = ld4(p.dq + at), x.dk[i] = ld4(p.dk + at);
  }
}

// A row's dgc before the last row's sums: s gamma <q, dOh> - gamma <k, dWh> - eta <k, vdh> + wy_dgc.
__device__ __forceinline__ float row_gate_grad(const Params& p, float gamma, float eta, float qa, float kb, float ke,
                                               float wy_dgc) {
  return gamma * (p.scale * qa - kb) - eta * ke + wy_dgc;
}
// <dS_C, S0> of chunk hc: the state pass's partial sums, or without them the block's warps' parts
// (dot_parts, shared memory: the wgmma instances form them from the slices).
__device__ __forceinline__ float state_dot_of(const Params& p, int64_t hc, const float* dot_parts) {
  float hd = 0.f;
  if (p.state_dot)
    for (int j = 0; j < p.parts; ++j) hd += p.state_dot[hc * p.parts + j];
  else
    for (int w = 0; w < kWarps; ++w) hd += dot_parts[w];
  return hd;
}

// The log-gates' gradient of the chunk's rows, dg_r = the sum of rows r .. C - 1's terms x (thread
// r < C holding row r's; every thread takes part): warps 0 and 1 scan their rows from the end, and
// warp 0 adds warp 1's total, in a fixed order; `scratch` a float of shared memory the block's
// other threads may have read (two barriers here). Where ATen's flip, cumsum and flip did it after
// the kernel: three launches a layer's backward.
__device__ __forceinline__ void write_gate_grad(const Params& p, int64_t hc, float x, float* scratch) {
  static_assert(kC == 64 && kWarps >= 2, "two warps' rows");
  const int tid = threadIdx.x;
  if (tid < kC) x = warp_suffix_sum(x);
  __syncthreads();  // scratch's earlier readers are done
  if (tid == 32) scratch[0] = x;
  __syncthreads();
  if (tid < kC) p.dgc[hc * kC + tid] = tid < 32 ? x + scratch[0] : x;
}

// The row pass of chunk hc, its dOh, dWh and vdh at A, B and E (row stride ld; global or shared);
// K is p.K, or the constant of an instance compiled for it. dot_parts: without p.state_dot, the
// block's warps' partial sums of <dS_C, S0> (shared memory, read after the pass's barrier).
// A warp's next kAhead rows are fetched while this one's dots reduce: the loads of one row alone
// left the warps waiting on memory at every row (a block's 64 rows come after all of its
// products). Two rows ahead fit the products kernel's 128 registers only where K is a constant.
template <bool kTokens, int kAhead, bool kRaw>
__device__ __forceinline__ void finish_rows(const Params& p, int64_t hc, const float* A, const float* B,
                                            const float* E, int ld, int K, const float* dot_parts = nullptr) {
  __shared__ float row_dgc[kC], warp_total[kWarps];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int K4 = K / 4;

  float to_end = 0.f;  // this warp's rows' eta <k, vdh>
  constexpr int kRows = kC / kWarps;  // rows a warp
  RowInputs<kRaw> ahead[kAhead];
#pragma unroll
  for (int i = 0; i < kAhead; ++i) fetch_row(p, hc * kC + warp + kWarps * i, K, ahead[i]);
#pragma unroll(kAhead > 1 ? kRows : 1)  // unrolled, the ring's places are registers
  for (int i = 0; i < kRows; ++i) {
    const int r = warp + kWarps * i;
    const int64_t row = hc * kC + r;
    const RowInputs<kRaw> x = ahead[i % kAhead];
    if (i + kAhead < kRows) fetch_row(p, row + kAhead * kWarps, K, ahead[i % kAhead]);
    float qa = 0.f, kb = 0.f, ke = 0.f;
    float4 qs[kMaxPieces], ks[kMaxPieces], dqs[kMaxPieces], dks[kMaxPieces];  // kTokens: the finished rows
#pragma unroll
    for (int i = 0; i < kMaxPieces; ++i) {
      const int f = lane + 32 * i;
      if (f >= K4) break;
      const int64_t at = row * K + 4 * f;
      const int in = r * ld + 4 * f;
      const float4 a = ld4(A + in), b = ld4(B + in), e = ld4(E + in);
      qs[i] = row_piece(x.q[i], x.q_scale), ks[i] = row_piece(x.k[i], x.k_scale);
      qa += dot4(qs[i], a), kb += dot4(ks[i], b), ke += dot4(ks[i], e);
      const float4 dq = axpy4(x.dq[i], p.scale * x.gamma, a), dk = axpy4(axpy4(x.dk[i], x.eta, e), -x.gamma, b);
      if constexpr (kTokens) {
        dqs[i] = dq, dks[i] = dk;
      } else {
        *reinterpret_cast<float4*>(p.dq + at) = dq;
        *reinterpret_cast<float4*>(p.dk + at) = dk;
      }
    }
    qa = warp_sum(qa), kb = warp_sum(kb), ke = warp_sum(ke);
    to_end += x.eta * ke;
    if (lane == 0) row_dgc[r] = row_gate_grad(p, x.gamma, x.eta, qa, kb, ke, x.wy_dgc);
    if constexpr (kTokens) {
      const Token tok = token_of(p.tokens, (hc % p.NC) * kC + r);
      row_to_token(p.dq_tokens, token_offset(p.dq_tokens, tok), hc / p.NC, p.q_scale, row, qs, dqs, K4);
      row_to_token(p.dk_tokens, token_offset(p.dk_tokens, tok), hc / p.NC, p.k_scale, row, ks, dks, K4);
    }
  }

  if (lane == 0) warp_total[warp] = to_end;
  __syncthreads();
  float x = 0.f;
  if (tid < kC) {
    x = row_dgc[tid];
    if (tid == kC - 1) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) x += warp_total[w];
      x += p.last[hc] * state_dot_of(p, hc, dot_parts);
    }
  }
  write_gate_grad(p, hc, x, warp_total);
}

// kWy's shared memory from the aligned start: S and R (two 16 KiB blocks of split rows) until the
// products are done, then dq in their place; dk from its offset on (C x K floats each, rows
// swizzled: float4 piece f of row r at f ^ (r % 8)); then the raw query and key rows (rows of
// 2 K + 16 bytes, an odd number of 16-byte units: ldmatrix's rows on distinct banks).
__host__ __device__ constexpr int wy_raw_row_bytes(int K) { return 2 * K + 16; }
__host__ __device__ constexpr int wy_dk_offset(int K) { return kC * K > 2 * kC * kC ? kC * K : 2 * kC * kC; }
__host__ __device__ constexpr size_t wy_epilogue_bytes(int K) {
  return sizeof(float) * (wy_dk_offset(K) + kC * K) + 2 * kC * wy_raw_row_bytes(K);
}

// The end of the wgmma instances into the tokens given the WY terms' S and R (kWy): with dOh, dWh,
// vdh in this warp's accumulators (rows 16 (w % 4) .. + 15, columns (K / 2)(w / 4) + 8 n + 2 t ..),
//   the row dots and dgc from the accumulators,
//   dq = diag(1/sq) (S k_raw + diag(s gamma sq) dOh),  dk = diag(1/sk) (S^T q_raw + R k_raw + diag(sk) (diag(eta) vdh
//   - diag(gamma) dWh)),
// the products bf16 mma.sync on S and R's split rows (as wy_backward's raw products), accumulated on the
// scaled accumulators; then the rows into the tokens through the norm's backward. wy_backward then
// writes S and R (32 KiB a chunk) where it wrote float32 dq and dk (2 C K floats) for this kernel to
// read back, and neither kernel reads the raw rows twice from memory.
template <int kK>
__device__ __forceinline__ void finish_with_wy_products(const Params& p, int64_t hc, float* smem,
                                                        float (&dOh)[kMaxTiles][4], float (&dWh)[kMaxTiles][4],
                                                        float (&vdh)[kMaxTiles][4], const float* dot_parts) {
  constexpr int K = kK, kTiles = K / 16, kRawBytes = wy_raw_row_bytes(K);
  __shared__ float gammas[kC], etas[kC], sqs[kC], sks[kC], dots[2][kC][3], row_dgc[kC];
  __shared__ int64_t dq_at[kC], dk_at[kC];  // token_offset's, once a row (not by every lane of the row pass)
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int r0 = 16 * (warp % 4), c0 = (K / 2) * (warp / 4);
  float *dq_s = smem, *dk_s = smem + wy_dk_offset(K), *S = smem, *R = smem + kC * kC;
  char* Qr = reinterpret_cast<char*>(dk_s + kC * K);
  char* Kr = Qr + kC * kRawBytes;
  // S and R, and the raw rows, by cp.async (the stages are free: the caller's barrier).
  copy_async(S, kC, p.wy_split + 2 * hc * kC * kC, kC, 2 * kC, row_pieces(kC));
  copy_async(reinterpret_cast<float*>(Qr), kRawBytes / 4, reinterpret_cast<const float*>(p.q_raw + hc * kC * K), K / 2,
             kC, row_pieces(K / 2));
  copy_async(reinterpret_cast<float*>(Kr), kRawBytes / 4, reinterpret_cast<const float*>(p.k_raw + hc * kC * K), K / 2,
             kC, row_pieces(K / 2));
  cp_async_commit();
  if (tid < kC) {
    const int64_t row = hc * kC + tid;
    gammas[tid] = p.gamma[row], etas[tid] = p.eta[row], sqs[tid] = p.q_raw_scale[row], sks[tid] = p.k_raw_scale[row];
  }
  cp_async_wait_all();
  __syncthreads();

  // The row dots <q, dOh>, <k, dWh>, <k, vdh> (q = sq q_raw, k = sk k_raw): this thread's columns,
  // then the row's four lanes, then the two warpgroups through shared memory. Beside them dk's
  // share sk (eta vdh - gamma dWh) goes into dk's place (which S and R do not share), tile by tile,
  // so that the products run with dOh's registers alone live (the K = 128 instance spilled 444
  // bytes holding vdh's too), and dOh is scaled by s gamma sq.
  auto raw_pair = [&](const char* rows, int r, int c) {
    return bf16x2_floats(*reinterpret_cast<const uint32_t*>(rows + r * kRawBytes + 2 * c));
  };
  auto swizzled = [&](int r, int c) { return r * K + 4 * ((c / 4) ^ (r % 8)) + c % 4; };
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + g + 8 * half, i = 2 * half;
    const float a = p.scale * gammas[r] * sqs[r], e = sks[r] * etas[r], w = sks[r] * gammas[r];
    float qa = 0.f, kb = 0.f, ke = 0.f;
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
      const int c = c0 + 8 * n + 2 * t;
      const float2 q = raw_pair(Qr, r, c), k = raw_pair(Kr, r, c);
      qa += q.x * dOh[n][i] + q.y * dOh[n][i + 1];
      kb += k.x * dWh[n][i] + k.y * dWh[n][i + 1];
      ke += k.x * vdh[n][i] + k.y * vdh[n][i + 1];
      st2(dk_s + swizzled(r, c), e * vdh[n][i] - w * dWh[n][i], e * vdh[n][i + 1] - w * dWh[n][i + 1]);
      dOh[n][i] *= a, dOh[n][i + 1] *= a;
    }
#pragma unroll
    for (int o = 1; o < 4; o *= 2) {
      qa += __shfl_xor_sync(0xffffffffu, qa, o);
      kb += __shfl_xor_sync(0xffffffffu, kb, o);
      ke += __shfl_xor_sync(0xffffffffu, ke, o);
    }
    if (t == 0) dots[warp / 4][r][0] = qa * sqs[r], dots[warp / 4][r][1] = kb * sks[r], dots[warp / 4][r][2] = ke * sks[r];
  }
  __syncthreads();  // the dots are in
  if (tid < kC) {  // dgc as finish_rows forms it, the rows' sum in a fixed order (deterministic)
    const float qa = dots[0][tid][0] + dots[1][tid][0], kb = dots[0][tid][1] + dots[1][tid][1];
    const float ke = dots[0][tid][2] + dots[1][tid][2];
    row_dgc[tid] = row_gate_grad(p, gammas[tid], etas[tid], qa, kb, ke, p.wy_dgc[hc * kC + tid]);
  }
  if (tid == kC - 1) {
    float to_end = 0.f;
    for (int r = 0; r < kC; ++r) to_end += etas[r] * (dots[0][r][2] + dots[1][r][2]);
    row_dgc[tid] += to_end + p.last[hc] * state_dot_of(p, hc, dot_parts);
  }

  // The products on top: dq += S k_raw, dk += S^T q_raw + R k_raw, 16 columns at a time.
  const SplitOperand S_op{shared_address(S), 256, 128, true}, R_op{shared_address(R), 256, 128, true};
  const SplitOperand Q_op{shared_address(Qr), kRawBytes, 0}, K_op{shared_address(Kr), kRawBytes, 0};
#pragma unroll
  for (int b = 0; b < K / 32; ++b) {
    const int c = c0 + 16 * b;
    float acc[2][2][4] = {};
    warp_gemm_split<2, false, true, false>(S_op, r0, K_op, c, kC / 16, lane, acc);
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) dOh[2 * b + n][i] += acc[n][0][i] + acc[n][1][i];
    float acc_k[2][2][4] = {};
    warp_gemm_split<2, true, true, false>(S_op, r0, Q_op, c, kC / 16, lane, acc_k);
    warp_gemm_split<2, false, true, false>(R_op, r0, K_op, c, kC / 16, lane, acc_k);
    for_each_pair<2>(r0, c, g, t, [&](int n, int half, int i, int j) {  // this thread's own elements
      const float2 x = pair_sum(acc_k[n], half);
      float* at = dk_s + swizzled(i, j);
      st2(at, (at[0] + x.x) / sks[i], (at[1] + x.y) / sks[i]);
    });
  }
  __syncthreads();  // every warp is done with S and R: dq takes their place
  write_gate_grad(p, hc, tid < kC ? row_dgc[tid] : 0.f, &dots[0][0][0]);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + g + 8 * half;
    const float iq = 1.f / sqs[r];
#pragma unroll
    for (int n = 0; n < kTiles; ++n)
      st2(dq_s + swizzled(r, c0 + 8 * n + 2 * t), iq * dOh[n][2 * half], iq * dOh[n][2 * half + 1]);
  }
  if (tid < kC) {
    const Token tok = token_of(p.tokens, (hc % p.NC) * kC + tid);
    dq_at[tid] = token_offset(p.dq_tokens, tok), dk_at[tid] = token_offset(p.dk_tokens, tok);
  }
  __syncthreads();

  // The rows into the tokens: warp w rows w, w + 8, ...; lane l float4 pieces l, l + 32 of a row.
  // Two rows at a time (w + 16 j and w + 16 j + 8): their four norm reductions are independent, so
  // one's shuffles run under another's (one row at a time, a warp waited out each chain of five).
  constexpr int K4 = K / 4, kRowsAtOnce = 2;
  static_assert(kC % (kRowsAtOnce * kWarps) == 0, "whole pairs of rows a warp");
  for (int r0w = warp; r0w < kC; r0w += kRowsAtOnce * kWarps) {
    float4 qs[kRowsAtOnce][kMaxPieces], ks[kRowsAtOnce][kMaxPieces], dqs[kRowsAtOnce][kMaxPieces],
        dks[kRowsAtOnce][kMaxPieces];
#pragma unroll
    for (int j = 0; j < kRowsAtOnce; ++j) {
      const int r = r0w + kWarps * j;
#pragma unroll
      for (int i = 0; i < kMaxPieces; ++i) {
        const int f = lane + 32 * i;
        if (f >= K4) break;
        qs[j][i] = row_piece(*reinterpret_cast<const uint2*>(Qr + r * kRawBytes + 8 * f), sqs[r]);
        ks[j][i] = row_piece(*reinterpret_cast<const uint2*>(Kr + r * kRawBytes + 8 * f), sks[r]);
        const int at = r * K + 4 * (f ^ (r % 8));
        dqs[j][i] = ld4(dq_s + at), dks[j][i] = ld4(dk_s + at);
      }
    }
#pragma unroll
    for (int j = 0; j < kRowsAtOnce; ++j) {
      const int r = r0w + kWarps * j;
      const int64_t row = hc * kC + r;
      row_to_token(p.dq_tokens, dq_at[r], hc / p.NC, p.q_scale, row, qs[j], dqs[j], K4);
      row_to_token(p.dk_tokens, dk_at[r], hc / p.NC, p.k_scale, row, ks[j], dks[j], K4);
    }
  }
}

template <bool kTokens>
__global__ void __launch_bounds__(kThreads) finish_kernel(Params p) {
  const int64_t hc = blockIdx.x, at = hc * kC * p.K;
  finish_rows<kTokens, 1, false>(p, hc, p.dOh + at, p.dWh + at, p.vdh + at, p.K, p.K);
}

// The TF32 instances compiled for their K (96, 128) form the products on wgmma (below).
__host__ __device__ constexpr bool wgmma_products(bool precise, int K) { return !precise && (K == 96 || K == 128); }
// A stage's floats: rows padded to slice_ld for cp.async and the fragments' loads, or dense (a
// row of `slice` floats, the swizzle's width) for TMA and wgmma; all five in bf16 (kept16) take
// half. 1024 bytes more for the dense stages' alignment to the swizzle's repeat.
__host__ __device__ constexpr int stage_floats(int K, int slice, bool dense, bool kept16 = false) {
  return (3 * kC + 2 * K) * (kept16 ? slice / 2 : dense ? slice : slice_ld(slice));
}
size_t products_shared_bytes(int K, int slice, bool wgmma, bool kept16) {
  return sizeof(float) * std::max(slice_stages(slice, kept16) * stage_floats(K, slice, wgmma, kept16), 3 * kC * (K + 4)) +
         (wgmma ? 1024 : 0);
}

// The five operands of the wgmma instances as 2D tensors for TMA: dO, dW, V' [H NC C, V] and S0,
// dS_C [H NC K, V], boxes of a slice's columns by C or K rows. An argument of its own, as the
// state pass's StoreMaps (64-byte aligned maps inside Params change the other instances' registers).
struct SliceMaps {
  CUtensorMap dO, dW, vnew, h, dh;
};

// kK: K at compile time (the TF32 instances at K = 96 and 128), or 0 for p.K: a warp's tile count
// known, the products' loop has no branch between tiles and the row pass's none between pieces.
// kRaw: the row pass reads q and k's raw rows (those instances into the tokens).
// kWgmma (wgmma_products; wgmma.cuh): warpgroup w / 4 forms the same K / 2 columns of all three as
// its warps by mma.sync, from slices that thread 0 loads by TMA (a box an operand, completing on
// the stage's mbarrier) as dense rows of kSlice floats with the swizzle of that width (64 or 128
// bytes), and that the tensor cores read from shared memory: 3 instructions a k-step of 8 for a
// warpgroup where each warp loaded and rounded its fragments (about 1,100 shared loads and 860
// roundings a warp, step 25). TF32 from float32 in shared memory is truncated (the low 13 bits
// ignored) where the fragments were rounded to nearest. (cp.async does not serve here: its
// writes reach wgmma only through fence.proxy.async, whose MEMBAR.ALL.CTA waits for every copy
// in flight, a pipeline drained at each slice: +230 us at every shape, step 32.)
// kWy: the WY terms' dq, dk products here too, from their operands (finish_with_wy_products).
// kKept16: dW, V', S0 and dS_C come in bf16 (the state passes keep them so: half their bytes), and
// dO (o's bf16 gradient), as operands of bf16 products from shared memory (m64n48k16 or m64n64k16,
// two k-steps of 16 a slice): three products a k-step where TF32 takes six. Their slices are rows
// of 64 bytes (kKept16Slice = 32 values) with the 64-byte swizzle (unit j of row r at j ^ (r / 2) %
// 4), three stages.
template <bool kPrecise, bool kTokens, int kSlice, int kK = 0, bool kRaw = false, bool kWy = false,
          bool kKept16 = false>
__global__ void __launch_bounds__(kThreads, 2)
    finish_products_kernel(const Params p, const __grid_constant__ SliceMaps maps) {
  constexpr int kSliceLd = slice_ld(kSlice), kStages = slice_stages(kSlice, kKept16);
  constexpr bool kWgmma = wgmma_products(kPrecise, kK);
  static_assert(!kWy || (kWgmma && kTokens && kRaw), "the WY products: the raw wgmma instances into the tokens");
  static_assert(!kKept16 || (kWgmma && kSlice == kKept16Slice), "bf16 kept operands: the wgmma instances");
  // An operand's rows in a stage, in floats: dense for TMA (wgmma), padded for cp.async, bf16 in half.
  constexpr int kRowLd = kKept16 ? kSlice / 2 : kWgmma ? kSlice : kSliceLd;
  extern __shared__ __align__(16) float smem_start[];
  __shared__ uint64_t slice_in[kStages];  // kWgmma: stage i's TMA bytes arrived, a phase a use
  float* smem = kWgmma ? swizzle_aligned(smem_start) : smem_start;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t hc = blockIdx.x;
  const int K = kK ? kK : p.K, V = p.V, stage = stage_floats(K, kSlice, kWgmma, kKept16), slices = (V + kSlice - 1) / kSlice;
  const float *dO = p.dO + hc * kC * V, *dW = p.dW + hc * kC * V, *vnew = p.vnew + hc * kC * V;
  const float *h = p.h + hc * K * V, *dh = p.dh + hc * K * V;
  if constexpr (kWgmma) {
    if (tid == 0)
      for (int i = 0; i < kStages; ++i) mbarrier_init(&slice_in[i], 1);
    __syncthreads();
  }
  // Slice s's columns of the five operands into its stage: dO, dW, V' (C rows each), S0, dS_C.
  auto issue = [&](int s) {
    float* to = smem + (s % kStages) * stage;
    const int v0 = s * kSlice;
    if constexpr (kWgmma) {
      if (tid != 0) return;
      uint64_t* in = &slice_in[s % kStages];
      const int row = static_cast<int>(hc) * kC, state_row = static_cast<int>(hc) * K;
      // A partial last slice's box is filled with zeros past V and counts its full bytes.
      mbarrier_arrive_expect_bytes(in, sizeof(float) * stage);
      bulk_load_2d(to, &maps.dO, v0, row, in);
      bulk_load_2d(to + kC * kRowLd, &maps.dW, v0, row, in);
      bulk_load_2d(to + 2 * kC * kRowLd, &maps.vnew, v0, row, in);
      bulk_load_2d(to + 3 * kC * kRowLd, &maps.h, v0, state_row, in);
      bulk_load_2d(to + (3 * kC + K) * kRowLd, &maps.dh, v0, state_row, in);
    } else {
      const RowPieces rp = row_pieces(min(kSlice, V - v0));
      copy_async(to, kSliceLd, dO + v0, V, kC, rp);
      copy_async(to + kC * kSliceLd, kSliceLd, dW + v0, V, kC, rp);
      copy_async(to + 2 * kC * kSliceLd, kSliceLd, vnew + v0, V, kC, rp);
      copy_async(to + 3 * kC * kSliceLd, kSliceLd, h + v0, V, K, rp);
      copy_async(to + (3 * kC + K) * kSliceLd, kSliceLd, dh + v0, V, K, rp);
      cp_async_commit();
    }
  };
  for (int s = 0; s < kStages - 1 && s < slices; ++s) issue(s);

  const int tiles = K / 16, r0 = 16 * (warp % 4), c0 = (K / 2) * (warp / 4);
  float dOh[kMaxTiles][4] = {}, dWh[kMaxTiles][4] = {}, vdh[kMaxTiles][4] = {};
  // kTokens with dv: this thread's pieces of each dW slice, row dv_row, columns 4 dv_piece .. + 3
  // and every 16 columns on, into its token's dv (null: padding, or no dv here).
  const int dv_row = tid / 4, dv_piece = tid % 4;
  uint16_t* dv_at = nullptr;
  if constexpr (kTokens) {
    if (p.dv_tokens.at) {
      const int64_t at = token_offset(p.dv_tokens, token_of(p.tokens, (hc % p.NC) * kC + dv_row));
      if (at >= 0) dv_at = p.dv_tokens.at + at + (hc / p.NC) * p.dv_tokens.head + 4 * dv_piece;
    }
  }
  // Without p.state_dot (kWgmma): this thread's share of <dS_C, S0>, summed over each stage's S0
  // and dS_C boxes element by element (the same box shape, swizzle and alignment: the same
  // permutation of both; zeros past V in a partial slice), where the reverse pass loaded S0's
  // tiles at its steps' top for it.
  float state_dot = 0.f;
  for (int s = 0; s < slices; ++s) {
    if constexpr (kWgmma) {
      mbarrier_wait(&slice_in[s % kStages], (s / kStages) % 2);
      wgmma_wait<0>();  // slice s - 1's products: its stage is refilled after the barrier
    } else if (s + 1 < slices) {
      cp_async_wait<kStages - 2>();
    } else {
      cp_async_wait<0>();
    }
    // Slice s is in for every thread; every warp is done with slice s - 1, whose stage is refilled.
    __syncthreads();
    if (s + kStages - 1 < slices) issue(s + kStages - 1);
    const float* Os = smem + (s % kStages) * stage;
    const float *Ws = Os + kC * kRowLd, *Es = Ws + kC * kRowLd, *Hs = Es + kC * kRowLd, *Ds = Hs + K * kRowLd;
    const int steps = min(kSlice, V - s * kSlice) / 8;
    if (kWgmma && !p.state_dot) {
#pragma unroll 1  // one piece of each at a time: the products' 96 accumulators are live here
      for (int e = tid; e < K * kRowLd / 4; e += kThreads) {
        const float4 a = ld4(Hs + 4 * e), b = ld4(Ds + 4 * e);
        if constexpr (kKept16) {  // 8 bf16 of each
          const uint32_t ha[4] = {__float_as_uint(a.x), __float_as_uint(a.y), __float_as_uint(a.z), __float_as_uint(a.w)};
          const uint32_t db[4] = {__float_as_uint(b.x), __float_as_uint(b.y), __float_as_uint(b.z), __float_as_uint(b.w)};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 x = bf16x2_floats(ha[i]), y = bf16x2_floats(db[i]);
            state_dot += x.x * y.x + x.y * y.y;
          }
        } else {
          state_dot += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kSlice / 16; ++i) {
      if (!dv_at || 4 * dv_piece + 16 * i >= 8 * steps) break;
      // kWgmma: TMA's swizzle moves 16-byte piece j of row r (rows of 4 kSlice bytes) to j xor the
      // row's 128-byte line, modulo the pieces a row.
      const int piece = dv_piece + 4 * i, pieces = kSlice / 4;
      uint2 four;  // bf16
      if constexpr (kKept16) {  // dW's 8-byte half `piece % 2` of unit piece / 2, the unit swizzled
        constexpr int kRowBytes = 2 * kSlice, kUnits = kRowBytes / 16;
        const int unit = (piece / 2) ^ ((dv_row * kRowBytes / 128) % kUnits);
        four = *reinterpret_cast<const uint2*>(reinterpret_cast<const char*>(Ws) + kRowBytes * dv_row + 16 * unit +
                                               8 * (piece % 2));
      } else {
        const int at = kWgmma ? 4 * (dv_row * pieces + (piece ^ ((dv_row * kSlice / 32) % pieces)))
                              : dv_row * kSliceLd + 4 * piece;
        const float4 d = ld4(Ws + at);
        four = make_uint2(bf16x2(d.x, d.y), bf16x2(d.z, d.w));
      }
      *reinterpret_cast<uint2*>(dv_at + s * kSlice + 16 * i) = four;
    }
    // A full slice's k-steps as a constant (all but a partial last slice) where K is one too: the
    // loop unrolls, and the next k-step's fragment loads issue ahead of this one's products (with
    // K at run time the unrolled loop spills).
    auto products = [&](auto step_count) {
#pragma unroll
      for (int ks = 0; ks < step_count; ++ks) {
        Split ao[4], aw[4], ae[4];
        const int a_at = r0 * kSliceLd + 8 * ks;
        load_a<kPrecise>(Os + a_at, kSliceLd, 1, g, t, ao);
        load_a<kPrecise>(Ws + a_at, kSliceLd, 1, g, t, aw);
        load_a<kPrecise>(Es + a_at, kSliceLd, 1, g, t, ae);
#pragma unroll
        for (int n = 0; n < kMaxTiles; ++n) {
          if (n >= tiles) break;
          // B(v, j) = S0(j, v): S0's rows are the product's columns.
          const int b_at = (c0 + 8 * n) * kSliceLd + 8 * ks;
          Split bh[2], bd[2];
          load_b<kPrecise>(Hs + b_at, 1, kSliceLd, g, t, bh);
          load_b<kPrecise>(Ds + b_at, 1, kSliceLd, g, t, bd);
          mma_k8<kPrecise>(dOh[n], ao, bh);
          mma_k8<kPrecise>(dWh[n], aw, bh);
          mma_k8<kPrecise>(vdh[n], ae, bd);
        }
      }
    };
    if constexpr (kWgmma) {
      // Rows of kSlice floats swizzled at that width.
      constexpr uint32_t kRowBytes = 4 * kSlice;
      static_assert(kRowBytes == 64 || kRowBytes == 128, "16- or 32-column slices");
      auto at = [](const float* x, int first_row, int k_step) {
        return swizzled_rows_descriptor(x, kRowBytes, first_row, k_step);
      };
      if constexpr (kKept16) {
        // dO S0^T, dW S0^T and V' dS_C^T, bf16 operands from shared memory (dO's values o's bf16
        // gradient: kept_in_bf16's condition), k-steps of 16 columns (zeros past V in a partial
        // slice). B: rows c0 .. c0 + K / 2 - 1 of the states.
        constexpr uint32_t kRowBytes16 = 2 * kSlice;
        auto rows16 = [](const float* x, int first_row, int k_step) {
          return swizzled_rows_descriptor(x, kRowBytes16, first_row, k_step);
        };
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kSlice / 16; ++ks) {
          wgmma_bf16_shared<kK / 16>(dOh, rows16(Os, 0, ks), rows16(Hs, c0, ks), 1);
          wgmma_bf16_shared<kK / 16>(dWh, rows16(Ws, 0, ks), rows16(Hs, c0, ks), 1);
          wgmma_bf16_shared<kK / 16>(vdh, rows16(Es, 0, ks), rows16(Ds, c0, ks), 1);
        }
        wgmma_commit();
      } else {
        wgmma_fence();
        for (int ks = 0; ks < steps; ++ks) {
          wgmma_tf32_accumulate<kK / 16>(dOh, at(Os, 0, ks), at(Hs, c0, ks));
          wgmma_tf32_accumulate<kK / 16>(dWh, at(Ws, 0, ks), at(Hs, c0, ks));
          wgmma_tf32_accumulate<kK / 16>(vdh, at(Es, 0, ks), at(Ds, c0, ks));
        }
        wgmma_commit();
      }
    } else if (kK && steps == kSlice / 8) {
      products(std::integral_constant<int, kSlice / 8>{});
    } else {
      products(steps);
    }
  }
  if constexpr (kWgmma) {
    wgmma_wait<0>();
    wgmma_hold(dOh), wgmma_hold(dWh), wgmma_hold(vdh);
  }

  __shared__ float dot_parts[kWarps];
  if (kWgmma && !p.state_dot) {
    state_dot = warp_sum(state_dot);
    if (lane == 0) dot_parts[warp] = state_dot;
  }
  __syncthreads();  // every warp is done with the stages: the products take their place
  if constexpr (kWy) {
    finish_with_wy_products<kK>(p, hc, smem, dOh, dWh, vdh, dot_parts);
    return;
  }
  const int ld = K + 4;
  float *A = smem, *B = A + kC * ld, *E = B + kC * ld;
#pragma unroll
  for (int n = 0; n < kMaxTiles; ++n) {
    if (n >= tiles) break;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int at = (r0 + g + 8 * half) * ld + c0 + 8 * n + 2 * t;
      st2(A + at, dOh[n][2 * half], dOh[n][2 * half + 1]);
      st2(B + at, dWh[n][2 * half], dWh[n][2 * half + 1]);
      st2(E + at, vdh[n][2 * half], vdh[n][2 * half + 1]);
    }
  }
  __syncthreads();
  finish_rows<kTokens, kK ? 2 : 1, kRaw>(p, hc, A, B, E, ld, K, dot_parts);
}

// The products kernel for K: TF32 or 3xTF32 products, rows into the tokens or not; TF32 at K = 96
// and 128 (the OLMo and the common head sizes) compiled for that K, into the tokens from the raw
// rows where they are given (the op's path).
auto products_kernel(int K, bool tf32, bool tokens, bool raw, bool wy, bool kept16) {
  if (wy)  // the op's path with the WY products here (finish_takes_wy_split)
    return K == 96 ? (kept16 ? finish_products_kernel<false, true, kKept16Slice, 96, true, true, true>
                             : finish_products_kernel<false, true, 32, 96, true, true>)
                   : (kept16 ? finish_products_kernel<false, true, kKept16Slice, 128, true, true, true>
                             : finish_products_kernel<false, true, 16, 128, true, true>);
  if (tf32 && K == 96)
    return tokens ? (raw ? finish_products_kernel<false, true, 32, 96, true>
                         : finish_products_kernel<false, true, 32, 96>)
                  : finish_products_kernel<false, false, 32, 96>;
  if (tf32 && K == 128)
    return tokens ? (raw ? finish_products_kernel<false, true, 16, 128, true>
                         : finish_products_kernel<false, true, 16, 128>)
                  : finish_products_kernel<false, false, 16, 128>;
  if (products_slice(K) == 32)
    return tf32 ? (tokens ? finish_products_kernel<false, true, 32> : finish_products_kernel<false, false, 32>)
                : (tokens ? finish_products_kernel<true, true, 32> : finish_products_kernel<true, false, 32>);
  return tf32 ? (tokens ? finish_products_kernel<false, true, 16> : finish_products_kernel<false, false, 16>)
              : (tokens ? finish_products_kernel<true, true, 16> : finish_products_kernel<true, false, 16>);
}

}  // namespace

bool finish_forms_products(int64_t K, int64_t V) { return K % 16 == 0 && K <= 16 * kMaxTiles && V % 8 == 0; }
// The rule the dry run's memory estimate reads too (hybrid/ops/delta_rule_memory.h).
static_assert(16 * kMaxTiles >= 128, "finish_forms_products takes every shape kernels_keep_bf16 names");
bool finish_takes_wy_split(int64_t K, int64_t V, bool tf32) { return kernels_keep_bf16(K, V, tf32); }
bool finish_takes_bf16_kept(int64_t K, int64_t V, bool tf32) { return finish_takes_wy_split(K, V, tf32); }
bool finish_forms_state_dot(int64_t K, int64_t V, bool tf32) {
  return wgmma_products(!tf32, static_cast<int>(K)) && finish_forms_products(K, V);
}

at::Tensor finish_gradients_cuda(const FinishInputs& in, at::Tensor& dq, at::Tensor& dk, const FinishProducts* given) {
  const c10::cuda::CUDAGuard guard(in.q.device());
  const int64_t H = in.q.size(0), NC = in.q.size(1), C = in.q.size(2), K = in.q.size(3), V = in.dO.size(3);
  // Without state_dot the wgmma instances form <dS_C, S0> themselves.
  const bool dot_given = in.state_dot.defined();
  TORCH_CHECK(dot_given || (!given && finish_forms_state_dot(K, V, in.tf32)),
              "finish_gradients_cuda: <dS_C, S0> (state_dot) formed here only by the TF32 instances at K = 96, 128");
  const int64_t parts = dot_given ? in.state_dot.size(-1) : 0;
  TORCH_CHECK(C == kC && K % 4 == 0 && H * NC < (int64_t{1} << 31), "finish_gradients_cuda: needs chunk 64, K % 4 == 0");
  TORCH_CHECK(given || finish_forms_products(K, V), "finish_gradients_cuda: K = ", K, ", V = ", V,
              " needs the products given");
  TORCH_CHECK(K <= 32 * 4 * kMaxPieces, "finish_gradients_cuda: K = ", K, " above 256");
  // The instances into the tokens at K = 96 and 128 read the raw rows (FinishTokens) in q and k's
  // place (products_kernel): q and k are not read then, and may be stand-ins (rows_stand_in).
  const bool raw_rows =
      !given && in.tf32 && (K == 96 || K == 128) && in.tokens.dq.defined() && in.tokens.q_raw.defined();
  // With the WY terms' S and R (WyGrads::split) those instances form dq and dk's WY shares too: dq
  // and dk are not read.
  const bool wy = in.wy_split.defined();
  TORCH_CHECK(!wy || (raw_rows && finish_takes_wy_split(K, V, in.tf32) && in.wy_split.scalar_type() == at::kFloat &&
                      in.wy_split.is_contiguous() && in.wy_split.numel() == H * NC * 2 * C * C),
              "finish_gradients_cuda: the WY split operands [H, NC, 2, C, C] only for the raw TF32 instances into the "
              "tokens (K = 96, 128)");
  TORCH_CHECK(wy || (dq.is_contiguous() && dk.is_contiguous()), "finish_gradients_cuda: dq and dk must be contiguous");
  // dO, dW, V', S0 and dS_C in bf16 (all or none): the instances with the WY products.
  const bool kept16 = !given && in.h.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!kept16 || (wy && finish_takes_bf16_kept(K, V, in.tf32)),
              "finish_gradients_cuda: dO, dW, vnew, h and dhC in bf16 only for the instances with the WY products "
              "(K = 96, 128)");
  // Stand-ins where a tensor is not read: the split operands for dq, dk; gamma for an absent state_dot.
  const at::Tensor& dq_in = wy ? in.wy_split : dq;
  std::vector<at::Tensor> x = {in.q, in.k, in.gamma, in.eta, in.wy_dgc, in.last, dot_given ? in.state_dot : in.gamma,
                               dq_in, wy ? dq_in : dk};
  if (given) x.insert(x.end(), {given->dOh, given->dWh, given->vdh});
  else x.insert(x.end(), {in.dO, in.dW, in.vnew, in.h, in.dhC});
  for (size_t i = raw_rows ? 2 : 0; i < x.size(); ++i) {
    at::Tensor& t = x[i];
    t = t.contiguous();
    TORCH_CHECK(t.scalar_type() == (kept16 && i >= 9 ? at::kBFloat16 : at::kFloat),
                "finish_gradients_cuda: float32 inputs (dO, dW, vnew, h and dhC all bf16 or all float32)");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "finish_gradients_cuda: 16-byte aligned inputs");
  }
  at::Tensor dgc = at::empty({H, NC, C}, in.q.options());
  if (H * NC == 0) return dgc;
  auto f = [&](size_t i) { return static_cast<float*>(x[i].data_ptr()); };
  Params p{};
  p.q = raw_rows ? nullptr : f(0), p.k = raw_rows ? nullptr : f(1);
  p.gamma = f(2), p.eta = f(3), p.wy_dgc = f(4), p.last = f(5), p.state_dot = dot_given ? f(6) : nullptr;
  p.dq = wy ? nullptr : dq.data_ptr<float>(), p.dk = wy ? nullptr : dk.data_ptr<float>();
  p.wy_split = wy ? in.wy_split.data_ptr<float>() : nullptr, p.dgc = dgc.data_ptr<float>();
  p.K = static_cast<int>(K), p.V = static_cast<int>(V), p.parts = static_cast<int>(parts);
  p.scale = static_cast<float>(in.scale);
  const bool tokens = in.tokens.dq.defined();
  TORCH_CHECK(tokens || !in.tokens.dv.defined(), "finish_gradients_cuda: dv into the tokens only beside dq and dk");
  if (tokens) {
    const FinishTokens& t = in.tokens;
    const int64_t B = t.dq.size(0), T = t.dq.size(1);
    // A token gradient the kernels write in pieces of four bf16: [B, T, H, D] beside dq.
    auto token_gradient = [&](const at::Tensor& x, int64_t D) {
      return x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.size(0) == B && x.size(1) == T && x.size(2) == H &&
             x.size(3) == D && x.stride(3) == 1 && x.stride(2) % 4 == 0 && x.stride(1) % 4 == 0 &&
             x.stride(0) % 4 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 8 == 0;
    };
    for (const at::Tensor* x : {&t.dq, &t.dk})
      TORCH_CHECK(token_gradient(*x, K),
                  "finish_gradients_cuda: token gradients bf16 [B, T, H, K], unit stride in K, 4-aligned strides");
    TORCH_CHECK(B * T < (int64_t{1} << 32) && (t.gather.defined() || NC % B == 0),
                "finish_gradients_cuda: B * T below 2^32, rows of the batch in whole chunks");
    for (const at::Tensor* x : {&t.q_scale, &t.k_scale})
      TORCH_CHECK(!x->defined() || (x->scalar_type() == at::kFloat && x->is_contiguous() && x->numel() == H * NC * C),
                  "finish_gradients_cuda: the norm's scales float32 [H, NC, C]");
    auto rows = [](const at::Tensor& x) {
      return TokenRows{reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>()), x.stride(0), x.stride(1), x.stride(2)};
    };
    p.dq_tokens = rows(t.dq), p.dk_tokens = rows(t.dk);
    if (t.dv.defined()) {
      TORCH_CHECK(!given && token_gradient(t.dv, V),
                  "finish_gradients_cuda: dv into the tokens only where the kernel forms its products, bf16 [B, T, H, "
                  "V] beside dq, unit stride in V, 4-aligned strides");
      p.dv_tokens = rows(t.dv);
    }
    p.q_scale = t.q_scale.defined() ? t.q_scale.data_ptr<float>() : nullptr;
    p.k_scale = t.k_scale.defined() ? t.k_scale.data_ptr<float>() : nullptr;
    const at::Tensor* raw[] = {&t.q_raw, &t.k_raw, &t.q_raw_scale, &t.k_raw_scale};
    const bool any_raw = std::any_of(std::begin(raw), std::end(raw), [](const at::Tensor* x) { return x->defined(); });
    if (any_raw) {
      for (int i = 0; i < 4; ++i) {
        const at::Tensor& x = *raw[i];
        const bool rows = i < 2;
        TORCH_CHECK(x.defined() && x.scalar_type() == (rows ? at::kBFloat16 : at::kFloat) && x.is_contiguous() &&
                        x.numel() == H * NC * C * (rows ? K : 1) && reinterpret_cast<uintptr_t>(x.data_ptr()) % 8 == 0,
                    "finish_gradients_cuda: raw rows bf16 [H, NC, C, K] and their scales float32 [H, NC, C], all four, "
                    "8-byte aligned");
      }
      p.q_raw = reinterpret_cast<const uint16_t*>(t.q_raw.data_ptr<at::BFloat16>());
      p.k_raw = reinterpret_cast<const uint16_t*>(t.k_raw.data_ptr<at::BFloat16>());
      p.q_raw_scale = t.q_raw_scale.data_ptr<float>(), p.k_raw_scale = t.k_raw_scale.data_ptr<float>();
    }
    p.tokens = ChunkTokens{t.gather.defined() ? t.gather.data_ptr<int64_t>() : nullptr, B, T, NC / B};
    p.NC = NC;
  }
  const auto blocks = static_cast<unsigned>(H * NC);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (given) {
    p.dOh = f(9), p.dWh = f(10), p.vdh = f(11);
    (tokens ? finish_kernel<true> : finish_kernel<false>)<<<blocks, kThreads, 0, stream>>>(p);
  } else {
    p.dO = f(9), p.dW = f(10), p.vnew = f(11), p.h = f(12), p.dh = f(13);  // the bf16 ones: read by TMA only
    const auto kernel = products_kernel(static_cast<int>(K), in.tf32, tokens, p.q_raw != nullptr, wy, kept16);
    const int slice = kept16 ? kKept16Slice : products_slice(static_cast<int>(K));
    const bool wgmma = wgmma_products(!in.tf32, static_cast<int>(K));
    SliceMaps maps{};
    if (wgmma) {
      const auto swizzle = slice == 16 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B;
      auto map = [&](const float* data, int64_t rows) {
        return float_tensor_map(data, H * NC * rows, V, slice, static_cast<int>(rows), swizzle,
                                "finish_gradients_cuda");
      };
      // The bf16 operands: boxes of C or K rows x 32 values (64 bytes), the 64-byte swizzle.
      auto kept = [&](size_t i, int64_t rows) {
        return kept16 ? bf16_tensor_map(x[i].data_ptr(), H * NC * rows, V, slice, static_cast<int>(rows),
                                        CU_TENSOR_MAP_SWIZZLE_64B, "finish_gradients_cuda")
                      : map(f(i), rows);
      };
      maps = SliceMaps{kept(9, C), kept(10, C), kept(11, C), kept(12, K), kept(13, K)};
    }
    const size_t bytes = std::max(products_shared_bytes(static_cast<int>(K), slice, wgmma, kept16),
                                  wy ? wy_epilogue_bytes(static_cast<int>(K)) + 1024 : 0);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    kernel<<<blocks, kThreads, bytes, stream>>>(p, maps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dgc;
}

}  // namespace hybrid::ops::detail
