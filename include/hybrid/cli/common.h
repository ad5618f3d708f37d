// What every hybrid-* executable does around its work: parse the command line (usage errors:
// one line, exit 2) and turn any exception into one "error: ..." line with its exit code
// (hybrid::Error's own code; 1 otherwise), without the C++ backtraces torch appends.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <optional>

namespace hybrid::cli {

// nullopt when parsing succeeded, else the exit code to return (0 after --help).
std::optional<int> parse(CLI::App& app, int argc, char** argv);

int run_reporting_errors(const std::function<int()>& body);

}  // namespace hybrid::cli
