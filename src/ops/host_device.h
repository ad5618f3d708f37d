// HYBRID_HOST_DEVICE: a function of plain C++ that the CPU code and the CUDA kernels both call
// (one definition of the math, or of an order, for the two).
#pragma once

#ifdef __CUDACC__
#define HYBRID_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HYBRID_HOST_DEVICE inline
#endif
