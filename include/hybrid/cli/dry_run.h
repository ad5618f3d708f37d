// `hybrid-train --dry-run`: what the configured model costs, without touching data.
#pragma once

#include <cstdint>
#include <string>

#include "hybrid/config/config.h"

namespace hybrid {

// Parameter breakdown, FLOPs per token and a per-GPU memory estimate as a printable report.
std::string dry_run_report(const Config& config, int64_t world_size);

// Muon's Newton-Schulz FLOPs a step beside the step's training FLOPs, both on one rank, as a line
// (the dry run's; a run under optimizer.type: muon logs it at the start): ZeRO splits the matrices
// among the ranks (whole matrices a rank, balanced by bytes: about even), without it every rank
// orthogonalizes all of them.
std::string muon_cost(const Config& config, int64_t world_size);

}  // namespace hybrid
