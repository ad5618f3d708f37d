// See delta_chunk_layout.h.
#include "delta_chunk_layout.h"

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "hybrid/util/host_to_device.h"

namespace hybrid::ops::detail {

#ifdef HYBRID_CUDA_KERNELS
at::Tensor to_chunks_cuda(const at::Tensor& x, const at::Tensor& gather, int64_t rows, bool l2norm);
std::vector<at::Tensor> keys_to_chunks_cuda(const at::Tensor& x, const at::Tensor& gather, int64_t rows, bool l2norm,
                                            bool floats = true);
void to_chunks_backward_cuda(const at::Tensor& x, const at::Tensor& gather, const at::Tensor& dy, bool l2norm,
                             at::Tensor& dx);
at::Tensor from_chunks_cuda(const at::Tensor& y, const at::Tensor& gather, int64_t B, int64_t T, at::ScalarType dtype);
bool output_grad_kernel_takes(const at::Tensor& dO_tokens);
std::vector<at::Tensor> output_grad_to_chunks_cuda(const at::Tensor& dO_tokens, const at::Tensor& QKG,
                                                   const at::Tensor& gather, double scale, bool tf32, bool dO_bf16);
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A copy of a strided view in `dtype`, contiguous: the layout change and the cast in one pass.
at::Tensor cast_copy(const at::Tensor& view, at::ScalarType dtype) {
  return at::empty(view.sizes(), view.options().dtype(dtype)).copy_(view);
}

// x.permute(perm), contiguous, in dtype: one copy, and one copy back in the backward (through
// autograd's copy_ the backward would cast, then leave a permuted view for a second copy).
struct PermuteCast : torch::autograd::Function<PermuteCast> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::vector<int64_t>& perm,
                            at::ScalarType dtype) {
    std::vector<int64_t> inverse(perm.size());
    for (size_t i = 0; i < perm.size(); ++i) inverse[perm[i]] = static_cast<int64_t>(i);
    ctx->saved_data["inverse"] = inverse;
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    return cast_copy(x.permute(perm), dtype);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {cast_copy(grads[0].permute(ctx->saved_data["inverse"].toIntVector()), dtype), at::Tensor(), at::Tensor()};
  }
};

// [B, T, H, D] -> [H, NC, C, D] in dtype by ATen ops.
at::Tensor to_chunks_aten(const at::Tensor& x, const ChunkLayout& lay, at::ScalarType dtype) {
  const int64_t H = x.size(2), D = x.size(3);
  if (lay.rows) {
    // Pad, then one copy for layout and dtype. (Copying into a view of a zeroed buffer instead
    // costs a clone of the gradient in the backward.)
    const int64_t padded_T = lay.n_chunks / lay.B * kChunk;
    at::Tensor padded = padded_T == lay.T ? x : at::constant_pad_nd(x, {0, 0, 0, 0, 0, padded_T - lay.T});
    return PermuteCast::apply(padded, std::vector<int64_t>{2, 0, 1, 3}, dtype).view({H, lay.n_chunks, kChunk, D});
  }
  at::Tensor flat = x.reshape({-1, H, D});
  at::Tensor padded = at::cat({flat, at::zeros({1, H, D}, x.options())});
  return PermuteCast::apply(padded.index_select(0, lay.gather).view({lay.n_chunks, kChunk, H, D}),
                            std::vector<int64_t>{2, 0, 1, 3}, dtype);
}

#ifdef HYBRID_CUDA_KERNELS
// The gather map travels outside the tensor arguments: autograd's apply cannot take an
// undefined tensor, which stands for rows of the batch.
struct Gather {
  at::Tensor index;
};
Gather gather_of(const ChunkLayout& lay) { return Gather{lay.rows ? at::Tensor() : lay.gather}; }
at::Tensor saved_gather(AutogradContext* ctx) {
  return ctx->saved_data.count("gather") ? ctx->saved_data["gather"].toTensor() : at::Tensor();
}

