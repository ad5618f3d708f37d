// NumPy .npy files (format versions 1-3): a bounds-checked header parser shared by the
// token-shard reader and the tools, plus whole-array read and write.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace hybrid::io {

struct NpyHeader {
  at::ScalarType dtype;
  std::string descr;          // e.g. "<u4"
  std::vector<int64_t> shape;
  uint64_t data_offset = 0;   // bytes from the start of the file
  uint64_t numel = 0;
};

// Parses the header at the start of `bytes` (a whole file of `size` bytes) and checks that the
// data it describes fits. Errors name `path` and what is wrong.
NpyHeader parse_npy_header(const uint8_t* bytes, uint64_t size, const std::string& path);

at::Tensor read_npy(const std::string& path);
void write_npy(const std::string& path, const at::Tensor& tensor);

}  // namespace hybrid::io
