// hybrid-bench-loader: how many tokens per second the data loader delivers for a config
// (reading, shuffling, EOS boundaries, pinned copies), to compare with what training consumes.
#include <chrono>
#include <iostream>

#include "hybrid/cli/common.h"
#include "hybrid/config/load.h"
#include "hybrid/data/loader.h"

using namespace hybrid;

int main(int argc, char** argv) {
  CLI::App app{"hybrid-bench-loader: tokens/s of the data loader for a config"};
  std::string config_path;
  std::vector<std::string> overrides;
  double seconds = 5;
  app.add_option("-c,--config", config_path, "YAML config file")->required();
  app.add_option("--set", overrides, "override a key (repeatable)")->take_all()->allow_extra_args(false);
  app.add_option("--seconds", seconds, "how long to measure")->check(hybrid::cli::positive);
  if (auto code = cli::parse(app, argc, argv)) return *code;
  return cli::run_reporting_errors([&] {
    const Config cfg = load_config(config_path, overrides).config;
    data::TokenDataset dataset(cfg.data.sources, cfg.data.seq_len, cfg.model.vocab_size);
    data::InstanceSampler sampler(dataset, cfg.data.seed);
    data::Loader loader(dataset, sampler, {cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, 1, 0}, 0,
                        cfg.data.document_masking ? std::max<int64_t>(cfg.data.eos_id, 0) : -1, cfg.data.prefetch, false,
                        cfg.data.instance_filter);
    loader.next();  // the first batch includes start-up
    int64_t tokens = 0, filtered = 0;
    const auto start = std::chrono::steady_clock::now();
    double elapsed = 0;
    while (elapsed < seconds) {
      const data::MicroBatch mb = loader.next();
      tokens += (mb.counted + mb.filtered) * cfg.data.seq_len, filtered += mb.filtered;
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    std::cout << "loader: " << static_cast<int64_t>(tokens / elapsed) << " tokens/s (" << tokens << " tokens in " << elapsed
              << " s, micro batch " << cfg.trainer.micro_batch_size << " x " << cfg.data.seq_len << ", one reading thread"
              << (cfg.data.instance_filter.enabled ? ", instance filter: " + std::to_string(filtered) + " left out" : "") << ")\n";
    return 0;
  });
}