// The kernels' path: x read in place, layout, cast and norm in one pass each way. Keeps x for
// the backward (q, k and v are views of the conv's output, which stays alive for all three).
// with_raw: also the raw rows and their scales (keys_to_chunks_cuda), outputs without gradient:
// their gradients are not materialised (autograd would fill a zero tensor of each, the raw rows'
// as large as x, at every backward).
struct ToChunksFused : torch::autograd::Function<ToChunksFused> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const Gather& gather, int64_t rows,
                               bool l2norm, bool with_raw) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x});
    if (gather.index.defined()) ctx->saved_data["gather"] = gather.index;
    ctx->saved_data["l2norm"] = l2norm;
    if (!with_raw) return {to_chunks_cuda(x, gather.index, rows, l2norm)};
    variable_list out = keys_to_chunks_cuda(x, gather.index, rows, l2norm);
    ctx->mark_non_differentiable({out[1], out[2]});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor x = ctx->get_saved_variables()[0];
    at::Tensor dx = at::empty(x.sizes(), x.options());
    to_chunks_backward_cuda(x, saved_gather(ctx), grads[0].contiguous(), ctx->saved_data["l2norm"].toBool(), dx);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// q, k and v [B, T, H, D] as the column windows of one tensor qkv [B, T, W] (GDN's conv output),
