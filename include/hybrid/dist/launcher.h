// `hybrid-train --nproc-per-node N` on one machine: starts N copies of this program with the
// environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
// OMP_NUM_THREADS, unless set, each rank's share of the CPUs) and waits. When one fails, the others get two seconds to end on their own (and report their
// errors), then are killed; the first failure's exit code is returned. SIGTERM and SIGUSR1 sent
// to the launcher go on to every rank (a stop request: util/stop_signals.h), and a launcher that
// dies sends its ranks SIGTERM.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace hybrid::dist {

// args: the command line to run in each process (args[0] the program).
int launch_local(int nproc, const std::vector<std::string>& args);

// `--nproc-per-node N` of a hybrid-* command: this command line (argv) again in N processes by
// launch_local, the option left out. Nothing to do (nullopt) for N = 1 or inside a rank that a
// launcher or torchrun started (WORLD_SIZE set).
std::optional<int> relaunch_as_ranks(int nproc, int argc, char** argv);

// A localhost port the kernel just handed out (for a rendezvous); throws Error if none.
int free_port();

}  // namespace hybrid::dist
