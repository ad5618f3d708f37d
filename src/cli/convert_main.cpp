// hybrid-convert: HF `olmo_hybrid` directories <-> our model directories (config.yaml +
// model.safetensors). Tensors keep their bytes and dtype; only HF's on-disk names and the
// split q/k/v conv weights are mapped (hf_names.h).
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "hybrid/cli/common.h"
#include "hybrid/config/load.h"
#include "hybrid/error.h"
#include "hybrid/io/hf_config.h"
#include "hybrid/io/hf_names.h"
#include "hybrid/io/mapped_file.h"
#include "hybrid/io/safetensors.h"
#include "hybrid/model/weights.h"
#include "hybrid/util/fs.h"

namespace fs = std::filesystem;
using namespace hybrid;

namespace {

// All tensors of an HF directory: model.safetensors, or the shards of its index.
io::TensorFile read_hf_weights(const fs::path& dir) {
  if (fs::exists(dir / "model.safetensors")) return io::read_safetensors((dir / "model.safetensors").string());
  const fs::path index = dir / "model.safetensors.index.json";
  if (!fs::exists(index)) throw Error(dir.string() + ": neither model.safetensors nor model.safetensors.index.json");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(util::read_text_file(index));
  } catch (const nlohmann::json::exception& e) {
    throw Error(index.string() + ": not valid JSON: " + e.what());
  }
  if (!j.contains("weight_map") || !j["weight_map"].is_object()) throw Error(index.string() + ": no weight_map");
  std::set<std::string> shards;
  for (auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos)
      throw Error(index.string() + ": weight_map entry for '" + name + "' is not a file name");
    shards.insert(file.get<std::string>());
  }
  io::TensorFile all;
  for (const auto& shard : shards) {
    auto part = io::read_safetensors((dir / shard).string());
    for (auto& t : part.tensors) all.tensors.push_back(std::move(t));
  }
  return all;
}

void hf_to_ours(const fs::path& in, const fs::path& out) {
  ModelConfig model = io::from_hf_config_json(util::read_text_file(in / "config.json"), (in / "config.json").string());
  Config cfg;
  cfg.name = in.filename().string().empty() ? "converted" : in.filename().string();
  cfg.model = model;
  cfg.data.seq_len = std::min<int64_t>(cfg.data.seq_len, model.max_seq_len);
  io::TensorFile weights;
  weights.tensors = io::hf_disk_to_ours(read_hf_weights(in).tensors);
  fs::create_directories(out);
  const fs::path config_path = out / "config.yaml";
  io::write_file_atomic(config_path.string(), config_to_yaml(cfg));
  LoadedConfig loaded = load_config(config_path.string());  // validates the converted config
  // Check names and shapes against the model this config builds before writing anything big.
  HybridLM check(loaded.config.model);
  load_model_weights(check, weights, in.string());
  io::write_safetensors((out / "model.safetensors").string(), weights.tensors, {{"format", "pt"}});
  std::cout << "wrote " << out.string() << " (" << weights.tensors.size() << " tensors)\n";
}

void ours_to_hf(const fs::path& in, const fs::path& out) {
  Config cfg = load_config((in / "config.yaml").string()).config;
  const std::string json = io::to_hf_config_json(cfg.model, cfg.data.eos_id);
  io::TensorFile weights = io::read_safetensors((in / "model.safetensors").string());
  HybridLM check(cfg.model);
  load_model_weights(check, weights, (in / "model.safetensors").string());
  fs::create_directories(out);
  io::write_safetensors((out / "model.safetensors").string(), io::ours_to_hf_disk(weights.tensors, cfg.model),
                        {{"format", "pt"}});
  io::write_file_atomic((out / "config.json").string(), json);
  std::cout << "wrote " << out.string() << " (" << weights.tensors.size() << " tensors)\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"hybrid-convert: between HF olmo_hybrid directories and hybrid-train model directories"};
  std::string direction, input, output;
  app.add_option("direction", direction, "hf-to-ours | ours-to-hf")->required()->check(CLI::IsMember({"hf-to-ours", "ours-to-hf"}));
  app.add_option("input", input, "input directory")->required();
  app.add_option("output", output, "output directory")->required();
  if (auto code = cli::parse(app, argc, argv)) return *code;
  return cli::run_reporting_errors([&] {
    if (direction == "hf-to-ours")
      hf_to_ours(input, output);
    else
      ours_to_hf(input, output);
    return 0;
  });
}
