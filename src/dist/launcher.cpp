#include "hybrid/dist/launcher.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <thread>

#include "hybrid/error.h"

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

int launch_local(int nproc, const std::vector<std::string>& args) {
  const std::string port = std::to_string(free_port());
  std::map<pid_t, int> ranks;
  for (int rank = 0; rank < nproc; ++rank) {
    pid_t pid = ::fork();
    if (pid < 0) throw Error("--nproc-per-node: fork failed");
    if (pid == 0) {
      ::setenv("RANK", std::to_string(rank).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", port.c_str(), 1);
      std::vector<char*> argv;
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv("/proc/self/exe", argv.data());
      ::_exit(127);
    }
    ranks[pid] = rank;
  }
  // After the first failure the others get a grace period before SIGTERM: a rank that threw
  // reports its error only after unwinding, and its closed connections make its peers fail
  // first; stopping everyone at once could kill it before its message is out.
  constexpr auto kGrace = std::chrono::seconds(2);
  std::optional<std::chrono::steady_clock::time_point> stop_at;
  int result = 0;
  while (!ranks.empty()) {
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, stop_at ? WNOHANG : 0);
    if (pid < 0) break;
    if (pid == 0) {  // none has exited yet, the grace period runs
      if (std::chrono::steady_clock::now() < *stop_at) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      } else {
        for (const auto& [other, r] : ranks) ::kill(other, SIGTERM);
        stop_at.reset();
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

}  // namespace hybrid::dist
