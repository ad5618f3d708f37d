// hybrid-convert: HF `olmo_hybrid` directories <-> our model directories (config.yaml +
// model.safetensors). Tensors keep their bytes and dtype; only HF's on-disk names and the
// split q/k/v conv weights are mapped (hf_names.h). And `average`: the element-wise mean of
// several models' weights (model souping, as OLMo 2 averages its annealing runs' final weights).
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
#include "hybrid/train/checkpoint.h"
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

// The text of `token`'s id in a tokenizer.json: an added token's, or the model's vocabulary's ("" if none).
std::string token_text(const nlohmann::json& tok, int64_t id) {
  if (tok.contains("added_tokens") && tok["added_tokens"].is_array())
    for (const auto& t : tok["added_tokens"])
      if (t.value("id", int64_t{-1}) == id && t.contains("content") && t["content"].is_string()) return t["content"];
  if (tok.contains("model") && tok["model"].contains("vocab") && tok["model"]["vocab"].is_object())
    for (const auto& [text, v] : tok["model"]["vocab"].items())
      if (v.is_number_integer() && v.get<int64_t>() == id) return text;
  return "";
}

// The tokenizer files to put beside the weights, so that transformers' AutoTokenizer (and lm-eval
// on the export) load it, by name: `from` is a tokenizer.json, or a folder with one (its
// tokenizer_config.json and special_tokens_map.json come along); without a tokenizer_config.json
// one is made naming the EOS token (the config's data.eos_id, else <|endoftext|> where the
// tokenizer has it). Read and checked before anything is written.
std::vector<std::pair<std::string, std::string>> tokenizer_files(const fs::path& from, const Config& cfg) {
  const bool folder = fs::is_directory(from);
  const fs::path file = folder ? from / "tokenizer.json" : from;
  if (!fs::exists(file)) throw Error("--tokenizer " + from.string() + ": no " + file.string());
  std::vector<std::pair<std::string, std::string>> files = {{"tokenizer.json", util::read_text_file(file.string())}};
  nlohmann::json tok;
  try {
    tok = nlohmann::json::parse(files[0].second);
  } catch (const nlohmann::json::exception& e) {
    throw Error(file.string() + ": not valid JSON: " + e.what());
  }
  if (!tok.is_object() || !tok.contains("model")) throw Error(file.string() + ": not a tokenizers tokenizer.json (no \"model\")");
  for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"})
    if (folder && fs::exists(from / name)) files.emplace_back(name, util::read_text_file((from / name).string()));
  if (files.size() > 1 && files[1].first == "tokenizer_config.json") return files;
  std::string eos;
  if (cfg.data.eos_id >= 0) eos = token_text(tok, cfg.data.eos_id);
  else if (tok.contains("added_tokens") && tok["added_tokens"].is_array())
    for (const auto& t : tok["added_tokens"])
      if (t.value("content", std::string()) == "<|endoftext|>") eos = "<|endoftext|>";
  nlohmann::json config = {{"tokenizer_class", "PreTrainedTokenizerFast"}, {"model_max_length", cfg.model.max_seq_len},
                           {"clean_up_tokenization_spaces", false}};
  if (!eos.empty()) config["eos_token"] = eos;
  files.emplace_back("tokenizer_config.json", config.dump(2) + "\n");
  return files;
}

void ours_to_hf(const fs::path& in, const fs::path& out, const std::string& tokenizer) {
  Config cfg = load_config((in / "config.yaml").string()).config;
  std::vector<std::pair<std::string, std::string>> tokenizer_out;
  if (!tokenizer.empty()) tokenizer_out = tokenizer_files(tokenizer, cfg);
  const std::string json = io::to_hf_config_json(cfg.model, cfg.data.eos_id);
  io::TensorFile weights = io::read_safetensors((in / "model.safetensors").string());
  HybridLM check(cfg.model);
  load_model_weights(check, weights, (in / "model.safetensors").string());
  fs::create_directories(out);
  io::write_safetensors((out / "model.safetensors").string(), io::ours_to_hf_disk(weights.tensors, cfg.model),
                        {{"format", "pt"}});
  io::write_file_atomic((out / "config.json").string(), json);
  for (const auto& [name, text] : tokenizer_out) io::write_file_atomic((out / name).string(), text);
  std::cout << "wrote " << out.string() << " (" << weights.tensors.size() << " tensors" << (tokenizer.empty() ? "" : ", tokenizer")
            << ")\n";
}

