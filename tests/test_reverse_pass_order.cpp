// The order in which a reader beside the reverse state pass takes its chunks
// (src/ops/reverse_pass_order.h): every chunk once, the pairs done before the pass's last wave
// first, and within each group the pass's own order (a step of every pair, last chunk first).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "../src/ops/reverse_pass_order.h"

namespace {
namespace d = hybrid::ops::detail;

TEST(ReversePassOrder, WavesOfTheTrainingAndBenchmarkShapes) {
  // 7b.yaml's micro batch (2 rows, 30 heads, V = 192: 3 chains) and 1b.yaml's (4 rows, 16 heads,
  // 3 chains) on 132 SMs: two waves; the OLMo benchmark shape and B2 T16384 H16 V128: one.
  EXPECT_EQ(d::early_pairs(60, 3, 132), 44);
  EXPECT_EQ(d::last_wave_blocks(60, 3, 132), 48);
  EXPECT_EQ(d::early_pairs(64, 3, 132), 44);
  EXPECT_EQ(d::last_wave_blocks(64, 3, 132), 60);
  EXPECT_EQ(d::early_pairs(30, 3, 132), 0);
  EXPECT_EQ(d::last_wave_blocks(30, 3, 132), 90);
  EXPECT_EQ(d::early_pairs(32, 2, 132), 0);
  EXPECT_EQ(d::last_wave_blocks(32, 2, 132), 64);
  // Whole waves: the last is full. A pair straddling two waves belongs to the later one.
  EXPECT_EQ(d::last_wave_blocks(88, 3, 132), 132);
  EXPECT_EQ(d::early_pairs(88, 3, 132), 44);
  EXPECT_EQ(d::early_pairs(60, 5, 132), 52);  // pair 52's blocks 260-264: the last wave starts at 264
  EXPECT_EQ(d::last_wave_blocks(60, 5, 132), 36);
}

TEST(ReversePassOrder, EveryChunkOnceEarlyPairsFirstInThePassesOrder) {
  struct Shape {
    int H, sequences, chunks, chains, sms;
  };
  for (const Shape& s : {Shape{30, 2, 5, 3, 132}, Shape{16, 4, 3, 3, 132}, Shape{30, 1, 4, 3, 132},
                         Shape{3, 2, 6, 2, 5}, Shape{1, 1, 1, 1, 1}}) {
    const int NC = s.sequences * s.chunks;
    const d::ReversePassOrder order{s.H, NC, s.sequences, d::early_pairs(s.H * s.sequences, s.chains, s.sms)};
    std::vector<int> seen(static_cast<size_t>(s.H) * NC, 0);
    int64_t last_step = -1;
    bool in_late = false;
    for (int64_t i = 0; i < static_cast<int64_t>(seen.size()); ++i) {
      const int64_t hc = d::reverse_pass_chunk(order, i);
      ASSERT_GE(hc, 0);
      ASSERT_LT(hc, static_cast<int64_t>(seen.size()));
      ++seen[hc];
      const int64_t h = hc / NC, n = hc % NC / s.chunks, step = s.chunks - 1 - hc % NC % s.chunks;
      const bool late = h + s.H * n >= order.early_pairs;
      EXPECT_TRUE(late || !in_late) << "an early pair's chunk after a late one's, i " << i;
      if (late && !in_late) in_late = true, last_step = -1;
      EXPECT_GE(step, last_step) << "a step taken before an earlier one of its group, i " << i;
      last_step = step;
    }
    for (size_t hc = 0; hc < seen.size(); ++hc) EXPECT_EQ(seen[hc], 1) << "chunk " << hc << " of H" << s.H;
  }
}

}  // namespace
