#include "hybrid/data/token_file.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <vector>

#include <nlohmann/json.hpp>

#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"
#include "hybrid/io/npy.h"
#include "hybrid/util/fs.h"

namespace hybrid::data {
namespace fs = std::filesystem;
namespace {

template <class T>
void widen(const uint8_t* src, uint64_t count, int64_t* out) {
  for (uint64_t i = 0; i < count; ++i) {
    T v;
    std::memcpy(&v, src + i * sizeof(T), sizeof(T));  // the data may be unaligned (.idx pointers, npy headers)
    out[i] = static_cast<int64_t>(v);
  }
}

using WidenFn = void (*)(const uint8_t*, uint64_t, int64_t*);

WidenFn widen_for(const std::string& dtype, const std::string& path) {
  if (dtype == "uint16") return widen<uint16_t>;
  if (dtype == "uint32") return widen<uint32_t>;
  if (dtype == "int32") return widen<int32_t>;
  if (dtype == "int64") return widen<int64_t>;
  throw Error(path + ": token dtype '" + dtype + "' is not supported (uint16, uint32, int32, int64)");
}

uint64_t size_of(const std::string& dtype) { return dtype == "uint16" ? 2 : dtype == "int64" ? 8 : 4; }

// A contiguous array of tokens at some offset of a mapped file (raw and .npy files).
class ArrayTokenFile : public TokenFile {
 public:
  ArrayTokenFile(const std::string& path, int64_t vocab, const std::string& dtype, uint64_t data_offset)
      : TokenFile(path, vocab), file_(path), widen_(widen_for(dtype, path)), elem_(size_of(dtype)), offset_(data_offset) {
    const uint64_t bytes = file_.size() - std::min<uint64_t>(data_offset, file_.size());
    if (bytes % elem_ != 0)
      throw Error(path + ": size " + std::to_string(file_.size()) + " bytes is not a whole number of " + dtype +
                  " tokens (truncated file or wrong dtype?)");
    num_tokens_ = bytes / elem_;
  }

 protected:
  void copy(uint64_t offset, uint64_t count, int64_t* out) const override {
    widen_(file_.data() + offset_ + offset * elem_, count, out);
  }

 private:
  io::MappedFile file_;
  WidenFn widen_;
  uint64_t elem_, offset_;
};

class MegatronTokenFile : public TokenFile {
 public:
  MegatronTokenFile(const std::string& bin_path, const std::string& idx_path, int64_t vocab)
      : TokenFile(bin_path, vocab), bin_(bin_path), idx_(idx_path) {
    index_ = parse_megatron_index(idx_.data(), idx_.size(), bin_.size(), idx_path);
    const char* names[] = {nullptr, nullptr, nullptr, nullptr, "int32", "int64", nullptr, nullptr, "uint16"};
    const char* dtype = index_.dtype_code < 9 ? names[index_.dtype_code] : nullptr;
    if (!dtype) throw Error(idx_path + ": dtype code " + std::to_string(index_.dtype_code) + " is not a token type");
    widen_ = widen_for(dtype, idx_path);
    starts_.reserve(index_.num_sequences + 1);
    starts_.push_back(0);
    for (uint64_t i = 0; i < index_.num_sequences; ++i) starts_.push_back(starts_.back() + index_.length(i));
    num_tokens_ = starts_.back();
  }

 protected:
  void copy(uint64_t offset, uint64_t count, int64_t* out) const override {
    // The sequence holding `offset`, then sequence by sequence until count tokens are copied.
    size_t s = std::upper_bound(starts_.begin(), starts_.end(), offset) - starts_.begin() - 1;
    while (count > 0) {
      const uint64_t within = offset - starts_[s], take = std::min<uint64_t>(count, starts_[s + 1] - offset);
      widen_(bin_.data() + index_.pointer(s) + within * index_.element_size, take, out);
      out += take, offset += take, count -= take, ++s;
    }
  }