// Each weight's mean over the inputs, summed in float64 and stored in the first input's dtype;
// every input must hold the first one's architecture and tensors (names, shapes, dtypes).
void average(const std::vector<fs::path>& inputs, const fs::path& out) {
  std::vector<io::TensorFile> files;
  Config cfg;
  for (const fs::path& dir : inputs) {
    train::ModelFiles model = train::read_model_files(dir.string());
    if (files.empty()) cfg = model.config;
    else if (train::model_hash(model.config.model) != train::model_hash(cfg.model))
      throw Error(dir.string() + ": another architecture than " + inputs[0].string() + "'s (config.yaml's model section)");
    if (!files.empty() && model.weights.tensors.size() != files[0].tensors.size())
      throw Error(dir.string() + ": " + std::to_string(model.weights.tensors.size()) + " tensors, " + inputs[0].string() +
                  " has " + std::to_string(files[0].tensors.size()));
    files.push_back(std::move(model.weights));
  }
  io::NamedTensors mean;
  for (const auto& [name, first] : files[0].tensors) {
    at::Tensor sum = first.to(at::kDouble);
    for (size_t i = 1; i < files.size(); ++i) {
      const at::Tensor* t = files[i].find(name);
      if (!t) throw Error(inputs[i].string() + ": no tensor '" + name + "'");
      if (t->sizes() != first.sizes() || t->scalar_type() != first.scalar_type())
        throw Error(inputs[i].string() + ": tensor '" + name + "' is " + c10::str(t->scalar_type(), t->sizes()) + ", " +
                    inputs[0].string() + "'s " + c10::str(first.scalar_type(), first.sizes()));
      sum += t->to(at::kDouble);
    }
    mean.emplace_back(name, (sum / static_cast<double>(files.size())).to(first.scalar_type()));
  }
  HybridLM check(cfg.model);
  load_model_weights(check, io::TensorFile{mean, {}}, inputs[0].string());
  fs::create_directories(out);
  io::write_safetensors((out / "model.safetensors").string(), mean, {{"format", "pt"}});
  io::write_file_atomic((out / "config.yaml").string(), config_to_yaml(cfg));
  std::cout << "wrote " << out.string() << " (" << mean.size() << " tensors, the mean of " << files.size() << " models)\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"hybrid-convert: between HF olmo_hybrid directories and hybrid-train model directories, or the mean of models"};
  std::string direction, tokenizer;
  std::vector<std::string> paths;
  app.add_option("direction", direction, "hf-to-ours | ours-to-hf | average")
      ->required()
      ->check(CLI::IsMember({"hf-to-ours", "ours-to-hf", "average"}));
  app.add_option("paths", paths, "INPUT OUTPUT; for average: two or more checkpoints, run folders (their latest) or model folders, then OUTPUT")
      ->required();
  app.add_option("--tokenizer", tokenizer,
                 "ours-to-hf: a tokenizer.json, or a folder of HF tokenizer files, to put beside the weights");
  if (auto code = cli::parse(app, argc, argv)) return *code;
  return cli::run_reporting_errors([&] {
    if (direction != "ours-to-hf" && !tokenizer.empty()) throw ConfigError("--tokenizer: only for ours-to-hf");
    if (direction == "average") {
      if (paths.size() < 3) throw ConfigError("average: two or more model directories, then the output directory");
      average(std::vector<fs::path>(paths.begin(), paths.end() - 1), paths.back());
      return 0;
    }
    if (paths.size() != 2) throw ConfigError(direction + ": an input directory and an output directory");
    if (direction == "hf-to-ours")
      hf_to_ours(paths[0], paths[1]);
    else
      ours_to_hf(paths[0], paths[1], tokenizer);
    return 0;
  });
}
