#include "hybrid/io/npy.h"

#include <ATen/ATen.h>

#include <cstring>

#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"

namespace hybrid::io {
namespace {

struct Descr { const char* descr; at::ScalarType type; };
constexpr Descr kDescrs[] = {{"<u2", at::kUInt16}, {"<u4", at::kUInt32}, {"<i4", at::kInt}, {"<i8", at::kLong},
                             {"<f4", at::kFloat},  {"<f8", at::kDouble}, {"|u1", at::kByte}, {"<i2", at::kShort}};

// The value after 'key': in the header dict, up to the next top-level comma or brace.
std::string dict_value(const std::string& header, const std::string& key, const std::string& path) {
  auto k = header.find("'" + key + "'");
  if (k == std::string::npos) throw Error(path + ": .npy header has no '" + key + "'");
  auto colon = header.find(':', k);
  if (colon == std::string::npos) throw Error(path + ": .npy header is malformed near '" + key + "'");
  size_t i = colon + 1, depth = 0, start = i;
  for (; i < header.size(); ++i) {
    char c = header[i];
    if (c == '(') ++depth;
    else if (c == ')') { if (depth == 0) break; --depth; }
    else if ((c == ',' || c == '}') && depth == 0) break;
  }
  std::string v = header.substr(start, i - start);
  v.erase(0, v.find_first_not_of(" "));
  v.erase(v.find_last_not_of(" ") + 1);
  return v;
}

}  // namespace

NpyHeader parse_npy_header(const uint8_t* bytes, uint64_t size, const std::string& path) {
  auto bad = [&](const std::string& what) { return Error(path + ": not a valid .npy file: " + what); };
  if (size < 10 || std::memcmp(bytes, "\x93NUMPY", 6) != 0) throw bad("missing the \\x93NUMPY magic");
  const uint8_t major = bytes[6];
  uint64_t header_len = 0, prefix = 0;
  if (major == 1) {
    header_len = bytes[8] | (uint64_t{bytes[9]} << 8);
    prefix = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw bad("truncated header");
    header_len = bytes[8] | (uint64_t{bytes[9]} << 8) | (uint64_t{bytes[10]} << 16) | (uint64_t{bytes[11]} << 24);
    prefix = 12;
  } else {
    throw bad("unknown format version " + std::to_string(major));
  }
  if (header_len > size - prefix) throw bad("header length " + std::to_string(header_len) + " runs past the end of the file");
  const std::string header(reinterpret_cast<const char*>(bytes + prefix), header_len);

  NpyHeader h;
  h.data_offset = prefix + header_len;
  std::string descr = dict_value(header, "descr", path);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"')) throw bad("descr is not a string");
  h.descr = descr.substr(1, descr.size() - 2);
  bool found = false;
  for (const auto& d : kDescrs)
    if (h.descr == d.descr) h.dtype = d.type, found = true;
  if (!found) throw Error(path + ": unsupported .npy dtype '" + h.descr + "' (little-endian u2, u4, i2, i4, i8, f4, f8, u1)");
  if (dict_value(header, "fortran_order", path) != "False") throw Error(path + ": Fortran-ordered .npy arrays are not supported");

  std::string shape = dict_value(header, "shape", path);
  if (shape.size() < 2 || shape.front() != '(' || shape.back() != ')') throw bad("shape is not a tuple");
  h.numel = 1;
  const uint64_t elem = c10::elementSize(h.dtype), data_bytes = size - h.data_offset;
  size_t i = 1;
  while (i < shape.size() - 1) {
    while (i < shape.size() - 1 && (shape[i] == ' ' || shape[i] == ',')) ++i;
    if (i >= shape.size() - 1) break;
    uint64_t dim = 0;
    size_t digits = 0;
    for (; i < shape.size() - 1 && std::isdigit(static_cast<unsigned char>(shape[i])); ++i, ++digits) {
      if (dim > (uint64_t{1} << 62) / 10) throw bad("shape dimension too large");
      dim = dim * 10 + (shape[i] - '0');
    }
    if (digits == 0) throw bad("shape holds something other than integers: " + shape);
    if (dim != 0 && h.numel > data_bytes / dim) throw bad("shape " + shape + " needs more data than the file holds");
    h.numel *= dim;
    h.shape.push_back(static_cast<int64_t>(dim));
  }
  if (h.numel * elem > data_bytes)
    throw bad("shape " + shape + " needs " + std::to_string(h.numel * elem) + " data bytes, the file has " +
              std::to_string(data_bytes) + " (truncated?)");
  return h;
}

at::Tensor read_npy(const std::string& path) {
  MappedFile file(path);
  NpyHeader h = parse_npy_header(file.data(), file.size(), path);
  at::Tensor t = at::empty(h.shape, at::TensorOptions().dtype(h.dtype));
  if (h.numel) std::memcpy(t.data_ptr(), file.data() + h.data_offset, h.numel * t.element_size());
  return t;
}

void write_npy(const std::string& path, const at::Tensor& tensor) {
  at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  const char* descr = nullptr;
  for (const auto& d : kDescrs)
    if (t.scalar_type() == d.type) descr = d.descr;
  if (!descr) throw Error(path + ": cannot write dtype " + std::string(c10::toString(t.scalar_type())) + " to .npy");
  std::string shape = "(";
  for (int64_t d : t.sizes()) shape += std::to_string(d) + ",";
  if (t.dim() > 1) shape.pop_back();
  shape += ")";
  std::string header = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Pad so that magic + version + length + header is a multiple of 64, ending in a newline.
  header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::string prefix = "\x93NUMPY\x01";
  prefix += '\0';
  prefix += static_cast<char>(header.size() & 0xff);
  prefix += static_cast<char>(header.size() >> 8);
  AtomicFile f(path);
  f.write(prefix.data(), prefix.size());
  f.write(header.data(), header.size());
  f.write(t.data_ptr(), t.numel() * t.element_size());
  f.commit();
}

}  // namespace hybrid::io
