// Token files in three formats, the instance order (world-size independent, exact on
// resume), mixtures, EOS document boundaries, and every kind of bad data file.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "hybrid/data/instance_filter.h"
#include "hybrid/data/loader.h"
#include "hybrid/error.h"
#include "hybrid/io/npy.h"
#include "temp_dir.h"

namespace fs = std::filesystem;
using namespace hybrid::data;
using hybrid::InstanceFilterConfig;

namespace {

class DataTest : public TempDirTest {
 protected:
  template <class T> void write_raw(const std::string& name, const std::vector<int64_t>& tokens) {
    std::ofstream out(path(name), std::ios::binary);
    for (int64_t t : tokens) {
      T v = static_cast<T>(t);
      out.write(reinterpret_cast<const char*>(&v), sizeof v);
    }
  }
  // Megatron .bin/.idx with the tokens split into sequences of the given lengths (uint16).
  void write_megatron(const std::string& stem, const std::vector<int64_t>& tokens, const std::vector<int32_t>& lengths,
                      int64_t pointer_shift = 0) {
    write_raw<uint16_t>(stem + ".bin", tokens);
    std::ofstream idx(path(stem + ".idx"), std::ios::binary);
    auto put = [&](auto v) { idx.write(reinterpret_cast<const char*>(&v), sizeof v); };
    idx.write("MMIDIDX\x00\x00", 9);
    put(uint64_t{1});
    put(uint8_t{8});
    put(uint64_t(lengths.size()));
    put(uint64_t(lengths.size() + 1));
    for (int32_t l : lengths) put(l);
    int64_t ptr = 0;
    for (int32_t l : lengths) put(ptr + pointer_shift), ptr += 2 * l;
    for (size_t i = 0; i <= lengths.size(); ++i) put(int64_t(i));
  }
  static hybrid::DataSourceConfig source(const std::string& p, double weight = 1.0) {
    hybrid::DataSourceConfig s;
    s.paths = {p};
    s.weight = weight;
    return s;
  }
  static std::vector<int64_t> tokens(int64_t n, int64_t vocab, uint64_t seed = 0) {
    std::mt19937_64 rng(seed);
    std::vector<int64_t> t(n);
    for (auto& x : t) x = rng() % vocab;
    return t;
  }
};

std::vector<int64_t> all_instances(const TokenDataset& d) {
  std::vector<int64_t> out;
  const auto& s = d.sources()[0];
  std::vector<int64_t> buf(d.seq_len());
  for (uint64_t i = 0; i < s.num_instances(); ++i) {
    s.read_instance(i, buf.data());
    out.insert(out.end(), buf.begin(), buf.end());
  }
  return out;
}

TEST_F(DataTest, ThreeFormatsGiveIdenticalInstances) {
  auto t = tokens(1000, 500);
  write_raw<uint32_t>("a.u32", t);
  hybrid::io::write_npy(path("a.npy"), at::tensor(t, at::kLong).to(at::kUInt16));
  write_megatron("a", t, {100, 1, 399, 500});
  auto raw = source(path("a.u32"));
  raw.dtype = "uint32";
  TokenDataset d_raw({raw}, 64, 500), d_npy({source(path("a.npy"))}, 64, 500), d_meg({source(path("a.bin"))}, 64, 500);
  auto a = all_instances(d_raw);
  EXPECT_EQ(a.size(), 15u * 64);  // 1000 / 64 = 15 instances, remainder dropped
  EXPECT_EQ(std::vector<int64_t>(t.begin(), t.begin() + a.size()), a);
  EXPECT_EQ(all_instances(d_npy), a);
  EXPECT_EQ(all_instances(d_meg), a);
  // A glob matching both halves of the Megatron pair reads it once.
  EXPECT_EQ(TokenDataset({source(path("a.[bi][id]*"))}, 64, 500).sources()[0].num_instances(), 15u);
}

TEST_F(DataTest, PermutationIsABijectionThatDependsOnTheKey) {
  for (uint64_t n : {1, 2, 7, 64, 1000, 4097}) {
    Permutation p(n, 42), q(n, 43);
    std::set<uint64_t> seen;
    int same = 0;
    for (uint64_t i = 0; i < n; ++i) seen.insert(p(i)), same += p(i) == q(i);
    EXPECT_EQ(seen.size(), n);
    EXPECT_EQ(*seen.rbegin(), n - 1);
    if (n >= 64) EXPECT_LT(same, static_cast<int>(n / 8));
  }
}

TEST_F(DataTest, ResumeReproducesBatchesAtAnyWorldSize) {
  write_raw<uint16_t>("t.bin16", tokens(40 * 16 + 5, 300, 1));
  auto src = source(path("t.bin16"));
  TokenDataset dataset({src}, 16, 300);
  InstanceSampler sampler(dataset, 7);
  ASSERT_EQ(sampler.epoch_size(), 40u);
  const int64_t G = 12, steps = 9, resume_at = 4;  // 9 steps of 12 cross an epoch boundary at 40
  // The uninterrupted run, one rank: global batches as concatenated micro batches.
  std::vector<at::Tensor> reference;
  {
    Loader loader(dataset, sampler, {G, 2, 1, 0}, 0, -1, 3, false);
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<at::Tensor> parts;
      for (int m = 0; m < 6; ++m) parts.push_back(loader.next().tokens);
      reference.push_back(at::cat(parts));
    }
  }
  EXPECT_FALSE(at::equal(reference[0], reference[1]));
  for (int64_t world : {1, 2, 3}) {
    for (int64_t micro : {1, 2}) {
      std::vector<std::vector<at::Tensor>> per_step(steps);
      for (int64_t rank = 0; rank < world; ++rank) {
        Loader loader(dataset, sampler, {G, micro, world, rank}, resume_at * G, -1, 2, false);
        for (int64_t s = resume_at; s < steps; ++s)
          for (int64_t m = 0; m < G / world / micro; ++m) per_step[s].push_back(loader.next().tokens);
      }
      for (int64_t s = resume_at; s < steps; ++s)
        EXPECT_TRUE(at::equal(at::cat(per_step[s]), reference[s])) << "world " << world << " micro " << micro << " step " << s;
    }
  }
}

