// Errors that end a run with one clear line. Bad input (config, data, checkpoint, CLI)
// throws one of these; main() prints "error: <what>" and exits with the code.
#pragma once

#include <stdexcept>
#include <string>

namespace hybrid {

struct Error : std::runtime_error {
  int exit_code;
  explicit Error(const std::string& what, int code = 1) : std::runtime_error(what), exit_code(code) {}
};

// A configuration or command-line problem: exit code 2, nothing created.
struct ConfigError : Error {
  explicit ConfigError(const std::string& what) : Error(what, 2) {}
};

}  // namespace hybrid
