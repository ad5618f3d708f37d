// Checkpointer's asynchronous saves: what a background save writes is the tensors as they were at
// the call, later saves wait for it, and its failure comes back as the save's error; two ranks
// writing one checkpoint, each its share of the tensor files, and a rank whose share fails or
// never comes; the files' CRC-32 in pieces on several threads. (Whole runs with them, kills and a
// full disk included: train_runs.sh, dist_runs.sh.)
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "hybrid/train/checkpoint.h"
#include "hybrid/util/crc32.h"
#include "temp_dir.h"

namespace {
using hybrid::io::ShardedTensors;
using hybrid::train::Checkpointer;
using hybrid::train::load_checkpoint;
using hybrid::train::TrainerState;

class CheckpointTest : public TempDirTest {
 protected:
  static TrainerState at_step(int64_t step) {
    TrainerState s;
    s.step = step;
    return s;
  }
};

// The ranks' notes in memory, as the rendezvous's key-value store keeps them in a run.
class MemoryNotes {
 public:
  hybrid::train::SaveGroup group(int rank, int world_size, std::chrono::seconds timeout = std::chrono::seconds(600)) {
    hybrid::train::SaveGroup g{rank, world_size};
    g.post = [this](const std::string& key, const std::string& value) {
      std::lock_guard<std::mutex> lock(mutex_);
      notes_[key] = value;
      posted_.notify_all();
    };
    g.take = [this](const std::string& key, std::chrono::milliseconds wait) -> std::optional<std::string> {
      std::unique_lock<std::mutex> lock(mutex_);
      if (!posted_.wait_for(lock, wait, [&] { return notes_.count(key) > 0; })) return std::nullopt;
      std::string value = notes_[key];
      notes_.erase(key);
      return value;
    };
    g.timeout = timeout;
    return g;
  }