 private:
  io::MappedFile bin_, idx_;
  MegatronIndex index_;
  WidenFn widen_ = nullptr;
  std::vector<uint64_t> starts_;  // first token of each sequence in the stream
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

void TokenFile::read(uint64_t offset, uint64_t count, int64_t* out) const {
  if (offset > num_tokens_ || count > num_tokens_ - offset)
    throw Error(path_ + ": read of tokens [" + std::to_string(offset) + ", " + std::to_string(offset + count) +
                ") past the end (" + std::to_string(num_tokens_) + " tokens)");
  copy(offset, count, out);
  for (uint64_t i = 0; i < count; ++i)
    if (out[i] < 0 || out[i] >= vocab_size_)
      throw Error(path_ + ": token id " + std::to_string(out[i]) + " at token offset " + std::to_string(offset + i) +
                  " is outside the vocabulary [0, " + std::to_string(vocab_size_) + ")");
}

std::unique_ptr<TokenFile> TokenFile::open(const std::string& path, const std::string& format_in,
                                           const std::string& dtype_in, int64_t vocab_size) {
  std::string format = format_in;
  if (format == "auto") format = ends_with(path, ".npy") ? "npy" : (ends_with(path, ".bin") || ends_with(path, ".idx")) ? "megatron" : "raw";
  if (format == "megatron") {
    std::string stem = ends_with(path, ".bin") || ends_with(path, ".idx") ? path.substr(0, path.size() - 4) : path;
    if (!fs::exists(stem + ".bin")) throw Error(stem + ".bin: missing (Megatron data needs .bin and .idx)");
    if (!fs::exists(stem + ".idx")) throw Error(stem + ".idx: missing (Megatron data needs .bin and .idx)");
    return std::make_unique<MegatronTokenFile>(stem + ".bin", stem + ".idx", vocab_size);
  }
  if (!fs::exists(path)) throw Error(path + ": no such file");
  if (format == "npy") {
    io::MappedFile file(path);
    io::NpyHeader h = io::parse_npy_header(file.data(), file.size(), path);
    if (h.shape.size() != 1) throw Error(path + ": token .npy files must be 1-D, shape has " + std::to_string(h.shape.size()) + " dimensions");
    const std::string dtype = h.descr == "<u2" ? "uint16" : h.descr == "<u4" ? "uint32" : h.descr == "<i4" ? "int32"
                            : h.descr == "<i8" ? "int64" : "";
    if (dtype.empty()) throw Error(path + ": .npy dtype '" + h.descr + "' is not an integer token type");
    if (dtype_in != "auto" && dtype_in != dtype)
      throw Error(path + ": holds " + dtype + " tokens but the config says dtype " + dtype_in);
    if (h.data_offset + h.numel * size_of(dtype) != file.size())
      throw Error(path + ": " + std::to_string(file.size() - h.data_offset - h.numel * size_of(dtype)) +
                  " bytes beyond the array its header describes");
    return std::make_unique<ArrayTokenFile>(path, vocab_size, dtype, h.data_offset);
  }
  std::string dtype = dtype_in;
  const auto meta = read_metadata_beside(path);
  const std::string meta_dtype = meta ? meta->dtype : "";
  if (dtype == "auto") dtype = !meta_dtype.empty() ? meta_dtype : vocab_size <= 65536 ? "uint16" : "uint32";
  else if (!meta_dtype.empty() && meta_dtype != dtype)
    throw Error(path + ": config says dtype " + dtype + " but metadata.json beside it says " + meta_dtype);
  return std::make_unique<ArrayTokenFile>(path, vocab_size, dtype, 0);
}

std::optional<DataMetadata> read_metadata_beside(const std::string& data_file) {
  const fs::path path = fs::path(data_file).parent_path() / "metadata.json";
  if (!fs::exists(path)) return std::nullopt;
  try {
    auto j = nlohmann::json::parse(util::read_text_file(path));
    return DataMetadata{j.value("dtype", std::string()), j.value("vocab_size", int64_t{0}), j.value("eos_id", int64_t{-1})};
  } catch (const nlohmann::json::exception& e) {
    throw Error(path.string() + ": not valid metadata JSON: " + e.what());
  }
}

MegatronIndex parse_megatron_index(const uint8_t* bytes, uint64_t size, uint64_t bin_size, const std::string& path) {
  auto bad = [&](const std::string& what) { return Error(path + ": not a valid Megatron .idx: " + what); };
  constexpr uint64_t kHeader = 9 + 8 + 1 + 8 + 8;
  if (size < kHeader) throw bad("shorter than its " + std::to_string(kHeader) + "-byte header");
  if (std::memcmp(bytes, "MMIDIDX\x00\x00", 9) != 0) throw bad("wrong magic at offset 0");
  uint64_t version = 0;
  std::memcpy(&version, bytes + 9, 8);
  if (version != 1) throw bad("version " + std::to_string(version) + " at offset 9, expected 1");
  MegatronIndex idx;
  idx.dtype_code = bytes[17];
  const uint64_t sizes[] = {0, 1, 1, 2, 4, 8, 8, 4, 2};
  if (idx.dtype_code < 1 || idx.dtype_code > 8) throw bad("dtype code " + std::to_string(idx.dtype_code) + " at offset 17");
  idx.element_size = sizes[idx.dtype_code];
  std::memcpy(&idx.num_sequences, bytes + 18, 8);
  std::memcpy(&idx.num_documents, bytes + 26, 8);
  // Exact size: the arrays must fill the rest of the file (checked without overflow).
  const uint64_t rest = size - kHeader;
  if (idx.num_sequences > rest / 12 || idx.num_documents > (rest - idx.num_sequences * 12) / 8 ||
      idx.num_sequences * 12 + idx.num_documents * 8 != rest)
    throw bad(std::to_string(idx.num_sequences) + " sequences and " + std::to_string(idx.num_documents) +
              " documents do not match the file size " + std::to_string(size));
  idx.lengths = bytes + kHeader;
  idx.pointers = bytes + kHeader + idx.num_sequences * 4;
  for (uint64_t i = 0; i < idx.num_sequences; ++i) {
    const int32_t len = idx.length(i);
    const int64_t ptr = idx.pointer(i);
    if (len < 0 || ptr < 0 || static_cast<uint64_t>(ptr) > bin_size ||
        static_cast<uint64_t>(len) * idx.element_size > bin_size - static_cast<uint64_t>(ptr))
      throw Error(path + ": sequence " + std::to_string(i) + " (byte offset " + std::to_string(ptr) + ", " +
                  std::to_string(len) + " tokens) points past the end of its .bin (" + std::to_string(bin_size) + " bytes)");
  }
  return idx;
}

}  // namespace hybrid::data
