#include "hybrid/cli/common.h"

#include <iostream>

#include "hybrid/error.h"
#include "hybrid/log.h"

namespace hybrid::cli {

std::optional<int> parse(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "error: " << e.what() << " (see --help)\n";
    return 2;
  }
  return std::nullopt;
}

int run_reporting_errors(const std::function<int()>& body) {
  // The message in one write: ranks share a terminal or log file, and piecewise writes to the
  // unbuffered std::cerr can interleave mid-line.
  auto report = [](const char* what) {
    std::string line(what);
    line = "error: " + log::rank_tag() + line.substr(0, line.find('\n')) + "\n";
    // torch's message says how much was asked for; this says what to do about it.
    if (line.find("CUDA out of memory") != std::string::npos)
      line += "hint: hybrid-train --dry-run estimates the memory a config needs; less of it: "
              "trainer.activation_checkpointing: true, a smaller trainer.micro_batch_size, "
              "trainer.delta_rule.keep_intermediates: false, distributed.zero_stage: 2 over several GPUs\n";
    std::cerr.write(line.data(), static_cast<std::streamsize>(line.size()));
    std::cerr.flush();
  };
  try {
    return body();
  } catch (const Error& e) {
    report(e.what());
    return e.exit_code;
  } catch (const std::exception& e) {
    report(e.what());
    return 1;
  }
}

}  // namespace hybrid::cli
