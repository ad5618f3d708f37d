#include "hybrid/dist/comm.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef HYBRID_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <csignal>
#include <cstdlib>
#include <exception>
#include <thread>

#include "hybrid/error.h"

namespace hybrid::dist {
namespace {

std::optional<int> env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < 0) throw ConfigError(std::string("environment variable ") + name + "='" + v + "' is not a number");
  return static_cast<int>(x);
}

// tensors[begin, end) one after another in one new 1-D tensor: a bucket as it travels.
at::Tensor flattened(const std::vector<at::Tensor>& tensors, size_t begin, size_t end) {
  std::vector<at::Tensor> views;
  for (size_t i = begin; i < end; ++i) views.push_back(tensors[i].reshape(-1));
  return at::cat(views);
}

}  // namespace

DistEnv DistEnv::from_environment() {
  DistEnv e;
  const bool torchrun = env_int("WORLD_SIZE").has_value();
  const char* rank = torchrun ? "RANK" : "SLURM_PROCID";
  const char* world = torchrun ? "WORLD_SIZE" : "SLURM_NTASKS";
  const char* local = torchrun ? "LOCAL_RANK" : "SLURM_LOCALID";
  e.world_size = env_int(world).value_or(1);
  if (e.world_size <= 1) return DistEnv{};
  e.rank = env_int(rank).value_or(-1);
  e.local_rank = env_int(local).value_or(0);
  if (e.rank < 0 || e.rank >= e.world_size)
    throw ConfigError(std::string(rank) + " must be set to a rank below " + world + "=" + std::to_string(e.world_size));
  const char* addr = std::getenv("MASTER_ADDR");
  if (!addr && !torchrun)
    throw ConfigError("under Slurm, set MASTER_ADDR (e.g. the first host of $SLURM_JOB_NODELIST) and MASTER_PORT");
  if (addr) e.master_addr = addr;
  e.master_port = env_int("MASTER_PORT").value_or(29500);
  return e;
}

Comm::Comm(const DistEnv& env, bool cuda, std::chrono::seconds timeout)
    : rank_(env.rank), world_size_(env.world_size) {
  // A rank that dies closes its sockets; this rank's next write to one must fail as an error that
  // names what happened, not end the process by SIGPIPE with nothing said (tests/dist_runs.sh's
  // surviving rank, which exited 141 when its write came before the read that times out).
  std::signal(SIGPIPE, SIG_IGN);
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<uint16_t>(env.master_port);
  opts.isServer = env.rank == 0;
  opts.numWorkers = env.world_size;
  opts.timeout = timeout;
  store_ = c10::make_intrusive<c10d::TCPStore>(env.master_addr, opts);
  if (cuda) {
#ifdef HYBRID_NCCL
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    backend_ = std::make_shared<c10d::ProcessGroupNCCL>(store_, env.rank, env.world_size, options);
#else
    throw Error("this build has no NCCL support (nccl.h was not found): multi-GPU runs need it");
#endif
  } else {
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    const bool local = env.master_addr == "127.0.0.1" || env.master_addr == "localhost";
    options->devices.push_back(local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                     : c10d::ProcessGroupGloo::createDefaultDevice());
    backend_ = std::make_shared<c10d::ProcessGroupGloo>(store_, env.rank, env.world_size, options);
  }
}

// NCCL wants its communicators closed before the process exits (else it warns that
// destroy_process_group was not called). On a normal exit every rank has finished its
// collectives, so shutdown waits for nothing; while an error unwinds, a peer may never answer,
// so abort instead of waiting.
Comm::~Comm() {
  try {
    if (std::uncaught_exceptions() > 0)
      backend_->abort();
    else
      backend_->shutdown();
  } catch (...) {
    // Closing is best effort: the process is about to exit either way.
  }
}

std::vector<std::pair<size_t, size_t>> Comm::buckets(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes) {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t i = 0; i < tensors.size();) {
    const size_t begin = i;
    int64_t bytes = 0;
    while (i < tensors.size() &&
           (i == begin || (bytes + tensors[i].nbytes() <= bucket_bytes && tensors[i].dtype() == tensors[begin].dtype())))
      bytes += tensors[i++].nbytes();
    out.emplace_back(begin, i);
  }
  return out;
}

template <class Op>
void Comm::bucketed(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes, Op op) {
  for (const auto& [begin, end] : buckets(tensors, bucket_bytes)) {
    std::vector<at::Tensor> flat = {flattened(tensors, begin, end)};
    op(flat);
    int64_t offset = 0;
    for (size_t i = begin; i < end; ++i) {
      const at::Tensor& t = tensors[i];
      t.copy_(flat[0].narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

void Comm::broadcast(const std::vector<at::Tensor>& tensors, int root, int64_t bucket_bytes) {
  bucketed(tensors, bucket_bytes, [&](std::vector<at::Tensor>& flat) {
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    backend_->broadcast(flat, opts)->wait();
  });
}

void Comm::barrier() { backend_->barrier()->wait(); }

void Comm::post(const std::string& key, const std::string& value) {
  store_->set(key, std::vector<uint8_t>(value.begin(), value.end()));
}

std::optional<std::string> Comm::take(const std::string& key, std::chrono::milliseconds timeout) {
  // Polled: a blocking wait would hold the store's client (one lock for every thread of this
  // process, NCCL's monitoring thread among them) until the key came; a check holds it a moment.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!store_->check({key})) {
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const std::vector<uint8_t> value = store_->get(key);
  store_->deleteKey(key);
  return std::string(value.begin(), value.end());
}

std::vector<double> Comm::sum_over_ranks(const std::vector<double>& values, at::Device device) {
  at::Tensor sums = at::tensor(values, at::kDouble).to(device);
  start_all_reduce_sum(sums)();
  sums = sums.cpu();
  return {sums.data_ptr<double>(), sums.data_ptr<double>() + sums.numel()};
}

Comm::Wait Comm::start_all_reduce_sum(const at::Tensor& t) {
  std::vector<at::Tensor> tensors = {t};
  auto work = backend_->allreduce(tensors);
  return [work] { work->wait(); };
}

Comm::Wait Comm::start_reduce_sum(const at::Tensor& t, int root) {
  std::vector<at::Tensor> tensors = {t};
  c10d::ReduceOptions opts;
  opts.rootRank = root;
  auto work = backend_->reduce(tensors, opts);
  return [work] { work->wait(); };
}

}  // namespace hybrid::dist
