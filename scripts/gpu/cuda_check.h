// For the standalone CUDA programs in scripts/gpu (probes, stage benchmarks): a CUDA runtime call
// that fails prints its text and error, and main returns 1.
#pragma once

#include <cstdio>

#define CHECK(x)                                          \
  do {                                                    \
    cudaError_t e = (x);                                  \
    if (e != cudaSuccess) {                               \
      std::printf("%s: %s\n", #x, cudaGetErrorString(e)); \
      return 1;                                           \
    }                                                     \
  } while (0)
