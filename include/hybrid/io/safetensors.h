// safetensors files: an 8-byte little-endian header length, a JSON header
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the
// tensor bytes. The reader checks every length, offset and dtype against the file before
// touching data, so a truncated or hostile file is one clear error, never a crash or a huge
// allocation. No code is ever run on load (unlike pickle).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace hybrid::io {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct TensorFile {
  // In file order, CPU: views of the file's copy-on-write map (kept while a tensor lives; writes
  // stay in this process), read from disk as first touched.
  NamedTensors tensors;
  std::map<std::string, std::string> metadata;
  const at::Tensor* find(const std::string& name) const;
};

TensorFile read_safetensors(const std::string& path);

// Writes tensors (any device; each copied to host as it is written) atomically; names must be unique.
void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace hybrid::io