// into the chunk layout like ToChunksFused (q and k with their raw rows and scales), as one node: its
// backward writes the three gradients side by side into one tensor of qkv's shape, where three
// nodes' gradients would be concatenated into it by the slices' backward (a pass over all of it).
// Without raw_queries, q's raw rows and scales come back empty. Gradients are not materialised,
// as in ToChunksFused.
struct QkvToChunksFused : torch::autograd::Function<QkvToChunksFused> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, const QkvHeads& heads, const Gather& gather,
                               int64_t rows, bool l2norm, bool raw_queries) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({qkv});
    if (gather.index.defined()) ctx->saved_data["gather"] = gather.index;
    ctx->saved_data["heads"] = std::vector<int64_t>{heads.k_heads, heads.k_dim, heads.v_heads, heads.v_dim};
    ctx->saved_data["l2norm"] = l2norm;
    const QkvWindows x = windows_of(qkv, heads);
    const at::Tensor none = at::empty({0}, qkv.options());
    variable_list q = raw_queries ? keys_to_chunks_cuda(x.q, gather.index, rows, l2norm)
                                  : variable_list{to_chunks_cuda(x.q, gather.index, rows, l2norm), none, none.clone()},
                  k = keys_to_chunks_cuda(x.k, gather.index, rows, l2norm);
    ctx->mark_non_differentiable({q[1], q[2], k[1], k[2]});
    return {q[0], q[1], q[2], k[0], k[1], k[2], to_chunks_cuda(x.v, gather.index, rows, false)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor qkv = ctx->get_saved_variables()[0];
    const auto h = ctx->saved_data["heads"].toIntVector();
    const bool l2norm = ctx->saved_data["l2norm"].toBool();
    const at::Tensor gather = saved_gather(ctx);
    at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
    const QkvHeads heads{h[0], h[1], h[2], h[3]};
    const QkvWindows x = windows_of(qkv, heads), dx = windows_of(dqkv, heads);
    const at::Tensor inputs[] = {x.q, x.k, x.v}, part_grads[] = {grads[0], grads[3], grads[6]};
    at::Tensor windows[] = {dx.q, dx.k, dx.v};
    for (int i = 0; i < 3; ++i) {  // the norm's gradient for q and k, none for v
      if (!part_grads[i].defined()) windows[i].zero_();
      else to_chunks_backward_cuda(inputs[i], gather, part_grads[i].contiguous(), l2norm && i < 2, windows[i]);
    }
    return {dqkv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// from_chunks on the same kernels, the other way round: out of the chunk layout into tokens
// (cast on the way), and the gradient into the chunk layout (read in place, any strides).
struct FromChunksFused : torch::autograd::Function<FromChunksFused> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const Gather& gather, int64_t B, int64_t T,
                            at::ScalarType dtype) {
    if (gather.index.defined()) ctx->saved_data["gather"] = gather.index;
    ctx->saved_data["shape"] = y.sizes().vec();
    const int64_t H = y.size(0), D = y.size(3);
    return from_chunks_cuda(y.view({H, -1, D}), gather.index, B, T, dtype);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor gather = saved_gather(ctx);
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const at::Tensor& g = grads[0];
    const at::Tensor dy = to_chunks_cuda(g.stride(3) == 1 ? g : g.contiguous(), gather, shape[1] * shape[2], false);
    return {dy.view(shape), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Whether the layout kernels take x [B, T, H, D] into a float32 layout. Rows of at least 16: a
// warp a row would leave most lanes idle on the gates' rows of one.
bool fused_to_chunks(const at::Tensor& x, at::ScalarType dtype) {
  const int64_t D = x.size(3);
  return x.is_cuda() && dtype == at::kFloat && x.scalar_type() != at::kDouble && D >= 16 && D <= 256 &&
         x.stride(3) == 1;
}
#endif

}  // namespace

QkvWindows windows_of(const at::Tensor& qkv, const QkvHeads& h) {
  const int64_t qk = h.k_heads * h.k_dim, width = 2 * qk + h.v_heads * h.v_dim;
  if (qkv.dim() != 3 || qkv.size(-1) != width || h.k_heads <= 0 || h.k_dim <= 0 || h.v_heads <= 0 || h.v_dim <= 0)
    throw std::invalid_argument("chunk_gated_delta_rule_packed: qkv must be [B, T, 2 Hk K + Hv V] = [B, T, " +
                                std::to_string(width) + "], got " + c10::str(qkv.sizes()));
  return {qkv.narrow(-1, 0, qk).unflatten(-1, {h.k_heads, h.k_dim}),
          qkv.narrow(-1, qk, qk).unflatten(-1, {h.k_heads, h.k_dim}),
          qkv.narrow(-1, 2 * qk, h.v_heads * h.v_dim).unflatten(-1, {h.v_heads, h.v_dim})};
}

ChunkLayout chunk_layout(const Problem& p, bool documents, at::Device device) {
  ChunkLayout lay;
  lay.B = p.B, lay.T = p.T, lay.rows = !documents;
  lay.chunk_offsets.push_back(0);
  for (int64_t n = 0; n < p.N; ++n)
    lay.chunk_offsets.push_back(lay.chunk_offsets.back() + (p.offsets[n + 1] - p.offsets[n] + kChunk - 1) / kChunk);
  lay.n_chunks = lay.chunk_offsets.back();
  const int64_t N = p.N;
  if (lay.rows) {
    lay.offsets_on_device = util::to_device_async(lay.chunk_offsets, device);
    return lay;
  }
  std::vector<int64_t> gather(lay.n_chunks * kChunk, p.B * p.T), scatter(p.B * p.T), runs(2 * lay.n_chunks);
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t t = p.offsets[n]; t < p.offsets[n + 1]; ++t) {
      const int64_t at = lay.chunk_offsets[n] * kChunk + (t - p.offsets[n]);
      gather[at] = t;
      scatter[t] = at;
    }
    for (int64_t c = lay.chunk_offsets[n]; c < lay.chunk_offsets[n + 1]; ++c) {
      const int64_t first = p.offsets[n] + (c - lay.chunk_offsets[n]) * kChunk;
      runs[2 * c] = first, runs[2 * c + 1] = std::min(kChunk, p.offsets[n + 1] - first);
    }
  }
  // One copy for the four index maps (each a copy's launch and gap), each map at a multiple of 32
  // values (256 bytes, as an allocation of its own would be) for the kernels' vector loads.
  std::vector<int64_t> maps;
  std::vector<int64_t> starts;
  for (const std::vector<int64_t>* x : {&lay.chunk_offsets, &gather, &scatter, &runs}) {
    maps.resize((maps.size() + 31) / 32 * 32);
    starts.push_back(static_cast<int64_t>(maps.size()));
    maps.insert(maps.end(), x->begin(), x->end());
  }
  const at::Tensor on_device = util::to_device_async(maps, device);
  lay.offsets_on_device = on_device.narrow(0, starts[0], N + 1);
  lay.gather = on_device.narrow(0, starts[1], static_cast<int64_t>(gather.size()));
  lay.scatter = on_device.narrow(0, starts[2], static_cast<int64_t>(scatter.size()));
  lay.runs = on_device.narrow(0, starts[3], static_cast<int64_t>(runs.size())).view({lay.n_chunks, 2});
  return lay;
}

