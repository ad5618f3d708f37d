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

#include "hybrid/util/crc32.h"

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

// A safetensors file that several processes write together, each its own entries at their
// places: a checkpoint's files at several ranks, where no rank gathers the others' state. Every
// process holds the same entries in file order, its own tensors and meta tensors (dtype and shape
// only) for the others'; the file is byte for byte what write_safetensors writes from all of them.
struct ShardedTensors {
  NamedTensors entries;
  std::vector<int> writer;  // the process that writes each entry
  std::map<std::string, std::string> metadata = {};
};
struct WrittenShare {
  std::vector<util::CrcRange> ranges;  // the runs of bytes this process wrote, with their CRC-32s
  std::vector<std::pair<size_t, uint32_t>> entry_crcs;  // each entry it wrote (its index) and its bytes' CRC-32
  uint64_t file_size = 0;
  uint64_t header_size = 0;  // the header's bytes (length, JSON, padding) and, on rank 0, their CRC-32
  uint32_t header_crc = 0;
};
// Writes `rank`'s entries of `file` (each copied to host as it is written) into `path` at their
// offsets, and on rank 0 the header too; rank 0 also sets the file's size. Creates the file if
// missing, never truncates what others wrote, fsyncs; a rank with nothing to write touches nothing.
WrittenShare write_safetensors_share(const std::string& path, const ShardedTensors& file, int rank);

}  // namespace hybrid::io