// A run resumed with another global batch size (a batch-size ramp, more nodes) goes on from the
// instance after the checkpoint's last, where that is no whole number of the new batches.
TEST_F(DataTest, ResumeWithAnotherGlobalBatchGoesOnAtTheNextInstance) {
  write_raw<uint16_t>("t.bin16", tokens(40 * 16 + 5, 300, 1));
  TokenDataset dataset({source(path("t.bin16"))}, 16, 300);
  InstanceSampler sampler(dataset, 7);
  const int64_t before = 6, steps_before = 5, after = 8, steps_after = 4;  // 30 instances, then batches of 8
  at::Tensor whole;
  {
    Loader loader(dataset, sampler, {1, 1, 1, 0}, 0, -1, 2, false);
    std::vector<at::Tensor> rows;
    for (int64_t i = 0; i < before * steps_before + after * steps_after; ++i) rows.push_back(loader.next().tokens);
    whole = at::cat(rows);
  }
  const int64_t world = 2, micro = 2;
  std::vector<std::vector<at::Tensor>> per_step(steps_after);
  for (int64_t rank = 0; rank < world; ++rank) {
    Loader loader(dataset, sampler, {after, micro, world, rank}, before * steps_before, -1, 2, false);
    for (int64_t s = 0; s < steps_after; ++s)
      for (int64_t m = 0; m < after / world / micro; ++m) per_step[s].push_back(loader.next().tokens);
  }
  for (int64_t s = 0; s < steps_after; ++s)
    EXPECT_TRUE(at::equal(at::cat(per_step[s]), whole.narrow(0, before * steps_before + s * after, after))) << "step " << s;
}

TEST_F(DataTest, EpochsVisitEveryInstanceOnceInANewOrder) {
  write_raw<uint16_t>("t.bin16", tokens(50 * 8, 100, 2));
  TokenDataset dataset({source(path("t.bin16"))}, 8, 100);
  InstanceSampler sampler(dataset, 3);
  std::set<uint64_t> first, second;
  bool differs = false;
  for (uint64_t p = 0; p < 50; ++p) {
    first.insert(sampler.at(p).second);
    second.insert(sampler.at(50 + p).second);
    differs |= sampler.at(p).second != sampler.at(50 + p).second;
  }
  EXPECT_EQ(first.size(), 50u);
  EXPECT_EQ(second.size(), 50u);
  EXPECT_TRUE(differs);
}

TEST_F(DataTest, MixtureFollowsTheWeights) {
  write_raw<uint16_t>("big.bin16", tokens(300 * 4, 50, 3));
  write_raw<uint16_t>("small.bin16", tokens(20 * 4, 50, 4));
  TokenDataset dataset({source(path("big.bin16"), 1.0), source(path("small.bin16"), 3.0)}, 4, 50);
  InstanceSampler sampler(dataset, 1);
  EXPECT_EQ(sampler.epoch_size(), 320u);
  std::vector<int> counts(2);
  std::set<uint64_t> small_seen;
  for (uint64_t p = 0; p < 320; ++p) {
    auto [s, i] = sampler.at(p);
    ++counts[s];
    if (s == 1) small_seen.insert(i);
  }
  EXPECT_EQ(counts[0], 80);   // 1/4 of 320: downsampled
  EXPECT_EQ(counts[1], 240);  // 3/4: the 20 small instances upsampled 12 times
  EXPECT_EQ(small_seen.size(), 20u);
}

