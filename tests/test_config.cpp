// The config system: YAML -> typed Config with base: inheritance, --set overrides, and one
// clear error (file, line, key) for each kind of bad input.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "hybrid/cli/common.h"
#include "hybrid/config/load.h"
#include "hybrid/config/sweep.h"
#include "hybrid/error.h"
#include "hybrid/util/progress.h"
#include "temp_dir.h"

namespace fs = std::filesystem;
using hybrid::ConfigError;
using hybrid::load_config;

namespace {

class ConfigTest : public TempDirTest {
 protected:
  // The message load_config throws, or "" when it succeeds.
  std::string error_of(const std::string& path, const std::vector<std::string>& sets = {}) {
    return error_from([&] { load_config(path, sets); });
  }
};

TEST_F(ConfigTest, ReadsTypedValuesAndKeepsDefaults) {
  auto p = write("a.yaml", "model:\n  d_model: 256\n  attention: {n_heads: 8, n_kv_heads: 2}\noptimizer:\n  lr: 1e-3\n  betas: [0.8, 0.9]\n");
  auto loaded = load_config(p);
  EXPECT_EQ(loaded.config.model.d_model, 256);
  EXPECT_EQ(loaded.config.model.attention.n_kv_heads, 2);
  EXPECT_DOUBLE_EQ(loaded.config.optimizer.lr, 1e-3);
  EXPECT_EQ(loaded.config.optimizer.betas, (std::vector<double>{0.8, 0.9}));
  EXPECT_EQ(loaded.config.model.attention_head_dim(), 32);
  EXPECT_EQ(loaded.config.trainer.micro_batch_size, hybrid::TrainerConfig{}.micro_batch_size);
  EXPECT_EQ(loaded.origins.at("model.d_model"), p + ":2:12");
}

TEST_F(ConfigTest, BatchSizeWarmupGivesEachStepItsBatch) {
  auto p = write("w.yaml", "trainer:\n  global_batch_size: 32\n  micro_batch_size: 4\n  batch_size_warmup:\n"
                           "    - {until_step: 3, global_batch_size: 8}\n    - {until_step: 5, global_batch_size: 16}\n");
  const hybrid::TrainerConfig t = load_config(p).config.trainer;
  std::vector<int64_t> batches;
  for (int64_t step = 0; step < 7; ++step) batches.push_back(t.global_batch_at(step));
  EXPECT_EQ(batches, (std::vector<int64_t>{8, 8, 8, 16, 16, 32, 32}));
  for (int64_t from = 0; from <= 7; ++from)
    for (int64_t to = from; to <= 7; ++to) {
      int64_t sum = 0;
      for (int64_t step = from; step < to; ++step) sum += t.global_batch_at(step);
      EXPECT_EQ(t.instances_between(from, to), sum) << from << ".." << to;
    }
  EXPECT_EQ(error_of(p, {"trainer.batch_size_warmup[1].until_step=2"}),
            "--set trainer.batch_size_warmup[1].until_step=2: trainer.batch_size_warmup[1].until_step: must be after the "
            "phase before's (3)");
}

TEST_F(ConfigTest, BaseInheritanceMergesDeeplyAndChildWins) {
  write("base.yaml", "name: base\nmodel:\n  d_model: 256\n  n_layers: 8\n  gdn: {head_k_dim: 32, head_v_dim: 64}\n");
  write("mid.yaml", "base: base.yaml\nmodel:\n  n_layers: 12\n");
  auto p = write("child.yaml", "base: mid.yaml\nname: child\nmodel:\n  gdn: {head_v_dim: 128}\n");
  auto c = load_config(p).config;
  EXPECT_EQ(c.name, "child");
  EXPECT_EQ(c.model.d_model, 256);
  EXPECT_EQ(c.model.n_layers, 12);
  EXPECT_EQ(c.model.gdn.head_k_dim, 32);
  EXPECT_EQ(c.model.gdn.head_v_dim, 128);
}

TEST_F(ConfigTest, BaseCycleIsAnError) {
  write("x.yaml", "base: y.yaml\n");
  auto p = write("y.yaml", "base: x.yaml\n");
  EXPECT_NE(error_of(p).find("cycle"), std::string::npos) << error_of(p);
}

TEST_F(ConfigTest, SetOverridesScalarsListsAndSections) {
  auto p = write("a.yaml", "model: {d_model: 128}\n");
  auto c = load_config(p, {"model.d_model=512", "optimizer.betas=[0.9, 0.99]", "model.layer_pattern=GA",
                           "data.sources=[{paths: [a.npy, b.npy], weight: 2}]", "trainer={max_steps: 7}"})
               .config;
  EXPECT_EQ(c.model.d_model, 512);
  EXPECT_EQ(c.optimizer.betas[1], 0.99);
  EXPECT_EQ(c.model.layer_types(), "GAGA");
  ASSERT_EQ(c.data.sources.size(), 1u);
  EXPECT_EQ(c.data.sources[0].paths[1], "b.npy");
  EXPECT_EQ(c.data.sources[0].weight, 2.0);
  EXPECT_EQ(c.trainer.max_steps, 7);
  EXPECT_EQ(c.trainer.micro_batch_size, hybrid::TrainerConfig{}.micro_batch_size);
}

TEST_F(ConfigTest, SetReachesIntoListsByIndex) {
  auto p = write("a.yaml", "data:\n  sources: [{paths: [a.npy]}, {paths: [b.npy]}]\n"
                           "  validation: [{name: x, paths: [x.npy]}, {name: y, paths: [y.npy]}]\n");
  auto c = load_config(p, {"data.sources[1].weight=3", "data.validation.1.paths=[z.npy]", "data.validation[0]={name: w}"})
               .config;
  EXPECT_EQ(c.data.sources[1].weight, 3.0);
  EXPECT_EQ(c.data.sources[0].weight, 1.0);
  EXPECT_EQ(c.data.validation[1].paths, std::vector<std::string>{"z.npy"});
  EXPECT_EQ(c.data.validation[0].name, "w");  // a map merges into the item
  EXPECT_EQ(c.data.validation[0].paths, std::vector<std::string>{"x.npy"});
  // One map where a list goes is item 0, as the loader reads it.
  auto one = write("one.yaml", "data:\n  validation: {paths: [v.npy]}\n");
  EXPECT_EQ(load_config(one, {"data.validation[0].paths=[u.npy]"}).config.data.validation[0].paths,
            std::vector<std::string>{"u.npy"});
  EXPECT_NE(error_of(p, {"data.validation.paths=[z.npy]"}).find("'data.validation' is a list: name an item by its index, e.g. data.validation[0].paths"),
            std::string::npos)
      << error_of(p, {"data.validation.paths=[z.npy]"});
  EXPECT_NE(error_of(p, {"data.sources[2].weight=1"}).find("--set data.sources[2].weight=1: 'data.sources' has 2 items"),
            std::string::npos);
  EXPECT_NE(error_of(one, {"data.validation[1].paths=[x]"}).find("'data.validation' has 1 item (indices from 0)"),
            std::string::npos);
  EXPECT_NE(error_of(p, {"data.sources[0].paths[0][1]=x"}).find("'data.sources[0].paths[0]' is not a list"), std::string::npos);
  EXPECT_NE(error_of(p, {"data.tasks[0].limit=5"}).find("'data.tasks' is not in the config files: set the whole list (data.tasks=[...])"),
            std::string::npos);
  EXPECT_NE(error_of(p, {"data.sources[x].weight=1"}).find("expected key or key[N]"), std::string::npos);
  EXPECT_NE(error_of(p, {"data..seq_len=1"}).find("empty key"), std::string::npos);
}

TEST_F(ConfigTest, UnknownKeySuggestsTheNearestName) {
  auto p = write("a.yaml", "model:\n  d_modle: 256\n");
  auto e = error_of(p);
  EXPECT_NE(e.find(p + ":2:12"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown key 'model.d_modle'"), std::string::npos) << e;
  EXPECT_NE(e.find("did you mean 'd_model'"), std::string::npos) << e;
  EXPECT_NE(error_of(p = write("b.yaml", "{}"), {"optimzer.lr=1"}).find("did you mean 'optimizer'"), std::string::npos);
  EXPECT_NE(error_of(p, {"optimizer.lr"}).find("expected key.path=value"), std::string::npos);
}

TEST_F(ConfigTest, WrongTypesNameKeyAndValue) {
  auto e = error_of(write("a.yaml", "model:\n  n_layers: four\n"));
  EXPECT_NE(e.find(":2:13: model.n_layers: expected an integer, got 'four'"), std::string::npos) << e;
  e = error_of(write("b.yaml", "trainer:\n  activation_checkpointing: 1\n"));
  EXPECT_NE(e.find("expected true or false"), std::string::npos) << e;
  e = error_of(write("c.yaml", "optimizer:\n  betas: 0.9\n"));
  EXPECT_NE(e.find("optimizer.betas: expected a list"), std::string::npos) << e;
  e = error_of(write("d.yaml", "model: 3\n"));
  EXPECT_NE(e.find("model: expected a map of keys"), std::string::npos) << e;
  e = error_of(write("e.yaml", "model:\n  attention: {qk_norm: sideways}\n"));
  EXPECT_NE(e.find("'sideways' is not one of full, per_head, none"), std::string::npos) << e;
  e = error_of(write("f.yaml", "optimizer: {lr: 1e999}\n"));
  EXPECT_NE(e.find("optimizer.lr: expected a number"), std::string::npos) << e;
}

TEST_F(ConfigTest, YamlSyntaxErrorsGiveLineAndColumn) {
  auto p = write("a.yaml", "model:\n  d_model: 128\n   n_layers: [1, 2\n");
  auto e = error_of(p);
  EXPECT_NE(e.find(p + ":3:"), std::string::npos) << e;
  EXPECT_NE(e.find("YAML syntax error"), std::string::npos) << e;
  EXPECT_NE(error_of(write("b.yaml", "a: 1\na: 2\n")).find("appears twice"), std::string::npos);
  EXPECT_NE(error_of((dir_ / "missing.yaml").string()).find("cannot open config file"), std::string::npos);
}

TEST_F(ConfigTest, ImpossibleValuesAreRejectedWithTheirOrigin) {
  struct Case { std::string yaml, expected; };
  const std::vector<Case> cases = {
      {"model: {d_model: 100, attention: {n_heads: 8}}", "8 heads do not divide d_model 100"},
      {"model: {attention: {n_heads: 4, n_kv_heads: 3}}", "3 KV heads do not divide n_heads 4"},
      {"model: {layer_pattern: GGXA}", "may hold only the letters G"},
      {"model: {n_layers: 2, layers: [G, A, A]}", "lists 3 layers but model.n_layers is 2"},
      {"model: {gdn: {n_k_heads: 4, n_v_heads: 6}}", "must be a multiple of n_k_heads"},
      {"optimizer: {lr: -0.001}", "optimizer.lr: must be positive"},
      {"optimizer: {betas: [0.9]}", "expected two values in [0, 1)"},
      {"trainer: {global_batch_size: 10, micro_batch_size: 4}", "is not a multiple of trainer.micro_batch_size"},
      {"schedule: {type: wsd, decay_steps: 0}", "wsd needs a positive decay phase"},
      {"data: {sources: [{paths: [a], weight: 0}]}", "mixture weights must be positive"},
      {"data: {seq_len: 4096}\nmodel: {max_seq_len: 2048}", "exceeds model.max_seq_len"},
      {"distributed: {zero_stage: 3}", "must be 0, 1 or 2"},
      {"trainer: {activation_checkpointing: true, checkpointed_layers: 5}\nmodel: {n_layers: 4}",
       "trainer.checkpointed_layers: must be -1 (all blocks) or a count up to model.n_layers 4"},
      {"trainer: {checkpointed_layers: 2}", "needs trainer.activation_checkpointing: true"},
      {"data: {validation: [{name: a, paths: [x]}, {paths: [y]}]}", "data.validation[1]: needs a name"},
      {"data: {validation: [{name: a, paths: [x]}, {name: a, paths: [y]}]}", "data.validation[1].name: 'a' twice"},
      {"data: {validation: {name: 'a b', paths: [x]}}", "data.validation[0].name: 'a b' has a space"},
      {"data: {tasks: [{path: t.jsonl}]}", "data.tasks[0]: needs a name"},
      {"data: {tasks: [{name: t}]}", "data.tasks[0]: needs a path"},
      {"data: {tasks: [{name: t, path: t.jsonl, limit: -1}]}", "data.tasks[0].limit: must not be negative"},
      {"data: {instance_filter: {min_period: 5, max_period: 3}}", "data.instance_filter.min_period: must lie in [1, "},
      {"data: {instance_filter: {max_count: 1}}", "data.instance_filter.max_count: must be at least 2"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    auto p = write("case" + std::to_string(i) + ".yaml", cases[i].yaml + "\n");
    auto e = error_of(p);
    EXPECT_NE(e.find(cases[i].expected), std::string::npos) << cases[i].yaml << " -> " << e;
    EXPECT_NE(e.find(p + ":1:"), std::string::npos) << "origin missing: " << e;
  }
  // A value from --set names the override as its origin.
  auto e = error_of(write("ok.yaml", "{}\n"), {"optimizer.lr=-1"});
  EXPECT_NE(e.find("--set optimizer.lr=-1: optimizer.lr: must be positive"), std::string::npos) << e;
}

TEST_F(ConfigTest, OneMapWhereAListOfMapsGoesIsAListOfOne) {
  auto one = load_config(write("one.yaml", "data:\n  validation: {paths: [v.npy]}\n"));
  ASSERT_EQ(one.config.data.validation.size(), 1u);
  EXPECT_EQ(one.config.data.validation[0].paths, std::vector<std::string>{"v.npy"});
  EXPECT_EQ(one.origins.at("data.validation[0].paths"), path("one.yaml") + ":2:23");
  auto two = load_config(write("two.yaml", "data:\n  validation: [{name: a, paths: [a.npy]}, {name: b, paths: [b.npy]}]\n"));
  ASSERT_EQ(two.config.data.validation.size(), 2u);
  EXPECT_EQ(two.config.data.validation[1].name, "b");
  EXPECT_NE(error_of(write("scalar.yaml", "data: {validation: v.npy}\n")).find("data.validation: expected a list, got 'v.npy'"),
            std::string::npos);
}

TEST_F(ConfigTest, ResolvedYamlReadsBackToTheSameConfig) {
  auto p = write("a.yaml", "name: x\nmodel: {d_model: 96, attention: {n_heads: 3, n_kv_heads: 1}}\n"
                           "data: {sources: [{paths: ['a b.npy'], weight: 0.25}]}\noptimizer: {lr: 0.1}\n");
  auto first = hybrid::config_to_yaml(load_config(p).config);
  auto again = hybrid::config_to_yaml(load_config(write("b.yaml", first)).config);
  EXPECT_EQ(first, again);
  EXPECT_NE(first.find("lr: 0.1"), std::string::npos) << first;
}

TEST(ShippedConfigs, AllLoad) {
  for (const auto& entry : fs::recursive_directory_iterator(fs::path(HYBRID_SOURCE_DIR) / "configs")) {
    if (entry.path().extension() != ".yaml" || entry.path().parent_path().filename() == "sweeps") continue;
    EXPECT_NO_THROW(load_config(entry.path().string())) << entry.path();
  }
}

}  // namespace

namespace {

TEST_F(ConfigTest, SweepExpandsGridZipAndSet) {
  auto p = write("s.yaml", "name: abl\ngrid:\n  model.layer_pattern: [G, GA]\n  optimizer.lr: [1e-3, 3e-3, 1e-2]\n"
                           "zip:\n  trainer.max_steps: [10, 20]\n  schedule.warmup_steps: [1, 2]\nset:\n  trainer.log_interval: 5\n");
  auto sweep = hybrid::expand_sweep(p);
  EXPECT_EQ(sweep.name, "abl");
  ASSERT_EQ(sweep.runs.size(), 12u);
  EXPECT_EQ(sweep.runs[0].name, "max_steps=10,warmup_steps=1,layer_pattern=G,lr=1e-3");
  EXPECT_EQ(sweep.runs[1].name, "max_steps=10,warmup_steps=1,layer_pattern=G,lr=3e-3");
  EXPECT_EQ(sweep.runs[11].name, "max_steps=20,warmup_steps=2,layer_pattern=GA,lr=1e-2");
  EXPECT_EQ(sweep.runs[0].overrides, (std::vector<std::string>{"trainer.log_interval=5", "trainer.max_steps=10",
                                                                "schedule.warmup_steps=1", "model.layer_pattern=G",
                                                                "optimizer.lr=1e-3"}));
  // Every run's overrides load on a base config.
  auto base = write("base.yaml", "{}\n");
  for (const auto& run : sweep.runs) EXPECT_NO_THROW(load_config(base, run.overrides)) << run.name;
  // A mixture's weights, an axis each, named by their list item.
  auto mix = hybrid::expand_sweep(write("mix.yaml", "zip:\n  data.sources[0].weight: [1, 3]\n  data.sources.1.weight: [3, 1]\n"));
  EXPECT_EQ(mix.runs[1].name, "sources0.weight=3,sources1.weight=1");
  auto two = write("two.yaml", "data: {sources: [{paths: [a.npy]}, {paths: [b.npy]}]}\n");
  EXPECT_EQ(load_config(two, mix.runs[1].overrides).config.data.sources[0].weight, 3.0);
}

TEST_F(ConfigTest, BadSweepsAreNamed) {
  auto e = [&](const std::string& text) {
    try {
      hybrid::expand_sweep(write("bad.yaml", text));
    } catch (const ConfigError& err) {
      return std::string(err.what());
    }
    return std::string();
  };
  EXPECT_NE(e("grid:\n  optimizer.lr: 1e-3\n").find("grid.optimizer.lr: expected a non-empty list"), std::string::npos);
  EXPECT_NE(e("zip:\n  a.b: [1, 2]\n  c.d: [1]\n").find("zip.c.d has 1 values, zip.a.b has 2"), std::string::npos);
  EXPECT_NE(e("grids: {}\n").find("unknown sweep key 'grids'"), std::string::npos);
}

// Long work's log lines: done, total, rate and what is left as hours, minutes, seconds; none
// before the interval, none from a process that does not speak.
TEST(Progress, LogsDoneRateAndEta) {
  EXPECT_EQ(hybrid::util::hours_minutes_seconds(3723.9), "1h02m03s");
  EXPECT_EQ(hybrid::util::hours_minutes_seconds(59), "0h00m59s");
  testing::internal::CaptureStderr();
  testing::internal::CaptureStdout();
  hybrid::util::Progress every_time("task t", 10, "rows", true, 0.0), rarely("task r", 10, "rows", true, 3600.0),
      quiet("task q", 10, "rows", false, 0.0);
  every_time.update(4), rarely.update(4), quiet.update(4);
  const std::string out = testing::internal::GetCapturedStderr() + testing::internal::GetCapturedStdout();
  EXPECT_NE(out.find("task t: 4/10 rows, "), std::string::npos) << out;
  EXPECT_NE(out.find("/s, ETA 0h00m"), std::string::npos) << out;
  EXPECT_EQ(out.find("task r"), std::string::npos) << out;
  EXPECT_EQ(out.find("task q"), std::string::npos) << out;
}

// --time-limit's durations: seconds alone, or numbers each with its unit (h, m, s).
TEST(CliDurations, SecondsOrNumbersWithUnits) {
  using hybrid::cli::duration_seconds;
  EXPECT_EQ(duration_seconds("5400"), 5400.0);
  EXPECT_EQ(duration_seconds("90m"), 5400.0);
  EXPECT_EQ(duration_seconds("1.5h"), 5400.0);
  EXPECT_EQ(duration_seconds("3h50m"), 13800.0);
  EXPECT_EQ(duration_seconds("1h30m15s"), 5415.0);
  for (const char* bad : {"", "0", "0m", "3h50", "h", "5x", "-5", "1..5m", "soon", "5 m"})
    EXPECT_FALSE(duration_seconds(bad).has_value()) << bad;
}

// Every executable's last word: one line, and after a CUDA out-of-memory error what to try.
TEST(CliErrors, OneLineAndAnOutOfMemoryHint) {
  auto run = [](const char* message, int& code) {
    testing::internal::CaptureStderr();
    code = hybrid::cli::run_reporting_errors([&]() -> int { throw std::runtime_error(message); });
    return testing::internal::GetCapturedStderr();
  };
  int code = 0;
  std::string err = run("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has a total capacity of 139 GiB", code);
  EXPECT_EQ(code, 1);
  EXPECT_EQ(err.rfind("error: CUDA out of memory. Tried to allocate 2.00 GiB.\nhint: hybrid-train --dry-run", 0), 0u) << err;
  EXPECT_EQ(err.find("total capacity"), std::string::npos) << err;
  err = run("data/x.bin: truncated at byte 12\nsecond line", code);
  EXPECT_EQ(err, "error: data/x.bin: truncated at byte 12\n");
}

}  // namespace
