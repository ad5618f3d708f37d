// Stop requests by signal: SIGTERM (a scheduler's time limit or preemption; Slurm sends it to
// every process of a job step) and SIGUSR1 (Slurm's `--signal=USR1@SECONDS` warning). The trainer
// records them (StopSignals), agrees on them with the other ranks after each step and ends the run
// with a checkpoint at that step; the launcher and hybrid-sweep pass them on to what they started.
#pragma once

#include <signal.h>

namespace hybrid::util {

// Runs `handler` on SIGTERM and SIGUSR1, system calls in flight going on (SA_RESTART); the actions
// before go into `previous` where given.
void handle_stop_signals(void (*handler)(int), struct sigaction (*previous)[2] = nullptr);

// While one lives, either signal only records itself.
class StopSignals {
 public:
  StopSignals();   // takes SIGTERM and SIGUSR1
  ~StopSignals();  // gives them back to what handled them before
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  // The first of the signals received since construction, or 0.
  static int received();
};

// "SIGTERM", "SIGUSR1" (or "a signal").
const char* signal_name(int signal);

}  // namespace hybrid::util