at::Tensor to_chunks(const at::Tensor& x, const ChunkLayout& lay, at::ScalarType dtype, bool l2norm) {
  const int64_t H = x.size(2), D = x.size(3);
#ifdef HYBRID_CUDA_KERNELS
  if (fused_to_chunks(x, dtype)) {
    at::Tensor y = ToChunksFused::apply(x, gather_of(lay), lay.n_chunks * kChunk, l2norm, false)[0];
    return y.view({H, lay.n_chunks, kChunk, D});
  }
#endif
  return to_chunks_aten(l2norm ? l2_normalize(x, dtype) : x, lay, dtype);
}

ChunkedKeys keys_to_chunks(const at::Tensor& x, const ChunkLayout& lay, at::ScalarType dtype, bool l2norm) {
#ifdef HYBRID_CUDA_KERNELS
  const int64_t H = x.size(2), D = x.size(3);
  if (fused_to_chunks(x, dtype) && x.scalar_type() == at::kBFloat16) {
    auto out = ToChunksFused::apply(x, gather_of(lay), lay.n_chunks * kChunk, l2norm, true);
    return {out[0].view({H, lay.n_chunks, kChunk, D}), out[1].view({H, lay.n_chunks, kChunk, D}),
            out[2].view({H, lay.n_chunks, kChunk})};
  }
#endif
  return {to_chunks(x, lay, dtype, l2norm), at::Tensor(), at::Tensor()};
}

ChunkedQkv qkv_to_chunks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const ChunkLayout& lay,
                         at::ScalarType dtype, bool l2norm, bool raw_queries) {
  ChunkedKeys queries = raw_queries ? keys_to_chunks(q, lay, dtype, l2norm) : ChunkedKeys{to_chunks(q, lay, dtype, l2norm)};
  return {queries, keys_to_chunks(k, lay, dtype, l2norm), to_chunks(v, lay, dtype, false)};
}

std::optional<ChunkedQkv> packed_qkv_to_chunks(const at::Tensor& qkv, const QkvHeads& heads, const ChunkLayout& lay,
                                               at::ScalarType dtype, bool l2norm, bool raw_queries) {
#ifdef HYBRID_CUDA_KERNELS
  const QkvWindows x = windows_of(qkv, heads);
  if (heads.k_heads == heads.v_heads && qkv.scalar_type() == at::kBFloat16 && fused_to_chunks(x.q, dtype) &&
      fused_to_chunks(x.v, dtype)) {
    const int64_t H = heads.k_heads, NC = lay.n_chunks;
    auto out = QkvToChunksFused::apply(qkv, heads, gather_of(lay), NC * kChunk, l2norm, raw_queries);
    auto rows_of = [&](int i, bool raw) -> ChunkedKeys {
      ChunkedKeys rows{out[i].view({H, NC, kChunk, heads.k_dim})};
      if (raw) rows.raw = out[i + 1].view({H, NC, kChunk, heads.k_dim}), rows.scale = out[i + 2].view({H, NC, kChunk});
      return rows;
    };
    return ChunkedQkv{rows_of(0, raw_queries), rows_of(3, true), out[6].view({H, NC, kChunk, heads.v_dim})};
  }
#endif
  return std::nullopt;
}

#ifdef HYBRID_CUDA_KERNELS
bool layout_in_op(const QkvWindows& x, const ChunkLayout& lay, at::ScalarType dtype) {
  return x.q.scalar_type() == at::kBFloat16 && x.k.scalar_type() == at::kBFloat16 &&
         x.v.scalar_type() == at::kBFloat16 && x.q.size(2) == x.v.size(2) && x.k.size(2) == x.v.size(2) &&
         fused_to_chunks(x.q, dtype) && fused_to_chunks(x.k, dtype) && fused_to_chunks(x.v, dtype) &&
         lay.B * lay.T < (int64_t{1} << 32);
}

