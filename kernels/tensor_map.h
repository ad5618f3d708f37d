// Host side of TMA bulk tensor copies (sm_90): the CUtensorMap of a row-major matrix, for
// the kernels that load or store boxes of it with cp.async.bulk.tensor (cp_async.cuh). The
// driver's cuTensorMapEncodeTiled, found through the runtime once: the build links no libcuda.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace hybrid::ops::detail {

// A [rows, cols] row-major matrix of `type` (elements of element_bytes) in boxes of box_rows x
// box_cols, laid out in shared memory with `swizzle`; an unused map where data is null. `who` names
// the caller in errors. Rows row_stride elements apart (0: cols; e.g. a column window of wider rows).
inline CUtensorMap tensor_map_2d(CUtensorMapDataType type, int element_bytes, const void* data, int64_t rows,
                                 int64_t cols, int box_cols, int box_rows, CUtensorMapSwizzle swizzle,
                                 const char* who, int64_t row_stride = 0) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    TORCH_CHECK(fn && found == cudaDriverEntryPointSuccess, "no cuTensorMapEncodeTiled in the CUDA driver");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map{};
  if (!data) return map;
  TORCH_CHECK(rows < (int64_t{1} << 31), who, ": more rows than bulk tensor copies address");
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(element_bytes) *
                                 static_cast<cuuint64_t>(row_stride > 0 ? row_stride : cols)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)}, steps[2] = {1, 1};
  const CUresult r = encode(&map, type, 2, const_cast<void*>(data), dims, strides, box, steps,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, who, ": cuTensorMapEncodeTiled failed (", static_cast<int>(r), ")");
  return map;
}

// The same for a float32 matrix.
inline CUtensorMap float_tensor_map(const float* data, int64_t rows, int64_t cols, int box_cols, int box_rows,
                                    CUtensorMapSwizzle swizzle, const char* who) {
  return tensor_map_2d(CU_TENSOR_MAP_DATA_TYPE_FLOAT32, sizeof(float), data, rows, cols, box_cols, box_rows, swizzle,
                       who);
}
// The same for a bf16 matrix (row_stride in elements, 0: cols).
inline CUtensorMap bf16_tensor_map(const void* data, int64_t rows, int64_t cols, int box_cols, int box_rows,
                                   CUtensorMapSwizzle swizzle, const char* who, int64_t row_stride = 0) {
  return tensor_map_2d(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, data, rows, cols, box_cols, box_rows, swizzle, who,
                       row_stride);
}

}  // namespace hybrid::ops::detail
