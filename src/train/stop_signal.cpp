#include "hybrid/train/stop_signal.h"

#include <signal.h>

#include <csignal>
#include <cstring>

namespace hybrid::train {
namespace {

volatile std::sig_atomic_t first_received = 0;
constexpr int kSignals[] = {SIGTERM, SIGUSR1};
struct sigaction previous[2];

extern "C" void record(int signal) {
  if (!first_received) first_received = signal;
}

}  // namespace

StopSignals::StopSignals() {
  first_received = 0;
  struct sigaction action;
  std::memset(&action, 0, sizeof action);
  action.sa_handler = record;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // system calls in flight (file writes, sockets) go on
  for (int i = 0; i < 2; ++i) sigaction(kSignals[i], &action, &previous[i]);
}

StopSignals::~StopSignals() {
  for (int i = 0; i < 2; ++i) sigaction(kSignals[i], &previous[i], nullptr);
}

int StopSignals::received() { return first_received; }

const char* signal_name(int signal) {
  switch (signal) {
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    default: return "a signal";
  }
}

}  // namespace hybrid::train