at::Tensor rows_stand_in(at::IntArrayRef sizes, const at::TensorOptions& options) {
  // One NaN a device, made at the first call: a fill a call was a launch and its gap, three a
  // forward. Never freed: a static tensor's destructor would run after CUDA's teardown at exit.
  static std::mutex mutex;
  static std::unordered_map<c10::Device, const at::Tensor*> nan_of_device;
  const c10::Device device = options.device();
  const std::lock_guard<std::mutex> lock(mutex);
  const at::Tensor*& nan = nan_of_device[device];
  if (nan == nullptr)
    nan = new at::Tensor(at::full({1}, std::numeric_limits<float>::quiet_NaN(), options.dtype(at::kFloat)));
  return nan->expand(sizes);
}

ChunkedQkv qkv_into_chunks(const QkvWindows& x, const ChunkLayout& lay, bool l2norm, bool values_in_tokens,
                           bool float_keys) {
  const int64_t H = x.v.size(2), NC = lay.n_chunks, rows = NC * kChunk;
  const at::Tensor gather = gather_of(lay).index;
  auto keys = [&](const at::Tensor& t) {
    const std::vector<at::Tensor> out = keys_to_chunks_cuda(t, gather, rows, l2norm, float_keys);
    const int64_t D = t.size(3);
    const at::Tensor floats =
        float_keys ? out[0].view({H, NC, kChunk, D}) : rows_stand_in({H, NC, kChunk, D}, t.options());
    return ChunkedKeys{floats, out[1].view({H, NC, kChunk, D}), out[2].view({H, NC, kChunk})};
  };
  const int64_t V = x.v.size(3);
  if (values_in_tokens) return {keys(x.q), keys(x.k), rows_stand_in({H, NC, kChunk, V}, x.v.options()), x.v};
  return {keys(x.q), keys(x.k), to_chunks_cuda(x.v, gather, rows, false).view({H, NC, kChunk, V})};
}

void values_into_tokens(const at::Tensor& dv, const ChunkLayout& lay, at::Tensor& dx) {
  const at::Tensor dy = dv.contiguous();
  to_chunks_backward_cuda(at::Tensor(), gather_of(lay).index, dy.view({dy.size(0), -1, dy.size(3)}), false, dx);
}

#endif

std::optional<OutputGradChunks> output_grad_into_chunks(const at::Tensor& dO, const at::Tensor& QKG,
                                                        const ChunkLayout& lay, double scale, bool tf32,
                                                        bool dO_bf16) {
#ifdef HYBRID_CUDA_KERNELS
  if (QKG.scalar_type() != at::kFloat || !output_grad_kernel_takes(dO)) return std::nullopt;
  const std::vector<at::Tensor> out = output_grad_to_chunks_cuda(
      dO, QKG, gather_of(lay).index, scale, tf32, dO_bf16 && dO.scalar_type() == at::kBFloat16);
  return OutputGradChunks{out[0], out[1]};
#else
  (void)dO, (void)QKG, (void)lay, (void)scale, (void)tf32, (void)dO_bf16;
  return std::nullopt;
#endif
}

at::Tensor from_chunks(const at::Tensor& x, const ChunkLayout& lay, at::ScalarType dtype) {
  const int64_t H = x.size(0), D = x.size(3);
#ifdef HYBRID_CUDA_KERNELS
  if (x.is_cuda() && x.scalar_type() == at::kFloat && x.is_contiguous() && dtype != at::kDouble && D >= 16 && D <= 256)
    return FromChunksFused::apply(x, gather_of(lay), lay.B, lay.T, dtype);
#endif
  if (lay.rows) {
    // No narrow when nothing is padded: its backward would zero a buffer and copy into it.
    const int64_t padded_T = lay.n_chunks / lay.B * kChunk;
    at::Tensor rows = x.view({H, lay.B, padded_T, D});
    if (padded_T != lay.T) rows = rows.narrow(2, 0, lay.T);
    return PermuteCast::apply(rows, std::vector<int64_t>{1, 2, 0, 3}, dtype);
  }
  return x.permute({1, 2, 0, 3}).reshape({-1, H, D}).index_select(0, lay.scatter).view({lay.B, lay.T, H, D}).to(dtype);
}

}  // namespace hybrid::ops::detail
