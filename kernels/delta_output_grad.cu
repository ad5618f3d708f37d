// The output's gradient into the chunked delta rule's chunk layout, with the reverse state pass's
// `add` formed on the way (src/ops/delta_chunk_layout.h, output_grad_into_chunks): per (head,
// chunk) of C = 64 rows,
//   dO[h, c] = dO_tokens[tok(c, i), h, :]  (rows i; zeros for padding)        (C x V)
//   add[h, c] = s QKG^T dO[h, c]                                               (C x V)
// where a layout kernel wrote dO for a batched product to read back (QKG is lower triangular, so
// row i of add sums rows i .. C - 1 of dO). One block of 8 warps a chunk, two kernels:
// - output_grad_kernel, float32 out (from bf16 or float32 tokens): the warps bring the chunk's
//   token rows in (a warp a row, lanes four columns each), into shared memory (rows of V + 8
//   floats: the B fragments' rows then fall on distinct banks) and out to dO; QKG arrives by
//   cp.async meanwhile (rows of C + 8 floats, read transposed: the A fragments likewise). Warp w
//   computes rows 16 (w % 4) .. + 15 and the columns of its half of V, 16 (or 8) at a time, from
//   k-step r0 / 8 on (the rows above are zero), TF32 mma.sync where DeltaRuleArgs::tf32_products
//   allows it (as cuBLAS's TF32 product did), 3xTF32 otherwise.
// - output_grad_bf16_kernel, bf16 out from bf16 tokens (where the op keeps its intermediates in
//   bf16: dO exact, add rounded to bf16 for the reverse pass; what that rounding costs the
//   gradients, scripts/kept_precision.py): nothing goes through registers on the way in. The token
//   rows (bf16, rows of V + 8: an odd number of 16-byte units, so ldmatrix's 8 rows fall on
//   distinct banks) and QKG's lower triangle (float32 rows of C + 4, 16-byte pieces at or left of
//   the diagonal; the rest zero-filled without reading memory) arrive by cp.async together; dO
//   leaves from shared memory in 16-byte stores. The product on bf16 m16n8k16 mma.sync, QKG split
//   into hi + lo bf16 as its fragments are read (16 significant bits; dO exact): warp w takes the
//   8-column tiles w, w + 8, ... of all four row groups (the same k-steps for every warp), row
//   group by row group, and writes each group's add over the dO rows no later group reads (a
//   barrier a group); add then leaves like dO. 43 KB of shared memory at V = 192.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "accumulator_pairs.cuh"
#include "bf16_split.cuh"
#include "chunk_tokens.cuh"
#include "cp_async.cuh"
#include "tf32x3.cuh"
#include "vector_access.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kC = 64;
constexpr int kWarps = kCopyWarps;  // 8: copy_async's blocks
constexpr int kThreads = 32 * kWarps;
constexpr int kQkgLd = kC + 8;

struct Params {
  const void* tokens;                    // dO [B, T, H, V], bf16 or float32
  int64_t batch, token, head;            // its element strides
  ChunkTokens rows;
  int64_t NC;
  const float* QKG;                      // [H, NC, C, C]
  float *dO, *add;                       // [H, NC, C, V] float32 (output_grad_kernel)
  uint16_t *dO16, *add16;                // or bf16 (output_grad_bf16_kernel)
  int V;
  float scale;
};

__host__ __device__ constexpr int rows_stride(int V) { return V + 8; }

// Four adjacent elements of a token row as floats.
__device__ __forceinline__ float4 load4(const float* p) { return ld4(p); }
__device__ __forceinline__ float4 load4(const c10::BFloat16* p) { return bf16x4_floats(*reinterpret_cast<const uint2*>(p)); }

// This warp's rows r0 .. + 15 of add, columns c .. c + 8 NT - 1.
template <int NT, bool kPrecise>
__device__ __forceinline__ void add_columns(const float* Qs, const float* Ds, int ld, int r0, int c, int g, int t,
                                            float* add, int V, float scale) {
  float acc[NT][2][4] = {};
  // A(r, j) = QKG(j, r); the k-steps from r0 on (QKG(j, r) = 0 for j < r).
  warp_gemm<NT, kPrecise>(Qs + r0 * kQkgLd + r0, 1, kQkgLd, Ds + r0 * ld + c, ld, 1, (kC - r0) / 8, g, t, acc);
  for_each_pair<NT>(r0, c, g, t, [&](int n, int half, int i, int j) {
    const float2 x = pair_sum(acc[n], half);
    stg2(add + i * V + j, scale * x.x, scale * x.y);
  });
}

