#include "hybrid/util/stop_signals.h"

#include <csignal>
#include <cstring>

namespace hybrid::util {
namespace {

constexpr int kSignals[] = {SIGTERM, SIGUSR1};
volatile std::sig_atomic_t first_received = 0;
struct sigaction previous[2];

extern "C" void record(int signal) {
  if (!first_received) first_received = signal;
}

}  // namespace

void handle_stop_signals(void (*handler)(int), struct sigaction (*previous)[2]) {
  struct sigaction action;
  std::memset(&action, 0, sizeof action);
  action.sa_handler = handler;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  for (int i = 0; i < 2; ++i) sigaction(kSignals[i], &action, previous ? &(*previous)[i] : nullptr);
}

StopSignals::StopSignals() {
  first_received = 0;
  handle_stop_signals(record, &previous);
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

}  // namespace hybrid::util
