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
  auto first_line = [](const char* what) {
    std::string s(what);
    return s.substr(0, s.find('\n'));
  };
  try {
    return body();
  } catch (const Error& e) {
    std::cerr << "error: " << log::rank_tag() << first_line(e.what()) << "\n";
    return e.exit_code;
  } catch (const std::exception& e) {
    const std::string line = first_line(e.what());
    std::cerr << "error: " << log::rank_tag() << line << "\n";
    // torch's message says how much was asked for; this says what to do about it.
    if (line.find("CUDA out of memory") != std::string::npos)
      std::cerr << "hint: hybrid-train --dry-run estimates the memory a config needs; less of it: "
                   "trainer.activation_checkpointing: true, a smaller trainer.micro_batch_size, "
                   "trainer.delta_rule.keep_intermediates: false, distributed.zero_stage: 2 over several GPUs\n";
    return 1;
  }
}

}  // namespace hybrid::cli