template <class T, bool kPrecise>
__global__ void __launch_bounds__(kThreads) output_grad_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];
  const int V = p.V, ld = rows_stride(V);
  float* Qs = smem;              // [C][kQkgLd]
  float* Ds = Qs + kC * kQkgLd;  // [C][ld]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t hc = blockIdx.x, h = hc / p.NC, first_row = (hc % p.NC) * kC;
  copy_async(Qs, kQkgLd, p.QKG + hc * kC * kC, kC, kC, row_pieces(kC));
  cp_async_commit();

  // The warp's rows warp, warp + 8, ... in two rounds of four: a round's loads are all issued
  // before its stores (a row at a time, each store may alias the next row's load for the
  // compiler, which then waited out a global load's latency a row).
  const T* tokens = static_cast<const T*>(p.tokens);
  float* dO = p.dO + hc * kC * V;
  constexpr int kRound = 4, kPieces = 256 / 4 / 32;  // rows a round; float4 pieces a lane (V <= 256)
#pragma unroll
  for (int round = 0; round < kC / kWarps / kRound; ++round) {
    float4 x[kRound][kPieces];
#pragma unroll
    for (int i = 0; i < kRound; ++i) {
      const int r = warp + kWarps * (kRound * round + i);
      const Token tok = token_of(p.rows, first_row + r);
      const T* row = tok.b >= 0 ? tokens + tok.b * p.batch + tok.t * p.token + h * p.head : nullptr;
#pragma unroll
      for (int j = 0; j < kPieces; ++j) {
        const int f = lane + 32 * j;
        x[i][j] = row && f < V / 4 ? load4(row + 4 * f) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
#pragma unroll
    for (int i = 0; i < kRound; ++i) {
      const int r = warp + kWarps * (kRound * round + i);
#pragma unroll
      for (int j = 0; j < kPieces; ++j) {
        const int f = lane + 32 * j;
        if (f >= V / 4) break;
        *reinterpret_cast<float4*>(Ds + r * ld + 4 * f) = x[i][j];
        stg4(dO + r * V + 4 * f, x[i][j]);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();

  const int r0 = 16 * (warp % 4), half_v = V / 2, c_end = (warp / 4 + 1) * half_v;
  float* add = p.add + hc * kC * V;
  int c = (warp / 4) * half_v;
  for (; c + 16 <= c_end; c += 16) add_columns<2, kPrecise>(Qs, Ds, ld, r0, c, g, t, add, V, p.scale);
  if (c < c_end) add_columns<1, kPrecise>(Qs, Ds, ld, r0, c, g, t, add, V, p.scale);
}

// bf16 kernel's shared memory: QKG float32 rows of C + 4 (the transposed reads of a fragment,
// QKG(j .. j + 1, r) over lanes (g, t) = (r - r0, (j - k0) / 2), fall on banks 4 j + r: distinct),
// then the chunk's dO rows in bf16, rows of V + 8.
constexpr int kQkgLd16 = kC + 4;
__host__ __device__ constexpr int rows_stride16(int V) { return V + 8; }
size_t bf16_kernel_shared(int V) { return sizeof(float) * kC * kQkgLd16 + 2 * kC * rows_stride16(V); }

// A chunk's 64 rows of V bf16 (row stride V in global, ld in shared memory) out in 16-byte pieces,
// warp w rows w, w + 8, ..., lane l piece l of a row (V / 8 <= 32 pieces).
__device__ __forceinline__ void rows_out(uint16_t* to, const uint16_t* Ds, int ld, int V, int warp, int lane) {
  if (lane >= V / 8) return;
  for (int r = warp; r < kC; r += kWarps) {
    const uint4 x = *reinterpret_cast<const uint4*>(Ds + r * ld + 8 * lane);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(to + r * V + 8 * lane), "r"(x.x), "r"(x.y), "r"(x.z),
                 "r"(x.w));
  }
}

__global__ void __launch_bounds__(kThreads, 5) output_grad_bf16_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];
  const int V = p.V, ld = rows_stride16(V), tiles = V / 8;
  float* Qs = smem;                                                   // [C][kQkgLd16]
  uint16_t* Ds = reinterpret_cast<uint16_t*>(Qs + kC * kQkgLd16);    // [C][ld]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t hc = blockIdx.x, h = hc / p.NC, first_row = (hc % p.NC) * kC;
  // QKG's rows j: 16 pieces of 4 floats, those right of the diagonal (4 piece > j) zeros.
  const float* QKG = p.QKG + hc * kC * kC;
  for (int i = threadIdx.x; i < kC * kC / 4; i += kThreads) {
    const int j = i / 16, piece = i % 16;
    cp_async16_or_zeros(shared_address(Qs + j * kQkgLd16 + 4 * piece), QKG + j * kC + 4 * piece, 4 * piece <= j);
  }
  const c10::BFloat16* tokens = static_cast<const c10::BFloat16*>(p.tokens);
  for (int r = warp; r < kC; r += kWarps) {
    const Token tok = token_of(p.rows, first_row + r);
    const c10::BFloat16* row = tokens + (tok.b >= 0 ? tok.b * p.batch + tok.t * p.token + h * p.head : 0);
    if (lane < tiles) cp_async16_or_zeros(shared_address(Ds + r * ld + 8 * lane), row + 8 * lane, tok.b >= 0);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  rows_out(p.dO16 + hc * kC * V, Ds, ld, V, warp, lane);

  // Row group rg: add(r, n) = s sum_j QKG(j, r) dO(j, n) over k-steps ks >= rg (A = QKG^T: rows
  // r, columns j; QKG(j, r) = 0 for j < r, zeros in Qs above the diagonal).
  const uint32_t Ds_at = shared_address(Ds) + 2 * ((lane % 16) * ld);
  for (int rg = 0; rg < kC / 16; ++rg) {
    float acc[4][4] = {};  // the warp's tiles n = warp + 8 i (V / 8 <= 32)
    for (int ks = rg; ks < kC / 16; ++ks) {
      const int r = 16 * rg + g, j = 16 * ks + 2 * t;
      uint32_t hi[4], lo[4];
#pragma unroll
      for (int f = 0; f < 4; ++f) {  // a0: (r, j ..), a1: (r + 8, j ..), a2: (r, j + 8 ..), a3: (r + 8, j + 8 ..)
        const int rr = r + 8 * (f % 2), jj = j + 8 * (f / 2);
        const SplitPair x = split_pair(Qs[jj * kQkgLd16 + rr], Qs[(jj + 1) * kQkgLd16 + rr]);
        hi[f] = x.hi, lo[f] = x.lo;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int n = warp + kWarps * i;
        if (n >= tiles) break;
        uint32_t b0, b1;  // rows 16 ks + (lane % 16) of dO, columns 8 n ..: lanes 0-7 give b0's rows, 8-15 b1's
        ldsm_x2_trans(b0, b1, Ds_at + 2 * (16 * ks * ld + 8 * n));
        mma_bf16(acc[i], lo, b0, b1);
        mma_bf16(acc[i], hi, b0, b1);
      }
    }
    // Every warp is done with rows 16 rg .. + 15 of dO (later groups read rows from 16 (rg + 1)
    // on; and dO's stores above read them before this barrier): add's rows go there.
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = warp + kWarps * i;
      if (n >= tiles) break;
#pragma unroll
      for (int half = 0; half < 2; ++half)
        *reinterpret_cast<uint32_t*>(Ds + (16 * rg + g + 8 * half) * ld + 8 * n + 2 * t) =
            bf16x2(p.scale * acc[i][2 * half], p.scale * acc[i][2 * half + 1]);
    }
  }
  __syncthreads();
  rows_out(p.add16 + hc * kC * V, Ds, ld, V, warp, lane);
}

void launch_bf16(const Params& p, int64_t chunks) {
  const size_t shared = bf16_kernel_shared(p.V);
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(output_grad_bf16_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  output_grad_bf16_kernel<<<static_cast<unsigned>(chunks), kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
void launch(const Params& p, int64_t chunks, bool tf32) {
  const size_t shared = sizeof(float) * (kC * kQkgLd + kC * rows_stride(p.V));
  auto* kernel = tf32 ? output_grad_kernel<T, false> : output_grad_kernel<T, true>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  kernel<<<static_cast<unsigned>(chunks), kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool output_grad_kernel_takes(const at::Tensor& dO_tokens) {
  const int64_t V = dO_tokens.size(3);
  return dO_tokens.is_cuda() && (dO_tokens.scalar_type() == at::kBFloat16 || dO_tokens.scalar_type() == at::kFloat) &&
         V % 16 == 0 && V <= 256 && dO_tokens.stride(3) == 1 && dO_tokens.stride(2) % 4 == 0 &&
         dO_tokens.stride(1) % 4 == 0 && dO_tokens.stride(0) % 4 == 0 &&
         reinterpret_cast<uintptr_t>(dO_tokens.data_ptr()) % 16 == 0 &&
         dO_tokens.size(0) * dO_tokens.size(1) < (int64_t{1} << 32);
}

// dO_tokens [B, T, H, V] (output_grad_kernel_takes), QKG [H, NC, C, C] float32, gather [NC C] int64
// or undefined (rows of the batch): {dO, add} [H, NC, C, V] float32 (bf16, from bf16 tokens: dO in
// bf16, exact, and add rounded to bf16).
std::vector<at::Tensor> output_grad_to_chunks_cuda(const at::Tensor& dO_tokens, const at::Tensor& QKG_in,
                                                   const at::Tensor& gather, double scale, bool tf32, bool dO_bf16) {
  const c10::cuda::CUDAGuard guard(dO_tokens.device());
  TORCH_CHECK(output_grad_kernel_takes(dO_tokens), "output_grad_to_chunks_cuda: dO [B, T, H, V], bf16 or float32, ",
              "V a multiple of 16 up to 256, aligned rows");
  const at::Tensor QKG = QKG_in.contiguous();
  const int64_t B = dO_tokens.size(0), T = dO_tokens.size(1), H = QKG.size(0), NC = QKG.size(1), V = dO_tokens.size(3);
  TORCH_CHECK(QKG.scalar_type() == at::kFloat && QKG.size(2) == kC && QKG.size(3) == kC && dO_tokens.size(2) == H &&
                  H * NC < (int64_t{1} << 31) && (gather.defined() || (B > 0 && NC % B == 0)),
              "output_grad_to_chunks_cuda: QKG float32 [H, NC, 64, 64] of dO's heads");
  TORCH_CHECK(!dO_bf16 || dO_tokens.scalar_type() == at::kBFloat16,
              "output_grad_to_chunks_cuda: dO in bf16 only from bf16 tokens");
  const auto opt = QKG.options();
  at::Tensor dO = at::empty({H, NC, kC, V}, dO_bf16 ? opt.dtype(at::kBFloat16) : opt);
  at::Tensor add = at::empty({H, NC, kC, V}, dO_bf16 ? opt.dtype(at::kBFloat16) : opt);
  if (H * NC == 0) return {dO, add};
  Params p{dO_tokens.data_ptr(),
           dO_tokens.stride(0),
           dO_tokens.stride(1),
           dO_tokens.stride(2),
           ChunkTokens{gather.defined() ? gather.data_ptr<int64_t>() : nullptr, B, T, gather.defined() ? 0 : NC / B},
           NC,
           QKG.data_ptr<float>(),
           dO_bf16 ? nullptr : dO.data_ptr<float>(),
           dO_bf16 ? nullptr : add.data_ptr<float>(),
           dO_bf16 ? reinterpret_cast<uint16_t*>(dO.data_ptr<at::BFloat16>()) : nullptr,
           dO_bf16 ? reinterpret_cast<uint16_t*>(add.data_ptr<at::BFloat16>()) : nullptr,
           static_cast<int>(V),
           static_cast<float>(scale)};
  if (dO_bf16) launch_bf16(p, H * NC);
  else if (dO_tokens.scalar_type() == at::kBFloat16) launch<c10::BFloat16>(p, H * NC, tf32);
  else launch<float>(p, H * NC, tf32);
  return {dO, add};
}

}  // namespace hybrid::ops::detail
