// What every hybrid-* executable does around its work: parse the command line (usage errors:
// one line, exit 2) and turn any exception into one "error: ..." line with its exit code
// (hybrid::Error's own code; 1 otherwise), without the C++ backtraces torch appends.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <optional>
#include <string>

namespace hybrid::cli {

// nullopt when parsing succeeded, else the exit code to return (0 after --help).
std::optional<int> parse(CLI::App& app, int argc, char** argv);

int run_reporting_errors(const std::function<int()>& body);

// Numbers above 0, for counts and durations. (CLI11's PositiveNumber names its range as 0 to the
// largest double, written out in full, in its error line.)
inline const CLI::Validator positive(
    [](std::string& text) -> std::string {
      double value = 0;
      if (CLI::detail::lexical_cast(text, value) && value > 0) return {};
      return "must be above 0, got " + text;
    },
    "> 0");

}  // namespace hybrid::cli
