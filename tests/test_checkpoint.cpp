// Checkpointer's asynchronous saves: what a background save writes is the tensors as they were at
// the call, later saves wait for it, and its failure comes back as the save's error; the files'
// CRC-32 in pieces on several threads. (Whole runs with them, kills and a full disk included:
// train_runs.sh.)
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "hybrid/train/checkpoint.h"
#include "hybrid/util/crc32.h"
#include "temp_dir.h"

namespace {
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
}

TEST_F(CheckpointTest, AsyncSaveWritesTheTensorsAsTheyWereAtTheCall) {
  Checkpointer checkpoints(path("run"), hybrid::CheckpointConfig{});
  at::Tensor w = at::arange(1000, at::kFloat), m = at::zeros({10}, at::kFloat);
  const at::Tensor w0 = w.clone(), m0 = m.clone();
  // The optimizer state comes as a host copy of the caller's own (GradSync::state_on_leader's), the
  // weights as they are: the run goes on updating them in place while the thread writes.
  checkpoints.save_async(at_step(7), {{"w", w}}, {{"m", m.clone()}}, "name: x\n");
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
  checkpoints.save_async(at_step(1), {{"w", big}}, {}, "");
  checkpoints.save(at_step(2), {{"w", big + 1}}, {}, "");
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
    checkpoints.save_async(at_step(3), {{"w", w}}, {}, "");
    const std::string error = error_from([&] { checkpoints.wait(); });
    EXPECT_NE(error.find("checkpoint at step 3 not saved"), std::string::npos) << error;
    EXPECT_EQ(error_from([&] { checkpoints.wait(); }), "");  // reported once
    EXPECT_NE(error_from([&] { checkpoints.save(at_step(4), {{"w", w}}, {}, ""); }).find("checkpoint at step 4 not saved"),
              std::string::npos);
  }
  Checkpointer pending(path("run"), hybrid::CheckpointConfig{});
  pending.save_async(at_step(5), {{"w", w}}, {}, "");
}  // pending's destructor: waits, logs, does not throw

}  // namespace
