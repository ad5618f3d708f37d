// What every hybrid-* executable does around its work: parse the command line (usage errors:
// one line, exit 2) and turn any exception into one "error: ..." line with its exit code
// (hybrid::Error's own code; 1 otherwise), without the C++ backtraces torch appends.
#pragma once

#include <CLI/CLI.hpp>

#include <cctype>
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

// A wall-clock duration, 5400 (seconds), 5400s, 90m, 1.5h or 3h50m, in seconds; nullopt for
// anything else (a number after a unit needs its own: 3h50m, not 3h50) or for zero.
inline std::optional<double> duration_seconds(const std::string& text) {
  double total = 0;
  for (size_t i = 0; i < text.size();) {
    const size_t start = i;
    while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
    double number = 0;
    if (i == start || !CLI::detail::lexical_cast(text.substr(start, i - start), number)) return std::nullopt;
    double unit = 1;
    if (i < text.size()) {
      const char u = text[i++];
      unit = u == 'h' ? 3600 : u == 'm' ? 60 : u == 's' ? 1 : 0;
      if (unit == 0) return std::nullopt;
    } else if (start > 0) {
      return std::nullopt;
    }
    total += number * unit;
  }
  if (total > 0) return total;
  return std::nullopt;
}

// Turns a duration (duration_seconds) into its seconds for the option's number.
inline const CLI::Validator duration(
    [](std::string& text) -> std::string {
      const std::optional<double> seconds = duration_seconds(text);
      if (!seconds) return "must be a duration like 3h50m, 90m or 5400 (seconds), got " + text;
      text = std::to_string(*seconds);
      return {};
    },
    "DURATION");

}  // namespace hybrid::cli
