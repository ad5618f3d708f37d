// Logging facade over spdlog. Kept free of spdlog/fmt types so files that include torch
// (which bundles its own fmt) can log without seeing the system fmt.
#pragma once

#include <string>

namespace hybrid::log {

// trace | debug | info | warn | error; unknown names throw ConfigError.
void set_level(const std::string& level);
// In multi-process runs every line is prefixed with "[rank R]".
void set_rank(int rank, int world_size);
// "[rank R] " in multi-process runs, else empty: for lines written outside the logger (the
// final error line), so a run's log says which rank failed.
std::string rank_tag();

void debug(const std::string& msg);
void info(const std::string& msg);
void warn(const std::string& msg);
void error(const std::string& msg);

}  // namespace hybrid::log
