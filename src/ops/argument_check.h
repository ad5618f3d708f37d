// The ops' argument checks: one clear line naming the op, as std::invalid_argument (the CLI
// prints it and exits non-zero; tests expect the type).
#pragma once

#include <stdexcept>
#include <string>

namespace hybrid::ops::detail {

// check(ok, "what must hold") throws std::invalid_argument("<op>: what must hold") when !ok.
struct ArgumentCheck {
  const char* op;
  void operator()(bool ok, const std::string& what) const {
    if (!ok) throw std::invalid_argument(std::string(op) + ": " + what);
  }
};

}  // namespace hybrid::ops::detail