TEST_F(DataTest, EosGivesDocumentBoundaries) {
  write_raw<uint16_t>("d.bin16", {5, 6, 0, 7, 8, 9, 0, 1, 2, 0, 3, 4});
  TokenDataset dataset({source(path("d.bin16"))}, 6, 10);
  auto mb = read_micro_batch(dataset, InstanceSampler(dataset, 0), 0, 2, 0, false);
  auto cu = mb.cu_seqlens.value();
  auto s1 = mb.tokens.flatten();
  std::vector<int64_t> got(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
  std::vector<int64_t> want = {0};
  for (int64_t i = 0; i < 12; ++i)
    if (s1[i].item<int64_t>() == 0 && (i + 1) % 6 != 0) want.push_back(i + 1);
  want.push_back(12);
  EXPECT_EQ(got, want);
}

// OLMo's instance filter: the most repeats of a period in range, counted in whole periods.
TEST(InstanceFilter, CountsRepeatsOfPeriodsInRange) {
  auto repeats = [](const std::vector<int64_t>& t, int64_t lo = 1, int64_t hi = 13) {
    return most_repeats(t.data(), static_cast<int64_t>(t.size()), lo, hi);
  };
  EXPECT_EQ(repeats({1, 2, 3, 1, 2, 3, 1, 2}, 3, 3), 2);  // "abcabcab": two whole "abc"
  EXPECT_EQ(repeats({1, 2, 3, 4, 5, 6}), 1);
  std::vector<int64_t> t = {9, 8};
  for (int i = 0; i < 40; ++i) t.insert(t.end(), {1, 2, 3, 4, 5});
  t.push_back(7);
  EXPECT_EQ(repeats(t), 40);
  EXPECT_EQ(repeats(t, 1, 4), 1);       // period 5 outside the range
  EXPECT_EQ(repeats(t, 10, 10), 20);    // "12345" twice is a period of 10 too
  std::vector<int64_t> run(31, 4);      // a run at the very start and end, period 1
  EXPECT_EQ(repeats(run), 31);
  InstanceFilterConfig filter;
  filter.enabled = true;
  EXPECT_TRUE(keeps_instance(filter, run.data(), 31));
  run.push_back(4);  // 32 repeats: OLMo's repetition_max_count
  EXPECT_FALSE(keeps_instance(filter, run.data(), 32));
  filter.enabled = false;
  EXPECT_TRUE(keeps_instance(filter, run.data(), 32));
}

TEST_F(DataTest, TheInstanceFilterLeavesOutRowsAndTheirDocuments) {
  // Instances of 8: a run of eight 5s (left out at max_count 8), then plain ones with EOS (0).
  write_raw<uint16_t>("d.bin16", {5, 5, 5, 5, 5, 5, 5, 5, 1, 2, 0, 3, 4, 5, 6, 7, 5, 5, 5, 5, 5, 5, 5, 5, 8, 0, 9, 1, 2, 3, 0, 4});
  TokenDataset dataset({source(path("d.bin16"))}, 8, 10);
  InstanceFilterConfig filter;
  filter.enabled = true, filter.max_count = 8;
  auto mb = read_micro_batch(dataset, InstanceSampler(dataset, 0), 0, 4, 0, false, filter);
  // The sampler's order is a permutation: compare with the instances it names.
  std::vector<int64_t> kept;
  for (int64_t r = 0; r < 4; ++r) {
    std::vector<int64_t> row(8);
    auto [src, index] = InstanceSampler(dataset, 0).at(r);
    dataset.sources()[src].read_instance(index, row.data());
    if (row[0] != 5 || row[1] != 5) kept.insert(kept.end(), row.begin(), row.end());
  }
  EXPECT_EQ(mb.filtered, 2);
  EXPECT_EQ(mb.counted, 2);
  ASSERT_EQ(mb.tokens.size(0), 2);
  EXPECT_EQ(std::vector<int64_t>(mb.tokens.data_ptr<int64_t>(), mb.tokens.data_ptr<int64_t>() + 16), kept);
  EXPECT_EQ(mb.cu_seqlens->size(0), 5);  // the two kept rows' three EOS inside them, and the ends
  EXPECT_EQ(mb.cu_seqlens->data_ptr<int64_t>()[4], 16);
  // Every instance left out: one row stays (its backward reduces the gradients), counted as none.
  filter.max_count = 1;
  auto none = read_micro_batch(dataset, InstanceSampler(dataset, 0), 0, 4, -1, false, filter);
  EXPECT_EQ(none.filtered, 4);
  EXPECT_EQ(none.counted, 0);
  EXPECT_EQ(none.tokens.size(0), 1);
}

TEST_F(DataTest, BadFilesGiveOneClearError) {
  write_raw<uint16_t>("ok.bin16", tokens(100, 50));
  std::ofstream(path("odd.bin16"), std::ios::binary) << std::string(101, '\0');
  std::ofstream(path("empty.bin16"), std::ios::binary);
  write_raw<uint16_t>("big_id.bin16", {1, 2, 3, 60, 4});
  hybrid::io::write_npy(path("f.npy"), at::zeros({10}, at::kFloat));
  hybrid::io::write_npy(path("two_d.npy"), at::zeros({2, 5}, at::kInt));
  fs::create_directories(dir_ / "meta");
  write_raw<uint16_t>("meta/x.bin16", tokens(100, 50));
  std::ofstream(dir_ / "meta" / "metadata.json") << R"({"dtype": "uint32"})";
  write_megatron("past", tokens(100, 50), {50, 50}, 100);
  std::ofstream(path("corrupt.idx"), std::ios::binary) << "MMIDIDX";
  std::ofstream(path("corrupt.bin"), std::ios::binary) << "xx";

  struct Case { std::string file, dtype, expected; int64_t seq_len = 4; };
  const std::vector<Case> cases = {
      {"missing.bin16", "uint16", "missing.bin16: no files match"},
      {"empty.bin16", "uint16", "hold no complete instance of 4 tokens (empty source)"},
      {"odd.bin16", "uint16", "odd.bin16: size 101 bytes is not a whole number of uint16 tokens"},
      {"ok.bin16", "uint16", "hold no complete instance of 128 tokens", 128},
      {"meta/x.bin16", "uint16", "config says dtype uint16 but metadata.json beside it says uint32"},
      {"f.npy", "auto", "f.npy: .npy dtype '<f4' is not an integer token type"},
      {"two_d.npy", "auto", "two_d.npy: token .npy files must be 1-D"},
      {"past.bin", "auto", "past.idx: sequence 1 (byte offset 200, 50 tokens) points past the end of its .bin (200 bytes)"},
      {"corrupt.bin", "auto", "corrupt.idx: not a valid Megatron .idx: shorter than its 34-byte header"},
  };
  for (const auto& c : cases) {
    auto src = source(path(c.file));
    src.dtype = c.dtype;
    auto e = error_from([&] { TokenDataset({src}, c.seq_len, 50); });
    EXPECT_NE(e.find(c.expected), std::string::npos) << c.file << ": " << e;
  }
  // An out-of-vocabulary id is reported with file and token offset when read.
  auto src = source(path("big_id.bin16"));
  TokenDataset d({src}, 5, 50);
  std::vector<int64_t> buf(5);
  auto e = error_from([&] { d.sources()[0].read_instance(0, buf.data()); });
  EXPECT_NE(e.find("big_id.bin16: token id 60 at token offset 3 is outside the vocabulary [0, 50)"), std::string::npos) << e;
  // ... and reaches the trainer through the loader thread.
  InstanceSampler sampler(d, 0);
  Loader loader(d, sampler, {1, 1, 1, 0}, 0, -1, 2, false);
  e = error_from([&] { loader.next(); });
  EXPECT_NE(e.find("token id 60"), std::string::npos) << e;
}

TEST_F(DataTest, FuzzedIdxHeadersNeverCrash) {
  write_megatron("f", tokens(64, 50), {10, 20, 34});
  std::ifstream in(path("f.idx"), std::ios::binary);
  const std::string seed((std::istreambuf_iterator<char>(in)), {});
  std::mt19937_64 rng(99);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  int runs = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    std::string bytes = seed;
    if (rng() % 4 == 0) bytes.resize(rng() % bytes.size());
    for (int k = 0; k < 1 + static_cast<int>(rng() % 3) && !bytes.empty(); ++k) bytes[rng() % bytes.size()] = static_cast<char>(rng());
    try {
      parse_megatron_index(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), 128, "f.idx");
    } catch (const hybrid::Error&) {
    }
    ++runs;
  }
  EXPECT_GT(runs, 1000);
}

}  // namespace
