// `hybrid-train --dry-run`: what the configured model costs, without touching data.
#pragma once

#include <cstdint>
#include <string>

#include "hybrid/config/config.h"

namespace hybrid {

// Parameter breakdown, FLOPs per token and a per-GPU memory estimate as a printable report.
std::string dry_run_report(const Config& config, int64_t world_size);

}  // namespace hybrid
