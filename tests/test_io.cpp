// safetensors and .npy: round trips, and hostile or truncated files that must give one
// clear error (never a crash, a hang or a huge allocation), checked also by a bounded fuzz.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "hybrid/error.h"
#include "hybrid/io/npy.h"
#include "hybrid/io/safetensors.h"
#include "hybrid/util/fs.h"
#include "temp_dir.h"

namespace fs = std::filesystem;

namespace {

using IoTest = TempDirTest;

void spit(const std::string& p, const std::string& bytes) { std::ofstream(p, std::ios::binary) << bytes; }

std::string header_file(const std::string& json, const std::string& data) {
  uint64_t n = json.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + json + data;
}

TEST_F(IoTest, SafetensorsRoundTripKeepsDtypesShapesAndMetadata) {
  std::vector<std::pair<std::string, at::Tensor>> ts = {
      {"a", at::randn({3, 4})}, {"b", at::randn({5}).to(at::kBFloat16)}, {"c", at::arange(7, at::kLong)},
      {"empty", at::zeros({0, 3})}};
  hybrid::io::write_safetensors(path("x.safetensors"), ts, {{"step", "12"}});
  auto f = hybrid::io::read_safetensors(path("x.safetensors"));
  ASSERT_EQ(f.tensors.size(), ts.size());
  for (const auto& [name, t] : ts) {
    const at::Tensor* got = f.find(name);
    ASSERT_TRUE(got) << name;
    EXPECT_EQ(got->scalar_type(), t.scalar_type());
    EXPECT_TRUE(at::equal(*got, t)) << name;
  }
  EXPECT_EQ(f.metadata.at("step"), "12");
}

// Read tensors are views of the file's copy-on-write map: they outlive the TensorFile, writes to
// them stay in the process, and a file whose data is not aligned to its dtype is read by copy.
TEST_F(IoTest, SafetensorsReadsAreViewsOfAPrivateMap) {
  const at::Tensor w = at::arange(12, at::kFloat).view({3, 4});
  hybrid::io::write_safetensors(path("w.safetensors"), {{"w", w}});
  at::Tensor kept;
  {
    auto f = hybrid::io::read_safetensors(path("w.safetensors"));
    kept = f.tensors[0].second;
    kept.add_(100);  // changes this process's pages only
  }
  EXPECT_TRUE(at::equal(kept, w + 100));
  EXPECT_TRUE(at::equal(hybrid::io::read_safetensors(path("w.safetensors")).tensors[0].second, w));
  // An unpadded 55-byte header: the float32 data starts at byte 63.
  std::string data(16, '\0');
  const float values[4] = {1.5f, -2.f, 3.25f, 7.f};
  std::memcpy(data.data(), values, 16);
  const std::string json = R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})";
  ASSERT_EQ((8 + json.size()) % 4, 3u);
  spit(path("odd.safetensors"), header_file(json, data));
  auto odd = hybrid::io::read_safetensors(path("odd.safetensors"));
  EXPECT_TRUE(at::equal(odd.tensors[0].second, at::tensor({1.5f, -2.f, 3.25f, 7.f})));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(odd.tensors[0].second.data_ptr()) % 4, 0u);
}

TEST_F(IoTest, SafetensorsRejectsBadFilesWithTheReason) {
  struct Case { std::string bytes, expected; };
  const std::string data(16, '\0');
  const std::vector<Case> cases = {
      {"abc", "shorter than its 8-byte header length"},
      {header_file("{", ""), "header is not JSON"},
      {std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}", "exceeds the file"},
      {header_file("[1,2]", ""), "header is not a JSON object"},
      {header_file(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data.substr(0, 8)), "truncated file"},
      {header_file(R"({"t":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}})", data), "bytes for a shape needing 20"},
      {header_file(R"({"t":{"dtype":"Q7","shape":[4],"data_offsets":[0,16]}})", data), "unsupported dtype 'Q7'"},
      {header_file(R"({"t":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", data), "non-negative integers"},
      {header_file(R"({"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}})", data), "larger than the file"},
      {header_file(R"({"t":{"dtype":"F32","shape":[4]}})", data), "needs dtype, shape and two data_offsets"},
      {header_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", data),
       "tensors overlap"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    spit(path("bad.safetensors"), cases[i].bytes);
    auto e = error_from([&] { hybrid::io::read_safetensors(path("bad.safetensors")); });
    EXPECT_NE(e.find(cases[i].expected), std::string::npos) << "case " << i << ": " << e;
    EXPECT_NE(e.find("bad.safetensors"), std::string::npos) << "case " << i << " does not name the file: " << e;
  }
}