 private:
  std::mutex mutex_;
  std::condition_variable posted_;
  std::map<std::string, std::string> notes_;
};

// CRC-32 bit by bit (the reflected polynomial 0xEDB88320, zlib's), for a reference that is not zlib.
uint32_t crc32_bitwise(const std::vector<unsigned char>& bytes, size_t size) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) {
    crc ^= bytes[i];
    for (int b = 0; b < 8; ++b) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

TEST(Crc32, PiecesOnThreadsGiveTheWholeBuffersValue) {
  std::vector<unsigned char> bytes(10000);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<unsigned char>((i * 2654435761u) >> 13);
  const std::vector<unsigned char> check = {'1', '2', '3', '4', '5', '6', '7', '8', '9'};  // CRC-32's check value
  ASSERT_EQ(crc32_bitwise(check, check.size()), 0xCBF43926u);
  EXPECT_EQ(hybrid::util::crc32_of(check.data(), check.size()), 0xCBF43926u);
  for (size_t size : {size_t{0}, size_t{1}, size_t{255}, size_t{256}, size_t{257}, size_t{10000}})
    for (size_t piece : {size_t{1}, size_t{7}, size_t{256}, size_t{1} << 20}) {
      SCOPED_TRACE("size " + std::to_string(size) + ", pieces of " + std::to_string(piece));
      EXPECT_EQ(hybrid::util::crc32_of(bytes.data(), size, piece), crc32_bitwise(bytes, size));
    }
  // Ranges of a file written by several processes, in any order, join into the whole's CRC; a gap
  // or an overlap is an error naming the byte.
  hybrid::util::CrcRange a{0, 0, 0}, b{100, 100, 0}, c{4000, 4000, 0};
  hybrid::util::crc32_append(a, hybrid::util::crc32_of(bytes.data(), 100), 100);
  hybrid::util::crc32_append(b, hybrid::util::crc32_of(bytes.data() + 100, 3900), 3900);
  hybrid::util::crc32_append(c, hybrid::util::crc32_of(bytes.data() + 4000, 6000), 6000);
  EXPECT_EQ(hybrid::util::crc32_join({c, a, b}, 10000), crc32_bitwise(bytes, 10000));
  auto join_error = [](std::vector<hybrid::util::CrcRange> ranges, uint64_t size) {
    try {
      hybrid::util::crc32_join(std::move(ranges), size);
    } catch (const hybrid::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(join_error({a, c}, 10000), "byte 100 was not written");
  EXPECT_EQ(join_error({a, b, {3000, 4000, 0}, c}, 10000), "byte 3000 was written twice");
  EXPECT_EQ(join_error({a, b}, 10000), "byte 4000 was not written");
}

TEST_F(CheckpointTest, AsyncSaveWritesTheTensorsAsTheyWereAtTheCall) {
  Checkpointer checkpoints(path("run"), hybrid::CheckpointConfig{});
  at::Tensor w = at::arange(1000, at::kFloat), m = at::zeros({10}, at::kFloat);
  const at::Tensor w0 = w.clone(), m0 = m.clone();
  // The run goes on updating both in place while the thread writes.
  checkpoints.save_async(at_step(7), {{"w", w}}, ShardedTensors{{{"m", m}}, {0}}, "name: x\n");
  w.add_(1), m.fill_(3);
  checkpoints.wait();
  const auto saved = load_checkpoint(path("run"), true);
  EXPECT_EQ(saved.state.step, 7);
  ASSERT_EQ(saved.model.tensors.size(), 1u);
  ASSERT_EQ(saved.optim.tensors.size(), 1u);
  EXPECT_TRUE(at::equal(saved.model.tensors[0].second, w0));
  EXPECT_TRUE(at::equal(saved.optim.tensors[0].second, m0));
  EXPECT_EQ(saved.config_yaml, "name: x\n");
}

// A save started while a background one is still writing waits for it: both land, in order, and
// LATEST names the second.
TEST_F(CheckpointTest, ASaveWaitsForTheBackgroundOneBeforeIt) {
  Checkpointer checkpoints(path("run"), hybrid::CheckpointConfig{});
  const at::Tensor big = at::randn({1 << 22});  // 16 MB: still being written when the next save comes
  checkpoints.save_async(at_step(1), {{"w", big}}, ShardedTensors{}, "");
  checkpoints.save(at_step(2), {{"w", big + 1}}, ShardedTensors{}, "");
  EXPECT_TRUE(std::filesystem::exists(path("run/checkpoints/step0000001/MANIFEST.json")));
  EXPECT_EQ(slurp(path("run/checkpoints/LATEST")), "step0000002\n");
  EXPECT_TRUE(at::equal(load_checkpoint(path("run/checkpoints/step0000001"), false).model.tensors[0].second, big));
}

// A background save that fails (here the checkpoints folder's name is taken by a file) throws its
// error from the next wait, named as a synchronous save names it; a Checkpointer destroyed with
// such a save pending logs it and does not throw.
TEST_F(CheckpointTest, AFailedBackgroundSaveComesBackAsItsError) {
  std::filesystem::create_directories(path("run"));
  write("run/checkpoints", "not a folder");
  const at::Tensor w = at::ones({4});
  {
    Checkpointer checkpoints(path("run"), hybrid::CheckpointConfig{});
    checkpoints.save_async(at_step(3), {{"w", w}}, ShardedTensors{}, "");
    const std::string error = error_from([&] { checkpoints.wait(); });
    EXPECT_NE(error.find("checkpoint at step 3 not saved"), std::string::npos) << error;
    EXPECT_EQ(error_from([&] { checkpoints.wait(); }), "");  // reported once
    EXPECT_NE(error_from([&] { checkpoints.save(at_step(4), {{"w", w}}, ShardedTensors{}, ""); }).find("checkpoint at step 4 not saved"),
              std::string::npos);
  }
  Checkpointer pending(path("run"), hybrid::CheckpointConfig{});
  pending.save_async(at_step(5), {{"w", w}}, ShardedTensors{}, "");
}  // pending's destructor: waits, logs, does not throw

// Two ranks (two Checkpointers, one thread each) write one checkpoint: each its share of the
// optimizer file and a run of the weights that evens out their bytes, rank 0 the rest. It loads and
// verifies, holds what one process would have written, and keeps none of the ranks' notes; also in
// the background. (Here rank 1's copy of the weights differs from rank 0's, to show who wrote which.)
TEST_F(CheckpointTest, TwoRanksWriteOneCheckpointEachItsShare) {
  const at::Tensor m0 = at::randn({300}), m1 = at::randn({5, 7}, at::kDouble);  // 1200 and 280 bytes
  const at::Tensor meta0 = at::empty({300}, at::kMeta), meta1 = at::empty({5, 7}, at::TensorOptions(at::kDouble).device(at::kMeta));
  const ShardedTensors on_rank0{{{"m0", m0}, {"m1", meta1}}, {0, 1}}, on_rank1{{{"m0", meta0}, {"m1", m1}}, {0, 1}};
  hybrid::io::NamedTensors weights[2];  // 4 x 400 bytes: 3080 in all, 1540 a rank; rank 0 has 1200 of state
  for (int rank : {0, 1})
    for (int i = 0; i < 4; ++i) weights[rank].emplace_back("w" + std::to_string(i), at::full({100}, 10.0 * rank + i));
  for (const bool async : {false, true}) {
    SCOPED_TRACE(async ? "async" : "sync");
    const std::string run = path(async ? "async" : "sync");
    MemoryNotes notes;
    Checkpointer rank0(run, hybrid::CheckpointConfig{}, notes.group(0, 2)), rank1(run, hybrid::CheckpointConfig{}, notes.group(1, 2));
    auto save = [&](Checkpointer& c, const hybrid::io::NamedTensors& model, const ShardedTensors& optim) {
      if (async) c.save_async(at_step(5), model, optim, "name: x\n");
      else c.save(at_step(5), model, optim, "name: x\n");
      c.wait();
    };
    std::thread other([&] { save(rank1, weights[1], on_rank1); });
    save(rank0, weights[0], on_rank0);
    other.join();
    const auto saved = load_checkpoint(run, true);
    ASSERT_EQ(saved.optim.tensors.size(), 2u);
    EXPECT_TRUE(at::equal(*saved.optim.find("m0"), m0));
    EXPECT_TRUE(at::equal(*saved.optim.find("m1"), m1));
    ASSERT_EQ(saved.model.tensors.size(), 4u);
    for (int i = 0; i < 4; ++i)  // w0 fits beside rank 0's state; the rest are rank 1's
      EXPECT_TRUE(at::equal(saved.model.tensors[i].second, weights[i == 0 ? 0 : 1][i].second)) << "w" << i;
    EXPECT_EQ(saved.model.metadata.at("format"), "pt");
    hybrid::io::write_safetensors(path("whole.safetensors"), {{"m0", m0}, {"m1", m1}});
    EXPECT_EQ(slurp(run + "/checkpoints/step0000005/optim.safetensors"), slurp(path("whole.safetensors")));
    for (const std::string share : {"m0", "m1"})  // each entry's checksum is in the MANIFEST, rank 1's from its note
      EXPECT_EQ(error_from([&] { load_checkpoint(run, true, [&](const std::string& name) { return name == share; }); }), "");
    EXPECT_EQ(std::distance(std::filesystem::directory_iterator(run + "/checkpoints/step0000005"), {}), 5);
  }
}

// A rank checks the optimizer entries it reads (and the file's header) against their own checksums
// in the MANIFEST, so it reads its share's pages alone: a corrupted entry is named by the rank that
// reads it; without `reads`, the whole file is checked as before.
TEST_F(CheckpointTest, ARankChecksTheOptimizerStateItReads) {
  const at::Tensor a = at::full({64}, 1.0f), b = at::full({64}, 1234.5f);
  Checkpointer(path("run"), hybrid::CheckpointConfig{}).save(at_step(1), {{"w", a}}, ShardedTensors{{{"a", a}, {"b", b}}, {0, 0}}, "");
  const std::string file = path("run/checkpoints/step0000001/optim.safetensors");
  std::string bytes = slurp(file);
  const float pattern = 1234.5f;
  const size_t in_b = bytes.find(std::string(reinterpret_cast<const char*>(&pattern), 4));
  ASSERT_NE(in_b, std::string::npos);
  bytes[in_b + 1] ^= 1;
  std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
  auto only = [](const std::string& which) { return [which](const std::string& name) { return name == which; }; };
  EXPECT_EQ(error_from([&] { load_checkpoint(path("run"), true, only("a")); }), "");
  EXPECT_NE(error_from([&] { load_checkpoint(path("run"), true, only("b")); }).find("optim.safetensors: optimizer state 'b' does not match the MANIFEST (corrupted)"),
            std::string::npos);
  EXPECT_NE(error_from([&] { load_checkpoint(path("run"), true); }).find("optim.safetensors: checksum does not match the MANIFEST (corrupted)"),
            std::string::npos);
  bytes[in_b + 1] ^= 1, bytes[12] ^= 1;  // b mended, a byte of the header's JSON changed
  std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
  EXPECT_NE(error_from([&] { load_checkpoint(path("run"), true, only("a")); }).find("optim.safetensors: header's checksum does not match the MANIFEST (corrupted)"),
            std::string::npos);
}

// A rank whose share fails (here it holds only the shape of an entry it is to write) fails its own
// save and rank 0's with its message; a rank that never writes fails rank 0's at the timeout. The
// previous checkpoint stays LATEST and no partial folder is left.
TEST_F(CheckpointTest, ARankWhoseShareFailsOrNeverComesFailsTheSave) {
  const at::Tensor m = at::ones({10}), meta = at::empty({10}, at::kMeta);
  Checkpointer(path("run"), hybrid::CheckpointConfig{}).save(at_step(1), {{"w", m}}, ShardedTensors{{{"m", m}}, {0}}, "");
  MemoryNotes notes;
  Checkpointer rank0(path("run"), hybrid::CheckpointConfig{}, notes.group(0, 2, std::chrono::seconds(1)));
  Checkpointer rank1(path("run"), hybrid::CheckpointConfig{}, notes.group(1, 2));
  const ShardedTensors shares{{{"a", m}, {"b", meta}}, {0, 1}};  // the weight w: rank 0's (40 bytes each)
  std::string error1;
  std::thread other([&] { error1 = error_from([&] { rank1.save(at_step(2), {{"w", m}}, shares, ""); }); });
  const std::string error0 = error_from([&] { rank0.save(at_step(2), {{"w", m}}, shares, ""); });
  other.join();
  EXPECT_NE(error1.find("checkpoint at step 2 not saved: "), std::string::npos) << error1;
  EXPECT_NE(error1.find("entry 'b' is this process's to write, but it holds only its shape"), std::string::npos) << error1;
  EXPECT_NE(error0.find("checkpoint at step 2 not saved: rank 1: "), std::string::npos) << error0;
  EXPECT_NE(error0.find("holds only its shape; the previous checkpoint"), std::string::npos) << error0;
  const std::string timeout = error_from([&] { rank0.save(at_step(3), {{"w", m}}, shares, ""); });
  EXPECT_NE(timeout.find("rank 1's share of the checkpoint did not come within 1 s"), std::string::npos) << timeout;
  EXPECT_EQ(slurp(path("run/checkpoints/LATEST")), "step0000001\n");
  EXPECT_FALSE(std::filesystem::exists(path("run/checkpoints/step0000002.tmp")));
  EXPECT_FALSE(std::filesystem::exists(path("run/checkpoints/step0000003.tmp")));
}

}  // namespace
