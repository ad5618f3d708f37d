#include "hybrid/dist/launcher.h"

#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <thread>

#include "hybrid/error.h"
#include "hybrid/util/stop_signals.h"

namespace hybrid::dist {

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    if (fd >= 0) ::close(fd);
    throw Error("cannot find a free localhost port for the rendezvous");
  }
  const int port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

namespace {

// SIGTERM and SIGUSR1 sent to the launcher, for its ranks (their stop request: util/stop_signals.h).
volatile std::sig_atomic_t to_forward = 0;
extern "C" void remember(int signal) { to_forward = signal; }

}  // namespace

int launch_local(int nproc, const std::vector<std::string>& args) {
  const std::string port = std::to_string(free_port());
  // Each rank's share of this process's CPUs for torch's intra-op threads (initialization, the
  // checkpoint's checksums and copies, CPU training), where every rank would otherwise start one
  // thread per CPU of the machine; an OMP_NUM_THREADS already set is kept, as torchrun keeps it.
  cpu_set_t cpus;
  const int available = ::sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
  const std::string threads = std::to_string(std::max(1, available / nproc));
  util::handle_stop_signals(remember);
  std::map<pid_t, int> ranks;
  const pid_t launcher = ::getpid();
  for (int rank = 0; rank < nproc; ++rank) {
    pid_t pid = ::fork();
    if (pid < 0) throw Error("--nproc-per-node: fork failed");
    if (pid == 0) {
      // The launcher killed outright (SIGKILL, no forwarding) still stops its ranks, with a
      // checkpoint where they are training.
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != launcher) ::_exit(1);
      ::setenv("RANK", std::to_string(rank).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", port.c_str(), 1);
      ::setenv("OMP_NUM_THREADS", threads.c_str(), /*overwrite=*/0);
      std::vector<char*> argv;
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv("/proc/self/exe", argv.data());
      ::_exit(127);
    }
    ranks[pid] = rank;
  }
  // After the first failure the others get a grace period before SIGKILL: a rank that threw
  // reports its error only after unwinding, and its closed connections make its peers fail
  // first; stopping everyone at once could kill it before its message is out.
  constexpr auto kGrace = std::chrono::seconds(2);
  std::optional<std::chrono::steady_clock::time_point> stop_at;
  int result = 0;
  // Polled (every 10 ms): a signal between a check of to_forward and a blocking wait would wait
  // for a rank to end before it is forwarded.
  while (!ranks.empty()) {
    if (const int signal = to_forward) {
      to_forward = 0;
      for (const auto& [pid, r] : ranks) ::kill(pid, signal);
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid < 0 && errno != EINTR) break;
    if (pid <= 0) {  // none has exited yet
      if (stop_at && std::chrono::steady_clock::now() >= *stop_at) {
        // SIGKILL: SIGTERM asks a rank to finish its step and save, which a rank whose peer died
        // may wait on until its collectives time out.
        for (const auto& [other, r] : ranks) ::kill(other, SIGKILL);
        stop_at.reset();
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      continue;
    }
    const int rank = ranks[pid];
    ranks.erase(pid);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code != 0 && result == 0) {
      result = code;
      std::cerr << "error: rank " << rank << (WIFSIGNALED(status) ? " was killed by signal " + std::to_string(WTERMSIG(status))
                                                                   : " exited with code " + std::to_string(code))
                << "; stopping the other ranks\n";
      stop_at = std::chrono::steady_clock::now() + kGrace;
    }
  }
  return result;
}

std::optional<int> relaunch_as_ranks(int nproc, int argc, char** argv) {
  if (nproc <= 1 || std::getenv("WORLD_SIZE")) return std::nullopt;
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--nproc-per-node") {
      ++i;
      continue;
    }
    if (a.rfind("--nproc-per-node=", 0) == 0) continue;
    args.push_back(a);
  }
  return launch_local(nproc, args);
}

}  // namespace hybrid::dist
