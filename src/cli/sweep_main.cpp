// hybrid-sweep: expand a sweep file over a base config into named runs, then run them one
// after another with hybrid-train (finished runs are skipped, interrupted ones resume; SIGTERM or
// SIGUSR1 stops the run in progress with a checkpoint and the sweep with it), or write a Slurm
// array script; finally a summary table (CSV and Markdown) of the results.
#include <nlohmann/json.hpp>

#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>

#include "hybrid/cli/common.h"
#include "hybrid/config/load.h"
#include "hybrid/config/sweep.h"
#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"
#include "hybrid/util/stop_signals.h"

namespace fs = std::filesystem;
using namespace hybrid;

namespace {

// SIGTERM and SIGUSR1 (a stop request: hybrid/util/stop_signals.h) go on to the run in progress,
// which stops with a checkpoint, and no later run starts: the same command continues the sweep.
volatile std::sig_atomic_t stop_signal = 0, running = 0;  // running: the run's pid, or 0
extern "C" void pass_on(int signal) {
  if (!stop_signal) stop_signal = signal;
  if (running > 0) ::kill(running, signal);
}

int run_process(const std::vector<std::string>& argv) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t sweep = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // the sweep killed outright: the run stops with a checkpoint
    if (::getppid() != sweep) ::_exit(1);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  running = pid;
  if (stop_signal) ::kill(pid, stop_signal);  // one that came before `running` was set
  int status = 0;
  ::waitpid(pid, &status, 0);
  running = 0;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string self_dir() { return fs::read_symlink("/proc/self/exe").parent_path().string(); }

// Each run's FINISHED.json (absent or unreadable: an empty object) and its status.
std::pair<nlohmann::json, std::string> finished(const fs::path& run_dir) {
  const fs::path done = run_dir / "FINISHED.json";
  if (!fs::exists(done)) return {nlohmann::json::object(), "not finished"};
  std::ifstream in(done);
  try {
    return {nlohmann::json::parse(in), "finished"};
  } catch (const nlohmann::json::exception&) {
    return {nlohmann::json::object(), "unreadable FINISHED.json"};
  }
}

// One row a run; tasks' columns (acc and acc_norm) for every task any finished run scored.
void write_summary(const Sweep& sweep, const fs::path& root) {
  std::vector<std::pair<nlohmann::json, std::string>> results;
  std::set<std::string> tasks;
  for (const auto& run : sweep.runs) {
    results.push_back(finished(root / run.name));
    if (results.back().first.contains("tasks"))
      for (const auto& [task, scores] : results.back().first["tasks"].items()) tasks.insert(task);
  }
  std::string csv = "run,step,tokens,train_loss_ema,val_loss,tokens_per_s";
  std::string md = "| run | steps | train loss (EMA) | val loss | tokens/s |", rule = "|---|---|---|---|---|";
  for (const auto& task : tasks) csv += "," + task + "_acc," + task + "_acc_norm", md += " " + task + " acc / acc_norm |", rule += "---|";
  csv += ",status\n";
  md += " status |\n" + rule + "---|\n";
  auto text = [](const nlohmann::json& v) {
    if (!v.is_number()) return std::string();
    std::ostringstream s;
    s << v.get<double>();
    return s.str();
  };
  for (size_t r = 0; r < sweep.runs.size(); ++r) {
    const auto& [j, status] = results[r];
    auto num = [&](const char* k) { return j.contains(k) ? text(j[k]) : std::string(); };
    csv += sweep.runs[r].name + "," + num("step") + "," + num("tokens") + "," + num("train_loss_ema") + "," + num("val_loss") + "," +
           num("tokens_per_s");
    md += "| " + sweep.runs[r].name + " | " + num("step") + " | " + num("train_loss_ema") + " | " + num("val_loss") + " | " +
          num("tokens_per_s") + " |";
    for (const auto& task : tasks) {
      const nlohmann::json scores = j.contains("tasks") && j["tasks"].contains(task) ? j["tasks"][task] : nlohmann::json::object();
      const std::string acc = text(scores.value("acc", nlohmann::json())), norm = text(scores.value("acc_norm", nlohmann::json()));
      csv += "," + acc + "," + norm;
      md += acc.empty() ? " |" : " " + acc + " / " + norm + " |";
    }
    csv += "," + status + "\n";
    md += " " + status + " |\n";
  }
  io::write_file_atomic((root / "summary.csv").string(), csv);
  io::write_file_atomic((root / "summary.md").string(), md);
  std::cout << md;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"hybrid-sweep: run a grid of hybrid-train configs and tabulate the results"};
  std::string config_path, sweep_path, root, slurm;
  bool plan_only = false;
  app.add_option("-c,--config", config_path, "base config")->required();
  app.add_option("--sweep", sweep_path, "sweep file (grid, zip, set)")->required();
  app.add_option("--run-root", root, "folder of the runs (default runs/<sweep name>)");
  app.add_option("--slurm", slurm, "write a Slurm array script here instead of running");
  app.add_flag("--plan", plan_only, "print the runs and their overrides, run nothing");
  if (auto code = cli::parse(app, argc, argv)) return *code;
  return cli::run_reporting_errors([&] {
    Sweep sweep = expand_sweep(sweep_path);
    const fs::path run_root = root.empty() ? fs::path("runs") / sweep.name : fs::path(root);
    // Every run's config is resolved (and so validated) before anything runs.
    std::vector<std::string> configs;
    for (const auto& run : sweep.runs) {
      std::vector<std::string> sets = run.overrides;
      sets.push_back("name=" + run.name);
      configs.push_back(config_to_yaml(load_config(config_path, sets).config));
    }
    if (plan_only) {
      for (const auto& run : sweep.runs) {
        std::cout << run.name << ":";
        for (const auto& o : run.overrides) std::cout << " --set " << o;
        std::cout << "\n";
      }
      return 0;
    }
    fs::create_directories(run_root / "configs");
    for (size_t i = 0; i < sweep.runs.size(); ++i)
      io::write_file_atomic((run_root / "configs" / (sweep.runs[i].name + ".yaml")).string(), configs[i]);
    const std::string train = self_dir() + "/hybrid-train";
    if (!slurm.empty()) {
      // --signal: SIGUSR1 to the batch shell, which is hybrid-train (exec), two minutes before the
      // time limit: the run stops with a checkpoint before SIGTERM and SIGKILL come.
      std::string script = "#!/bin/bash\n#SBATCH --job-name=" + sweep.name + "\n#SBATCH --array=0-" +
                           std::to_string(sweep.runs.size() - 1) +
                           "\n#SBATCH --gpus-per-task=1\n#SBATCH --signal=B:USR1@120\n\nRUNS=(";
      for (const auto& run : sweep.runs) script += " " + run.name;
      script += " )\nRUN=${RUNS[$SLURM_ARRAY_TASK_ID]}\nexec " + fs::absolute(train).string() + " --config " +
                fs::absolute(run_root / "configs").string() + "/$RUN.yaml --run-dir " + fs::absolute(run_root).string() + "/$RUN\n";
      io::write_file_atomic(slurm, script);
      std::cout << "wrote " << slurm << " (" << sweep.runs.size() << " array tasks); submit with: sbatch " << slurm << "\n";
      return 0;
    }
    int failures = 0;
    util::handle_stop_signals(pass_on);  // the wait for the run goes on (SA_RESTART)
    for (size_t i = 0; i < sweep.runs.size() && !stop_signal; ++i) {
      const auto& run = sweep.runs[i];
      if (fs::exists(run_root / run.name / "FINISHED.json")) {
        std::cout << "[" << i + 1 << "/" << sweep.runs.size() << "] " << run.name << ": finished already, skipped\n";
        continue;
      }
      std::cout << "[" << i + 1 << "/" << sweep.runs.size() << "] " << run.name << std::endl;
      int rc = run_process({train, "--config", (run_root / "configs" / (run.name + ".yaml")).string(), "--run-dir",
                            (run_root / run.name).string()});
      if (stop_signal) {
        std::cout << util::signal_name(stop_signal) << ": stopped during " << run.name
                  << "; the same command continues the sweep" << std::endl;
      } else if (rc != 0) {
        std::cerr << "run " << run.name << " failed (exit " << rc << "); continuing with the next\n";
        ++failures;
      }
    }
    write_summary(sweep, run_root);
    return failures ? 1 : 0;
  });
}
