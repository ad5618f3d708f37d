// See chunk_matmul.h. cuBLAS is column-major: a row-major M x N product C = A B is the
// column-major N x M product C^T = B^T A^T, so B comes first.
#include "chunk_matmul.h"

#ifdef HYBRID_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <optional>
#include <vector>
#endif

namespace hybrid::ops::detail {

#ifdef HYBRID_CUDA_KERNELS
namespace {

// A matrix of the batch as cuBLAS sees it: `op` applied to the column-major matrix at the
// pointer with leading dimension ld yields the row-major matrix transposed.
struct Operand {
  cublasOperation_t op;
  int64_t ld;
};

// x [..., R, C] with unit stride along C (row-major) or along R (a transposed view).
std::optional<Operand> as_operand(const at::Tensor& x) {
  const int64_t rs = x.stride(-2), cs = x.stride(-1);
  if (cs == 1 && rs >= x.size(-1)) return Operand{CUBLAS_OP_N, rs};
  if (rs == 1 && cs >= x.size(-2)) return Operand{CUBLAS_OP_T, cs};
  return std::nullopt;
}

// The leading dims flatten to one batch stride (contiguous, or a transposed view of it).
std::optional<int64_t> batch_stride(const at::Tensor& x) {
  int64_t expected = x.size(-2) * x.size(-1);
  for (int64_t d = x.dim() - 3; d >= 0; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return std::nullopt;
    expected *= x.size(d);
  }
  return x.size(-2) * x.size(-1);
}

}  // namespace
#endif

at::Tensor chunk_matmul(const at::Tensor& a, const at::Tensor& b, bool tf32, double alpha, const at::Tensor& into) {
#ifdef HYBRID_CUDA_KERNELS
  if (tf32 && a.is_cuda() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.dim() == b.dim() &&
      a.dim() >= 3 && a.sizes().slice(0, a.dim() - 2) == b.sizes().slice(0, b.dim() - 2)) {
    const auto oa = as_operand(a), ob = as_operand(b);
    const auto sa = batch_stride(a), sb = batch_stride(b);
    if (oa && ob && sa && sb) {
      const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
      TORCH_CHECK(b.size(-2) == K, "chunk_matmul: inner dims differ");
      std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
      shape.back() = N;
      TORCH_CHECK(!into.defined() || (into.sizes() == at::IntArrayRef(shape) && into.is_contiguous() &&
                                      into.scalar_type() == at::kFloat),
                  "chunk_matmul: `into` must be contiguous float32 of the product's shape");
      at::Tensor c = into.defined() ? into : at::empty(shape, a.options());
      const int64_t batch = c.numel() / (M * N);
      if (c.numel() == 0) return c;
      if (K == 0) return into.defined() ? c : c.zero_();
      const c10::cuda::CUDAGuard guard(a.device());
      const float scale = static_cast<float>(alpha), keep = into.defined() ? 1.f : 0.f;
      TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
          at::cuda::getCurrentCUDABlasHandle(), ob->op, oa->op, N, M, K, &scale, b.data_ptr(), CUDA_R_32F, ob->ld, *sb,
          a.data_ptr(), CUDA_R_32F, oa->ld, *sa, &keep, c.data_ptr(), CUDA_R_32F, N, M * N, batch,
          CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
      return c;
    }
  }
#endif
  (void)tf32;
  if (into.defined()) return into.add_(at::matmul(a, b), alpha);
  return alpha == 1 ? at::matmul(a, b) : at::matmul(a, b).mul_(alpha);
}

}  // namespace hybrid::ops::detail
