// Stop requests by signal: SIGTERM (a scheduler's time limit or preemption; Slurm sends it to
// every process of a job step) and SIGUSR1 (Slurm's `--signal=USR1@SECONDS` warning). While a
// StopSignals lives, either signal only records itself; the trainer reads the record after each
// step, agrees on it with the other ranks, and ends the run with a checkpoint at that step.
#pragma once

namespace hybrid::train {

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

}  // namespace hybrid::train
