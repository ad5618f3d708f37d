// The chunked delta rule's chunk layout [H, NC, C, D]: every sequence (a row of the batch, or a
// document of cu_seqlens) starts a new chunk of C = 64 tokens and its last chunk is padded with
// zeros. Zero padding is inert: k = 0 and beta = 0 leave the state alone, g = 0 does not decay
// it, q = 0 reads nothing.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "delta_rule_common.h"

namespace hybrid::ops::detail {

constexpr int64_t kChunk = 64;

struct ChunkLayout {
  int64_t n_chunks = 0;
  std::vector<int64_t> chunk_offsets;  // N + 1: sequence n owns chunks [chunk_offsets[n], chunk_offsets[n+1])
  at::Tensor offsets_on_device;        // chunk_offsets on the layout's device, for the state passes
  int64_t B = 0, T = 0;
  bool rows = false;  // sequences are the B rows of length T: padding and a permutation place them
  at::Tensor gather;  // [NC * C]: flattened token index, or B * T for padding (documents only)
  at::Tensor scatter; // [B * T]: position of each token in the chunk layout (documents only)
  at::Tensor runs;    // [NC, 2]: each chunk's first token and its number of tokens, the rest padding (documents only)
};

ChunkLayout chunk_layout(const Problem& p, bool documents, at::Device device);

// [B, T, H, D] -> [H, NC, C, D] in dtype, differentiable. With l2norm each row of D is divided
// by sqrt(sum x^2 + 1e-6) (FLA's epsilon) on the way, in float32 or float64. On CUDA, for a
// float32 result with 16 <= D <= 256, one kernel each way (kernels/delta_chunk_layout.cu) that reads
// x in place (any token and head strides); ATen ops otherwise.
at::Tensor to_chunks(const at::Tensor& x, const ChunkLayout& lay, at::ScalarType dtype, bool l2norm);

// to_chunks for the keys, and with bf16 keys on CUDA also the raw keys in the chunk layout (bf16,
// exact) and the factors their rows were scaled by (1 without the norm): k = diag(scale) raw, the
// form the state pass takes (two bf16 products for the keys' products instead of three). raw
// and scale carry no gradient, and are undefined on the other paths.
struct ChunkedKeys {
  at::Tensor k;      // [H, NC, C, D] in dtype, differentiable
  at::Tensor raw;    // [H, NC, C, D] bf16
  at::Tensor scale;  // [H, NC, C] float32
};
ChunkedKeys keys_to_chunks(const at::Tensor& x, const ChunkLayout& lay, at::ScalarType dtype, bool l2norm);

// The column windows of a packed qkv [B, T, 2 Hk K + Hv V] (delta_rule.h): views q, k [B, T, Hk,
// K] and v [B, T, Hv, V]. Throws std::invalid_argument when qkv's shape does not fit the heads.
struct QkvWindows {
  at::Tensor q, k, v;
};
QkvWindows windows_of(const at::Tensor& qkv, const QkvHeads& heads);

// q, k and v in the chunk layout: keys_to_chunks for k, and for q too with raw_queries (the
// state passes can take them raw: state_pass_takes_queries), to_chunks otherwise and for v.
struct ChunkedQkv {
  ChunkedKeys q, keys;
  at::Tensor v;
  // qkv_into_chunks, where the forward state pass reads v from the tokens
  // (state_pass_takes_value_tokens): v's token view, and v only a stand-in (rows_stand_in).
  at::Tensor v_tokens;
};
ChunkedQkv qkv_to_chunks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const ChunkLayout& lay,
                         at::ScalarType dtype, bool l2norm, bool raw_queries);
// The same from a packed qkv as one node (see chunk_gated_delta_rule_packed), where the layout
// kernels take all three (CUDA, bf16, Hk == Hv, a float32 layout); nullopt elsewhere.
std::optional<ChunkedQkv> packed_qkv_to_chunks(const at::Tensor& qkv, const QkvHeads& heads, const ChunkLayout& lay,
                                               at::ScalarType dtype, bool l2norm, bool raw_queries);

#ifdef HYBRID_CUDA_KERNELS
// The layout inside the op's own autograd node, whose backward writes the inputs' gradients into
// the tokens itself (dq and dk by the finish kernel, through the norm's backward: FinishTokens; dv
// by values_into_tokens): q, k and v into the chunk layout with no node of their own, q and k with
// their raw rows and scales. Where the layout kernels take all three: CUDA, bf16 q, k, v [B, T, H,
// D] with equal heads, a float32 layout, B * T below 2^32. With values_in_tokens v is not copied:
// the forward state pass reads it from the tokens (ChunkedQkv::v_tokens; documents by the layout's
// runs), and ChunkedQkv::v only stands in for its shape (rows_stand_in).
bool layout_in_op(const QkvWindows& x, const ChunkLayout& lay, at::ScalarType dtype);
// Without float_keys the layout writes q and k's raw rows and scales alone, ChunkedKeys::k a
// stand-in (rows_stand_in), where every reader takes the raw rows (raw_rows_suffice in the op).
ChunkedQkv qkv_into_chunks(const QkvWindows& x, const ChunkLayout& lay, bool l2norm, bool values_in_tokens,
                           bool float_keys = true);
// A float32 tensor of `sizes` that holds no rows: one NaN a device, made once and expanded. It
// carries the shape, dtype and device of rows that are not copied; a kernel that read it by mistake
// would turn the results into NaN, which every GPU test checks for, rather than into quiet zeros.
at::Tensor rows_stand_in(at::IntArrayRef sizes, const at::TensorOptions& options);
// dv [H, NC, C, V] float32 (contiguous) out of the chunk layout into dx, bf16 [B, T, H, V] or a
// column window of a wider tensor (to_chunks' gradient without the norm).
void values_into_tokens(const at::Tensor& dv, const ChunkLayout& lay, at::Tensor& dx);
#endif

// o's gradient dO [B, T, H, V] (bf16 or float32) into the chunk layout in float32 (dO_bf16 with
// bf16 tokens: in bf16, the same values in half the bytes), with the reverse state pass's add = s
// QKG^T dO formed on the way in float32 (kernels/delta_output_grad.cu: the batched product would
// read dO back), stored in float32 (dO_bf16: rounded to bf16); QKG float32 [H, NC, C, C]. nullopt where the kernel does not take dO (CUDA
// builds, V a multiple of 16 up to 256, rows aligned to 4 elements).
struct OutputGradChunks {
  at::Tensor dO, add;  // [H, NC, C, V]
};
std::optional<OutputGradChunks> output_grad_into_chunks(const at::Tensor& dO, const at::Tensor& QKG,
                                                        const ChunkLayout& lay, double scale, bool tf32,
                                                        bool dO_bf16 = false);

// [H, NC, C, D] -> [B, T, H, D] in dtype, differentiable; on CUDA for float32 x with 16 <= D <=
// 256 by the same kernels as to_chunks, the other way round.
at::Tensor from_chunks(const at::Tensor& x, const ChunkLayout& lay, at::ScalarType dtype);

}  // namespace hybrid::ops::detail
