// hybrid-train: parse the command line, resolve the config, then dry-run or train.
#include <iostream>

#include "hybrid/cli/common.h"
#include "hybrid/cli/dry_run.h"
#include "hybrid/config/load.h"
#include "hybrid/dist/launcher.h"
#include "hybrid/log.h"
#include "hybrid/train/trainer.h"

int main(int argc, char** argv) {
  CLI::App app{"hybrid-train: pretrain hybrid (Gated DeltaNet + attention) language models"};
  std::string config_path, run_dir, resume, load;
  std::vector<std::string> overrides;
  bool dry_run = false, print_config = false, load_optimizer = false;
  int64_t world_size = 1, stop_after = 0, nproc = 1, profile_steps = 0;
  double time_limit_s = 0;
  app.add_option("-c,--config", config_path, "YAML config file")->required();
  app.add_option("--set", overrides, "override a key, e.g. --set optimizer.lr=1e-3 (repeatable)")
      ->take_all()->allow_extra_args(false);
  app.add_option("--run-dir", run_dir, "directory for checkpoints, metrics and plots (default runs/<name>)");
  app.add_option("--resume", resume, "resume from 'latest' or a checkpoint directory (default: the run folder's latest)");
  auto* load_option = app.add_option("--load", load, "start from the weights of a checkpoint or model folder (fresh optimizer and schedule)")
                          ->excludes("--resume");
  app.add_flag("--load-optimizer", load_optimizer,
               "with --load: the optimizer state (AdamW's moments and step counts, Muon's momentum) from the checkpoint "
               "too (annealing or mid-training: fresh schedule and data)")
      ->needs(load_option);
  app.add_option("--stop-after", stop_after, "save and stop after this many steps (for time-limited jobs)")
      ->check(hybrid::cli::positive);
  app.add_option("--time-limit", time_limit_s,
                 "stop with a checkpoint while another step, its evaluation and a save (as long as the last ones "
                 "took) fit in this wall time from the start, e.g. 3h50m (time-limited jobs)")
      ->transform(hybrid::cli::duration);
  app.add_option("--profile-steps", profile_steps,
                 "write a trace (CPU ops, GPU kernels) of this many steps, after two of warm-up, to RUN_DIR/trace_rank<R>.json")
      ->check(hybrid::cli::positive);
  app.add_flag("--dry-run", dry_run, "print parameters, FLOPs per token and memory per GPU, then exit");
  app.add_option("--world-size", world_size, "GPUs assumed by --dry-run's memory estimate")->check(hybrid::cli::positive);
  app.add_option("--nproc-per-node", nproc, "start this many processes on this machine (one per GPU; Gloo on CPU)")
      ->check(hybrid::cli::positive);
  app.add_flag("--print-config", print_config, "print the resolved config as YAML and exit");
  if (auto code = hybrid::cli::parse(app, argc, argv)) return *code;
  return hybrid::cli::run_reporting_errors([&] {
    // Before any rank starts: a bad config stops here, once, not in every rank.
    hybrid::LoadedConfig loaded = hybrid::load_config(config_path, overrides);
    if (!dry_run && !print_config)
      if (auto code = hybrid::dist::relaunch_as_ranks(static_cast<int>(nproc), argc, argv)) return *code;
    const hybrid::Config& cfg = loaded.config;
    hybrid::log::set_level(cfg.logging.level);
    if (print_config) {
      std::cout << hybrid::config_to_yaml(cfg);
      return 0;
    }
    if (dry_run) {
      std::cout << hybrid::dry_run_report(cfg, world_size);
      return 0;
    }
    hybrid::train::train(loaded, {run_dir, resume, load, load_optimizer, stop_after, profile_steps, time_limit_s});
    return 0;
  });
}
