// GradSync with two ranks in one process (two threads, Gloo over localhost): reductions started
// from backward hooks give the mean gradient at every ZeRO stage and bucket size, also for a
// parameter that only one rank's backward reaches; ZeRO-2 keeps only owned gradients between
// micro batches and sums them over micro batches; accumulation micro batches send nothing at
// stages 0 and 1; the ranks' shares of the squared gradient norm sum to the whole; the optimizer
// state's checkpoint file written in shares; notes between ranks through the rendezvous's store.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <optional>
#include <set>
#include <thread>

#include "hybrid/dist/comm.h"
#include "hybrid/dist/grad_sync.h"
#include "hybrid/dist/launcher.h"
#include "hybrid/io/safetensors.h"
#include "hybrid/util/crc32.h"
#include "temp_dir.h"

namespace {

using Named = std::vector<std::pair<std::string, at::Tensor>>;

// Three parameters; `b` only gets a gradient on rank 0 (as if its branch were data-dependent).
Named make_params() {
  Named p = {{"a", at::full({300}, 0.5, at::kDouble)}, {"b", at::full({7, 5}, -1.0, at::kDouble)},
             {"c", at::full({50}, 2.0, at::kDouble)}};
  for (auto& [name, t] : p) t.requires_grad_(true);
  return p;
}

// The loss of micro batch m on `rank`: different on every rank and micro batch.
at::Tensor loss_of(const Named& p, int rank, int m) {
  const double s = 1.0 + rank + 0.1 * m;
  at::Tensor loss = (p[0].second * s).pow(2).sum() + (p[2].second * s).sin().sum();
  if (rank == 0) loss = loss + (p[1].second * s).pow(3).sum();
  return loss;
}

// What every rank should hold after the step: the mean over ranks of the summed micro batches.
std::vector<at::Tensor> expected_grads(int micro) {
  Named p = make_params();
  at::Tensor total = at::zeros({}, at::kDouble);
  for (int rank = 0; rank < 2; ++rank)
    for (int m = 0; m < micro; ++m) total = total + loss_of(p, rank, m);
  auto g = torch::autograd::grad({total / 2}, {p[0].second, p[1].second, p[2].second});
  return {g[0], g[1], g[2]};
}

struct RankResult {
  std::vector<at::Tensor> grads;  // undefined where the rank holds none
  int started_during_backward = 0;
  double squared_norm = 0;  // this rank's share
};

void run_rank(int rank, int port, int zero, int64_t bucket_bytes, int micro, RankResult& out) {
  hybrid::dist::DistEnv env;
  env.rank = rank, env.world_size = 2, env.master_port = port;
  hybrid::dist::Comm comm(env, /*cuda=*/false, std::chrono::seconds(30));
  Named p = make_params();
  hybrid::dist::GradSync sync(&comm, p, zero, bucket_bytes);
  for (int m = 0; m < micro; ++m) {
    sync.prepare_backward(m == micro - 1);  // also finishes the previous micro batch's reductions
    if (zero == 2 && m > 0)                 // between micro batches a rank keeps only what it owns
      for (size_t i = 0; i < p.size(); ++i)
        if (!sync.owns(i)) EXPECT_FALSE(p[i].second.grad().defined()) << "rank " << rank << " param " << i;
    loss_of(p, rank, m).backward();
  }
  out.squared_norm = sync.reduce_gradients().item<double>();
  out.started_during_backward = sync.started_during_backward();
  for (auto& [name, t] : p) out.grads.push_back(t.grad());
}

void check(int zero, int64_t bucket_bytes, int micro) {
  const int port = hybrid::dist::free_port();
  RankResult r0, r1;
  std::thread t1([&] { run_rank(1, port, zero, bucket_bytes, micro, r1); });
  run_rank(0, port, zero, bucket_bytes, micro, r0);
  t1.join();
  const auto want = expected_grads(micro);
  for (const RankResult* r : {&r0, &r1})
    for (size_t i = 0; i < want.size(); ++i) {
      const at::Tensor& got = r->grads[i];
      if (zero == 2 && !got.defined()) continue;  // not this rank's to keep
      ASSERT_TRUE(got.defined()) << "zero " << zero << " param " << i;
      EXPECT_LT((got - want[i]).abs().max().item<double>(), 1e-12) << "zero " << zero << " param " << i;
    }
  double squared_norm = 0;
  for (const at::Tensor& g : want) squared_norm += g.pow(2).sum().item<double>();
  EXPECT_NEAR(r0.squared_norm + r1.squared_norm, squared_norm, 1e-12 * squared_norm) << "zero " << zero;
  if (zero == 2)  // every gradient is held by exactly one rank
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NE(r0.grads[i].defined(), r1.grads[i].defined()) << "param " << i;
  EXPECT_GT(r0.started_during_backward, 0) << "zero " << zero;
}

TEST(GradSync, MeanGradientsAtEveryStageAndBucketSize) {
  // c10d's process-wide flight recorder is not safe for two ranks issuing collectives from two
  // threads of one process (it crashed here); real runs have one rank per process.
  ::setenv("TORCH_FR_BUFFER_SIZE", "0", 1);
  for (int zero : {0, 1, 2})
    for (int64_t bucket_bytes : {int64_t{100}, int64_t{25} << 20}) check(zero, bucket_bytes, /*micro=*/3);
}

// Notes through the rendezvous's store: what one rank posts another takes (once), from a thread
// of its own beside the collectives; a note that never comes is nothing at the timeout.
TEST(Comm, NotesBetweenRanksThroughTheStore) {
  ::setenv("TORCH_FR_BUFFER_SIZE", "0", 1);
  const int port = hybrid::dist::free_port();
  std::optional<std::string> got, again, never;
  auto run = [&](int rank) {
    hybrid::dist::DistEnv env;
    env.rank = rank, env.world_size = 2, env.master_port = port;
    hybrid::dist::Comm comm(env, /*cuda=*/false, std::chrono::seconds(30));
    if (rank == 1) {
      std::thread([&] { comm.post("checkpoint/x/rank1", std::string("{\"a\": 1}\0b", 11)); }).join();
    } else {
      std::thread([&] {
        got = comm.take("checkpoint/x/rank1", std::chrono::seconds(20));
        again = comm.take("checkpoint/x/rank1", std::chrono::milliseconds(50));
        never = comm.take("checkpoint/y/rank1", std::chrono::milliseconds(50));
      }).join();
    }
    comm.barrier();
  };
  std::thread t1([&] { run(1); });
  run(0);
  t1.join();
  EXPECT_EQ(got, std::string("{\"a\": 1}\0b", 11));
  EXPECT_EQ(again, std::nullopt);
  EXPECT_EQ(never, std::nullopt);
}

// The optimizer's state for a checkpoint: every owner writes its share of one file (no state
// travels between ranks), and the file is byte for byte what one process writes from the whole
// state; the shares' CRC-32s join into the file's.
class GradSyncStateFile : public TempDirTest {};

TEST_F(GradSyncStateFile, EveryOwnerWritesItsShareOfOneFile) {
  ::setenv("TORCH_FR_BUFFER_SIZE", "0", 1);
  auto blank = [](const std::string& name, const at::Tensor& p) -> Named {
    return {{"m." + name, at::zeros_like(p)}, {"n." + name, at::zeros({}, p.options().dtype(at::kFloat))}};
  };
  // The whole state: each parameter's entries marked with its index.
  Named whole;
  const Named params = make_params();
  for (size_t i = 0; i < params.size(); ++i)
    for (auto& [name, t] : blank(params[i].first, params[i].second)) whole.emplace_back(name, t.fill_(1.5 + static_cast<double>(i)));
  hybrid::io::write_safetensors(path("whole.safetensors"), whole);
  for (int zero : {0, 1, 2}) {
    SCOPED_TRACE("zero " + std::to_string(zero));
    const std::string file = path("shared" + std::to_string(zero) + ".safetensors");
    const int port = hybrid::dist::free_port();
    hybrid::io::WrittenShare written[2];
    std::vector<int> writers[2];
    auto run = [&](int rank) {
      hybrid::dist::DistEnv env;
      env.rank = rank, env.world_size = 2, env.master_port = port;
      hybrid::dist::Comm comm(env, /*cuda=*/false, std::chrono::seconds(30));
      Named p = make_params();
      hybrid::dist::GradSync sync(&comm, p, zero, /*bucket_bytes=*/100);
      Named local;  // what this rank's optimizer holds: its own parameters' (every one at stage 0)
      for (const auto& [name, t] : whole)
        for (size_t i = 0; i < p.size(); ++i)
          if (sync.owns(i) && name.substr(2) == p[i].first) local.emplace_back(name, t.clone());
      const hybrid::io::ShardedTensors shares = sync.state_file(local, blank);
      writers[rank] = shares.writer;
      written[rank] = hybrid::io::write_safetensors_share(file, shares, rank);
    };
    std::thread t1([&] { run(1); });
    run(0);
    t1.join();
    EXPECT_EQ(writers[0], writers[1]);
    const std::set<int> writer_set(writers[0].begin(), writers[0].end()), want = zero == 0 ? std::set<int>{0} : std::set<int>{0, 1};
    EXPECT_EQ(writer_set, want);
    EXPECT_EQ(zero == 0, written[1].ranges.empty());  // at stage 0 rank 0 writes it all
    const std::string bytes = slurp(file);
    EXPECT_EQ(bytes, slurp(path("whole.safetensors")));
    std::vector<hybrid::util::CrcRange> ranges = written[0].ranges;
    ranges.insert(ranges.end(), written[1].ranges.begin(), written[1].ranges.end());
    EXPECT_EQ(hybrid::util::crc32_join(ranges, written[0].file_size),
              hybrid::util::crc32_of(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size()));
  }
}

}  // namespace
