// See matmul_onto.h. cuBLASLt is column-major: the row-major [M, N] result is the column-major
// N x M matrix D^T = w x^T, whose A is w's memory read transposed (K x N column-major, ld K) and
// whose B is x's as it is (K x M column-major, ld K); C and D are N x M with ld N.
#include "hybrid/ops/matmul_onto.h"

#ifdef HYBRID_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <limits>
#endif

namespace hybrid::ops {

#ifdef HYBRID_CUDA_KERNELS
namespace {

// Owns a cuBLASLt descriptor and destroys it at scope exit, whatever happens in between.
template <class T, cublasStatus_t (*Destroy)(T)>
struct LtDescriptor {
  T handle = nullptr;
  ~LtDescriptor() {
    if (handle) Destroy(handle);
  }
};

bool applies(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& w) {
  const bool low = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const int64_t limit = std::numeric_limits<int32_t>::max();
  return residual.is_cuda() && x.device() == residual.device() && w.device() == residual.device() && low &&
         w.scalar_type() == x.scalar_type() && residual.scalar_type() == at::kFloat && residual.dim() == 2 &&
         x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && residual.size(0) == x.size(0) &&
         residual.size(1) == w.size(0) && residual.is_contiguous() && x.is_contiguous() && w.is_contiguous() &&
         x.size(0) > 0 && w.size(0) > 0 && x.size(1) > 0 && x.size(0) <= limit && w.size(0) <= limit &&
         x.size(1) <= limit;
}

}  // namespace
#endif

at::Tensor matmul_onto([[maybe_unused]] const at::Tensor& residual, [[maybe_unused]] const at::Tensor& x,
                       [[maybe_unused]] const at::Tensor& w) {
#ifdef HYBRID_CUDA_KERNELS
  if (!applies(residual, x, w)) return {};
  const c10::cuda::CUDAGuard guard(residual.device());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const cudaDataType_t low = x.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;

  LtDescriptor<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy> op;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&op.handle, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
  TORCH_CUDABLAS_CHECK(
      cublasLtMatmulDescSetAttribute(op.handle, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(op.handle, CUBLASLT_MATMUL_DESC_TRANSB, &keep, sizeof(keep)));
  LtDescriptor<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy> a, b, c;
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&a.handle, low, K, N, K));  // w
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&b.handle, low, K, M, K));  // x
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&c.handle, CUDA_R_32F, N, M, N));  // residual and out

  // The workspace PyTorch keeps for its own cuBLASLt calls on this stream's device.
  const size_t workspace_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
  LtDescriptor<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy> preference;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference.handle));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      preference.handle, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes, sizeof(workspace_bytes)));
  cublasLtHandle_t lt = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  // No algorithm for these operands (an unsupported case, not an error): the caller's addmm.
  if (cublasLtMatmulAlgoGetHeuristic(lt, op.handle, a.handle, b.handle, c.handle, c.handle, preference.handle, 1,
                                     &heuristic, &found) != CUBLAS_STATUS_SUCCESS ||
      found == 0)
    return {};
  at::Tensor out = at::empty_like(residual);
  const float one = 1.f;
  TORCH_CUDABLAS_CHECK(cublasLtMatmul(lt, op.handle, &one, w.data_ptr(), a.handle, x.data_ptr(), b.handle, &one,
                                      residual.data_ptr(), c.handle, out.data_ptr(), c.handle, &heuristic.algo,
                                      at::cuda::getCUDABlasLtWorkspace(), workspace_bytes,
                                      at::cuda::getCurrentCUDAStream()));
  return out;
#else
  return {};
#endif
}

}  // namespace hybrid::ops