TEST_F(IoTest, NpyRoundTripAndBadHeaders) {
  at::Tensor t = at::randint(0, 60000, {3, 5}, at::kLong).to(at::kUInt16);
  hybrid::io::write_npy(path("t.npy"), t);
  EXPECT_TRUE(at::equal(hybrid::io::read_npy(path("t.npy")), t));
  at::Tensor v = at::arange(10, at::kFloat);
  hybrid::io::write_npy(path("v.npy"), v);
  EXPECT_TRUE(at::equal(hybrid::io::read_npy(path("v.npy")), v));

  const std::string good = slurp(path("t.npy"));
  auto with_header = [&](const std::string& dict) {
    std::string h = dict + "\n";
    std::string out = "\x93NUMPY\x01";
    out += '\0';
    out += static_cast<char>(h.size() & 0xff);
    out += static_cast<char>(h.size() >> 8);
    return out + h + std::string(30, '\0');
  };
  struct Case { std::string bytes, expected; };
  const std::vector<Case> cases = {
      {"NUMPY", "missing the \\x93NUMPY magic"},
      {good.substr(0, good.size() - 3), "truncated?"},
      {with_header("{'descr': '>u4', 'fortran_order': False, 'shape': (3,), }"), "unsupported .npy dtype '>u4'"},
      {with_header("{'descr': '<u2', 'fortran_order': True, 'shape': (3,), }"), "Fortran-ordered"},
      {with_header("{'descr': '<u2', 'fortran_order': False, 'shape': (99999999999,), }"), "needs more data than the file holds"},
      {with_header("{'descr': '<u2', 'fortran_order': False, 'shape': (a,), }"), "other than integers"},
      {with_header("{'descr': '<u2', 'fortran_order': False}"), "has no 'shape'"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    spit(path("bad.npy"), cases[i].bytes);
    auto e = error_from([&] { hybrid::io::read_npy(path("bad.npy")); });
    EXPECT_NE(e.find(cases[i].expected), std::string::npos) << "case " << i << ": " << e;
  }
}

// Random byte flips, truncations and length edits of valid files, for a bounded time: the
// parsers must either accept the file or throw hybrid::Error, nothing else.
TEST_F(IoTest, FuzzedHeadersNeverCrash) {
  hybrid::io::write_safetensors(path("s.safetensors"), {{"w", at::randn({4, 4})}, {"b", at::randn({4})}});
  hybrid::io::write_npy(path("n.npy"), at::arange(12, at::kInt).view({3, 4}));
  const std::string seeds[] = {slurp(path("s.safetensors")), slurp(path("n.npy"))};
  std::mt19937_64 rng(1234);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  int runs = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    for (int which = 0; which < 2; ++which) {
      std::string bytes = seeds[which];
      const size_t header_end = std::min<size_t>(bytes.size(), 160);
      switch (rng() % 3) {
        case 0: for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k) bytes[rng() % header_end] = static_cast<char>(rng()); break;
        case 1: bytes.resize(rng() % bytes.size()); break;
        case 2: bytes[rng() % std::min<size_t>(bytes.size(), 12)] = static_cast<char>(rng()); break;
      }
      const std::string p = path(which ? "f.npy" : "f.safetensors");
      spit(p, bytes);
      try {
        if (which) hybrid::io::read_npy(p);
        else hybrid::io::read_safetensors(p);
      } catch (const hybrid::Error&) {
      }
      ++runs;
    }
  }
  EXPECT_GT(runs, 100);
}

}  // namespace
