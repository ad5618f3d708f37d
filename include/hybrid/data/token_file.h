// One file of tokens, memory-mapped and read without copying the file: OLMo-style headerless
// token files (little-endian uint16/uint32, documents separated by EOS), NumPy .npy (1-D
// integer arrays), and Megatron .bin + .idx (MMIDIDX version 1, sequences read in .idx order).
// Whatever the format, a file is one stream of tokens; every problem with it is an error
// naming the file (and the offset, for bad token ids).
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

namespace hybrid::data {

class TokenFile {
 public:
  virtual ~TokenFile() = default;
  const std::string& path() const { return path_; }
  uint64_t num_tokens() const { return num_tokens_; }
  // Copies tokens [offset, offset + count) into out, checking each id against vocab_size.
  void read(uint64_t offset, uint64_t count, int64_t* out) const;

  // format: auto (by extension: .npy, .bin/.idx, else raw) | raw | npy | megatron.
  // dtype (raw files): auto (metadata.json beside the file, else by vocab size) | uint16 | uint32.
  static std::unique_ptr<TokenFile> open(const std::string& path, const std::string& format,
                                         const std::string& dtype, int64_t vocab_size);

 protected:
  TokenFile(std::string path, int64_t vocab_size) : path_(std::move(path)), vocab_size_(vocab_size) {}
  // Copies raw ids (no checks) of a span that the format knows how to address.
  virtual void copy(uint64_t offset, uint64_t count, int64_t* out) const = 0;
  std::string path_;
  int64_t vocab_size_;
  uint64_t num_tokens_ = 0;
};

// metadata.json as scripts/prepare_data.py writes it beside token shards.
struct DataMetadata {
  std::string dtype;
  int64_t vocab_size = 0;
  int64_t eos_id = -1;
};
// The metadata.json in the folder of `data_file`, if there is one (malformed: an error naming it).
std::optional<DataMetadata> read_metadata_beside(const std::string& data_file);

// The dtype code of a Megatron .idx header (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16)
// and the parsed index; exposed for the fuzz test.
struct MegatronIndex {
  int dtype_code = 0;
  uint64_t element_size = 0;
  uint64_t num_sequences = 0, num_documents = 0;
  const uint8_t* lengths = nullptr;   // int32 [num_sequences], in the mapped .idx (unaligned)
  const uint8_t* pointers = nullptr;  // int64 byte offsets into .bin [num_sequences]
  int32_t length(uint64_t i) const { int32_t v; std::memcpy(&v, lengths + 4 * i, 4); return v; }
  int64_t pointer(uint64_t i) const { int64_t v; std::memcpy(&v, pointers + 8 * i, 8); return v; }
};
MegatronIndex parse_megatron_index(const uint8_t* bytes, uint64_t size, uint64_t bin_size, const std::string& path);

}  // namespace hybrid::data
