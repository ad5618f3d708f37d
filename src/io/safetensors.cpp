#include "hybrid/io/safetensors.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <set>

#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"

namespace hybrid::io {
namespace {

constexpr uint64_t kMaxHeader = 100 << 20;  // the format's own limit on the JSON header

struct DtypeName { const char* name; at::ScalarType type; };
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool}, {"U16", at::kUInt16}, {"U32", at::kUInt32}};

at::ScalarType dtype_from(const std::string& name, const std::string& where) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  throw Error(where + ": unsupported dtype '" + name + "'");
}

const char* dtype_name(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.type) return d.name;
  throw Error(std::string("safetensors: cannot store dtype ") + c10::toString(t));
}

}  // namespace

const at::Tensor* TensorFile::find(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return &t;
  return nullptr;
}

TensorFile read_safetensors(const std::string& path) {
  // The tensors live in the map itself: a page is read when first touched, so a rank that loads
  // its share of an optimizer file reads that share, and ranks on one machine share the page
  // cache (eight ranks each holding a copy of 7b.yaml's 89 GB checkpoint was 713 GB of memory).
  auto mapped = std::make_shared<MappedFile>(path, /*copy_on_write=*/true);
  const MappedFile& file = *mapped;
  auto bad = [&](const std::string& what) { return Error(path + ": not a valid safetensors file: " + what); };
  if (file.size() < 8) throw bad("shorter than its 8-byte header length");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file.data(), 8);  // little-endian on every platform we build for
  if (header_len > kMaxHeader || header_len > file.size() - 8)
    throw bad("header length " + std::to_string(header_len) + " exceeds the file (" + std::to_string(file.size()) + " bytes)");
  nlohmann::ordered_json header;  // keeps the file's tensor order
  try {
    header = nlohmann::ordered_json::parse(file.data() + 8, file.data() + 8 + header_len);
  } catch (const nlohmann::json::exception& e) {
    throw bad(std::string("header is not JSON (") + e.what() + ")");
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  const uint64_t data_start = 8 + header_len, data_size = file.size() - data_start;

  TensorFile out;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (!it->is_object()) throw bad("__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) throw bad("__metadata__ value '" + m.key() + "' is not a string");
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const std::string where = path + ": tensor '" + name + "'";
    const auto& info = *it;
    if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") || !info.contains("data_offsets") ||
        !info["dtype"].is_string() || !info["shape"].is_array() || !info["data_offsets"].is_array() ||
        info["data_offsets"].size() != 2)
      throw Error(where + ": entry needs dtype, shape and two data_offsets");
    at::ScalarType dtype = dtype_from(info["dtype"].get<std::string>(), where);
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    for (const auto& dim : info["shape"]) {
      if (!dim.is_number_unsigned()) throw Error(where + ": shape entries must be non-negative integers");
      uint64_t d = dim.get<uint64_t>();
      if (d != 0 && numel > data_size / d) throw Error(where + ": shape is larger than the file");
      numel *= d;
      shape.push_back(static_cast<int64_t>(d));
    }
    const auto& off = info["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw Error(where + ": data_offsets must be non-negative integers");
    uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_size)
      throw Error(where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                  "] fall outside the " + std::to_string(data_size) + " data bytes (truncated file?)");
    const uint64_t nbytes = numel * c10::elementSize(dtype);
    if (end - begin != nbytes)
      throw Error(where + ": " + std::to_string(end - begin) + " bytes for a shape needing " + std::to_string(nbytes));
    ranges.emplace_back(begin, end);
    uint8_t* bytes = mapped->writable_data() + data_start + begin;
    at::Tensor t;
    if (nbytes > 0 && reinterpret_cast<uintptr_t>(bytes) % c10::elementSize(dtype) == 0) {
      t = at::from_blob(bytes, shape, [mapped](void*) {}, at::TensorOptions().dtype(dtype));
    } else {  // empty, or misaligned (a writer that does not pad its header): a copy of its own
      t = at::empty(shape, at::TensorOptions().dtype(dtype));
      if (nbytes) std::memcpy(t.data_ptr(), bytes, nbytes);
    }
    out.tensors.emplace_back(name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) throw bad("tensors overlap in the data section");
  return out;
}

namespace {

// Where everything goes: the header (its 8-byte length, the JSON, padding) and each tensor's
// first byte in the file.
struct Layout {
  std::string header;
  std::vector<uint64_t> begin;
  uint64_t size = 0;
};

Layout plan(const std::string& path, const NamedTensors& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  std::vector<uint64_t> offsets;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (!names.insert(name).second) throw Error(path + ": tensor name '" + name + "' given twice");
    const uint64_t nbytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offsets.push_back(offset);
    offset += nbytes;
  }
  Layout out;
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // keep the data 8-byte aligned, as the reference writer does
  const uint64_t len = json.size();
  out.header.assign(reinterpret_cast<const char*>(&len), 8);
  out.header += json;
  for (uint64_t o : offsets) out.begin.push_back(out.header.size() + o);
  out.size = out.header.size() + offset;
  return out;
}

at::Tensor on_host(const at::Tensor& t) { return t.detach().to(at::kCPU).contiguous(); }

}  // namespace

void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const Layout layout = plan(path, tensors, metadata);
  AtomicFile f(path);
  f.write(layout.header.data(), layout.header.size());
  // One tensor at a time in host memory (a GPU model's weights are not all copied at once).
  for (const auto& [name, t] : tensors) {
    const at::Tensor c = on_host(t);
    f.write(c.data_ptr(), c.numel() * c.element_size());
  }
  f.commit();
}

WrittenShare write_safetensors_share(const std::string& path, const ShardedTensors& file, int rank) {
  if (file.writer.size() != file.entries.size()) throw Error(path + ": every entry needs a writer");
  const Layout layout = plan(path, file.entries, file.metadata);
  WrittenShare out;
  out.file_size = layout.size;
  out.header_size = layout.header.size();
  const bool mine_any = rank == 0 || std::find(file.writer.begin(), file.writer.end(), rank) != file.writer.end();
  if (!mine_any) return out;
  PositionalFile f(path);
  auto write = [&](uint64_t at, const void* bytes, size_t n) {  // returns the bytes' CRC-32
    if (out.ranges.empty() || out.ranges.back().end != at) out.ranges.push_back({at, at, 0});
    f.write_at(at, bytes, n);
    const uint32_t crc = util::crc32_of(static_cast<const unsigned char*>(bytes), n);
    util::crc32_append(out.ranges.back(), crc, n);
    return crc;
  };
  if (rank == 0) {
    f.resize(layout.size);
    out.header_crc = write(0, layout.header.data(), layout.header.size());
  }
  for (size_t i = 0; i < file.entries.size(); ++i) {
    if (file.writer[i] != rank) continue;
    const auto& [name, t] = file.entries[i];
    if (t.is_meta()) throw Error(path + ": entry '" + name + "' is this process's to write, but it holds only its shape");
    const at::Tensor c = on_host(t);
    out.entry_crcs.emplace_back(i, write(layout.begin[i], c.data_ptr(), c.numel() * c.element_size()));
  }
  f.sync();
  return out;
}

}  // namespace hybrid::io
