#include "hybrid/train/checkpoint.h"

#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <set>

#include <nlohmann/json.hpp>

#include "hybrid/config/load.h"
#include "hybrid/error.h"
#include "hybrid/io/mapped_file.h"
#include "hybrid/log.h"
#include "hybrid/util/crc32.h"
#include "hybrid/util/fs.h"

namespace hybrid::train {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const char* kFiles[] = {"model.safetensors", "optim.safetensors", "trainer.json", "config.yaml"};

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step%07lld", static_cast<long long>(step));
  return buf;
}

uint32_t crc_of(const io::MappedFile& f) {
  return util::crc32_of(reinterpret_cast<const unsigned char*>(f.data()), f.size());
}

json state_to_json(const TrainerState& s) {
  return {{"step", s.step}, {"tokens", s.tokens}, {"world_size", s.world_size}, {"model_hash", s.model_hash},
          {"skipped_steps", s.skipped_steps},
          {"data", {{"instances_consumed", s.instances_consumed}, {"global_batch_size", s.global_batch_size}, {"seed", s.data_seed},
                    {"fingerprint", s.data_fingerprint}}},
          {"spike_window", {{"losses", s.recent_losses}, {"grad_norms", s.recent_grad_norms}}}};
}

TrainerState state_from_json(const std::string& text, const std::string& path) {
  try {
    json j = json::parse(text);
    TrainerState s;
    s.step = j.at("step");
    s.tokens = j.at("tokens");
    s.world_size = j.at("world_size");
    s.model_hash = j.at("model_hash");
    s.skipped_steps = j.at("skipped_steps");
    s.instances_consumed = j.at("data").at("instances_consumed");
    s.global_batch_size = j.at("data").value("global_batch_size", int64_t{0});
    s.data_seed = j.at("data").at("seed");
    s.data_fingerprint = j.at("data").at("fingerprint");
    s.recent_losses = j.at("spike_window").at("losses").get<std::vector<double>>();
    s.recent_grad_norms = j.at("spike_window").at("grad_norms").get<std::vector<double>>();
    return s;
  } catch (const json::exception& e) {
    throw Error(path + ": malformed trainer state: " + e.what());
  }
}

// A checkpoint folder from a path that may name it, its run folder or the checkpoints folder.
std::string resolve(const std::string& path) {
  fs::path p(path);
  if (fs::exists(p / "MANIFEST.json") || fs::exists(p / "trainer.json")) return p.string();
  for (fs::path dir : {p / "checkpoints", p}) {
    if (fs::exists(dir / "LATEST")) {
      std::string name = util::read_text_file(dir / "LATEST");
      name.erase(name.find_last_not_of(" \n") + 1);
      if (name.empty() || name.find('/') != std::string::npos) throw Error((dir / "LATEST").string() + ": malformed");
      return (dir / name).string();
    }
  }
  throw Error(path + ": no checkpoint here (no MANIFEST.json, no checkpoints/LATEST)");
}

// Owned host copies: the originals may live on a GPU, or change while the copy is written.
at::Tensor host_copy(const at::Tensor& t) {
  return t.is_cpu() ? t.detach().clone(at::MemoryFormat::Contiguous) : t.detach().cpu().contiguous();
}

// `rank`'s entries copied to host; the others' meta stand-ins as they are.
io::ShardedTensors host_copies(const io::ShardedTensors& file, int rank) {
  io::ShardedTensors out{{}, file.writer, file.metadata};
  out.entries.reserve(file.entries.size());
  for (size_t i = 0; i < file.entries.size(); ++i)
    out.entries.emplace_back(file.entries[i].first, file.writer[i] == rank ? host_copy(file.entries[i].second) : file.entries[i].second);
  return out;
}

// The key under which rank r sends rank 0 the CRC-32s of its shares of a save (or its error).
std::string note_key(int64_t step, int rank) { return "checkpoint/" + step_name(step) + "/rank" + std::to_string(rank); }

uint64_t bytes_of(const at::Tensor& t) { return static_cast<uint64_t>(t.numel()) * t.element_size(); }

std::string step_error(int64_t step, const std::string& what) {
  return "checkpoint at step " + std::to_string(step) + " not saved: " + what;
}

// "12.3 s" since start.
std::string seconds_since(std::chrono::steady_clock::time_point start) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return buf;
}

}  // namespace

ModelFiles read_model_files(const std::string& path) {
  const fs::path p(path);
  if (!fs::exists(p / "MANIFEST.json") && fs::exists(p / "model.safetensors")) {
    if (!fs::exists(p / "config.yaml")) throw Error(path + ": no config.yaml beside model.safetensors");
    return {path, load_config((p / "config.yaml").string()).config, io::read_safetensors((p / "model.safetensors").string())};
  }
  if (!fs::exists(p / "MANIFEST.json") && !fs::exists(p / "LATEST") && !fs::exists(p / "checkpoints" / "LATEST"))
    throw Error(path + ": neither a checkpoint, a run folder with one, nor a model folder (config.yaml + model.safetensors)");
  LoadedCheckpoint ckpt = load_checkpoint(path, false);
  Config cfg = load_config_text(ckpt.config_yaml, ckpt.dir + "/config.yaml").config;
  return {ckpt.dir, std::move(cfg), std::move(ckpt.model)};
}

std::string model_hash(const ModelConfig& model) {
  Config c;
  c.model = model;
  const std::string yaml = config_to_yaml(c);
  const auto start = yaml.find("model:"), end = yaml.find("\ndata:");
  const std::string section = yaml.substr(start, end - start);
  uLong crc = crc32(0L, reinterpret_cast<const Bytef*>(section.data()), static_cast<uInt>(section.size()));
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08lx", crc);
  return buf;
}

Checkpointer::Checkpointer(std::string run_dir, CheckpointConfig cfg, SaveGroup group)
    : dir_((fs::path(run_dir) / "checkpoints").string()), cfg_(cfg), group_(std::move(group)) {
  if (group_.world_size > 1 && (!group_.post || !group_.take)) throw Error("Checkpointer: several ranks need a way to send notes");
}

Checkpointer::~Checkpointer() {
  try {
    wait();
  } catch (const std::exception& e) {
    log::error(e.what());
  }
}

void Checkpointer::remove_partial_saves() const {
  if (!fs::exists(dir_)) return;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const std::string name = entry.path().filename().string();
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0) util::remove_tree(entry.path().string());
  }
}

// Every rank holds all the weights, so each writes a run of them (in file order) that evens out
// what the ranks write in all, their shares of the optimizer state counted.
Checkpointer::TensorFiles Checkpointer::spread(const io::NamedTensors& model, const io::ShardedTensors& optim) const {
  std::vector<uint64_t> load(group_.world_size, 0);
  uint64_t total = 0;
  for (size_t i = 0; i < optim.entries.size(); ++i) {
    if (optim.writer[i] < 0 || optim.writer[i] >= group_.world_size)
      throw Error("optimizer state '" + optim.entries[i].first + "': no rank " + std::to_string(optim.writer[i]) + " to write it");
    load[optim.writer[i]] += bytes_of(optim.entries[i].second);
    total += bytes_of(optim.entries[i].second);
  }
  for (const auto& [name, t] : model) total += bytes_of(t);
  const uint64_t even = (total + group_.world_size - 1) / group_.world_size;
  TensorFiles files{io::ShardedTensors{{}, {}, {{"format", "pt"}}}, optim};
  int r = 0;
  for (const auto& [name, t] : model) {
    while (r + 1 < group_.world_size && load[r] + bytes_of(t) / 2 > even) ++r;  // past half of it would not fit: the next rank's
    files[0].entries.emplace_back(name, t);
    files[0].writer.push_back(r);
    load[r] += bytes_of(t);
  }
  return files;
}

void Checkpointer::save(const TrainerState& state, const io::NamedTensors& model, const io::ShardedTensors& optim,
                        const std::string& config_yaml) {
  wait();
  write(state, spread(model, optim), config_yaml);
}

void Checkpointer::save_async(const TrainerState& state, const io::NamedTensors& model, const io::ShardedTensors& optim,
                              const std::string& config_yaml) {
  wait();
  const auto start = std::chrono::steady_clock::now();
  const TensorFiles files = spread(model, optim);
  auto copy = std::make_shared<TensorFiles>(TensorFiles{host_copies(files[0], group_.rank), host_copies(files[1], group_.rank)});
  if (group_.rank == 0)
    log::info("checkpoint step " + std::to_string(state.step) + " copied to host memory in " + seconds_since(start) +
              "; writing it in the background");
  writing_ = std::async(std::launch::async, [this, state, copy, config_yaml] { write(state, *copy, config_yaml); });
}

void Checkpointer::wait() {
  if (writing_.valid()) writing_.get();  // get() leaves it invalid, also when it rethrows
}

void Checkpointer::write(const TrainerState& state, const TensorFiles& files, const std::string& config_yaml) const {
  if (group_.rank != 0) return write_share(state.step, files);
  const auto start = std::chrono::steady_clock::now();
  const fs::path final_dir = fs::path(dir_) / step_name(state.step);
  const fs::path tmp = fs::path(dir_) / (step_name(state.step) + ".tmp");
  uint64_t bytes = 0;
  std::string shares;  // how long the other ranks' shares took, for the log
  try {
    // Not emptied first: other ranks may be writing their shares into it already (a folder left
    // by a killed save is removed when the next run starts).
    fs::create_directories(tmp);
    std::array<io::WrittenShare, 2> own;
    for (size_t f = 0; f < 2; ++f) own[f] = io::write_safetensors_share((tmp / kFiles[f]).string(), files[f], 0);
    io::write_file_atomic((tmp / kFiles[2]).string(), state_to_json(state).dump(2) + "\n");
    io::write_file_atomic((tmp / kFiles[3]).string(), config_yaml);
    const Joined joined = join_shares(state.step, files, own);
    shares = joined.summary;
    json manifest = {{"step", state.step}, {"files", json::object()}};
    for (size_t f = 0; f < 2; ++f) {  // the tensor files, from the ranks' CRC-32s
      manifest["files"][kFiles[f]] = {{"bytes", own[f].file_size}, {"crc32", joined.crcs[f]}};
      bytes += own[f].file_size;
    }
    for (size_t f = 2; f < 4; ++f) {  // rank 0's small files, read back
      io::MappedFile mapped((tmp / kFiles[f]).string());
      manifest["files"][kFiles[f]] = {{"bytes", mapped.size()}, {"crc32", crc_of(mapped)}};
      bytes += mapped.size();
    }
    // The optimizer file's header and entries one by one too, so that a rank that loads its share
    // checks what it reads alone.
    json& optim = manifest["files"][kFiles[1]];
    optim["header_bytes"] = own[1].header_size;
    optim["header_crc32"] = own[1].header_crc;
    optim["entry_crc32"] = json::object();
    for (const auto& [i, crc] : joined.optim_entries) optim["entry_crc32"][files[1].entries[i].first] = crc;
    io::write_file_atomic((tmp / "MANIFEST.json").string(), manifest.dump(2) + "\n");
    util::remove_tree(final_dir.string());
    fs::rename(tmp, final_dir);
    io::fsync_directory(dir_);
    io::write_file_atomic((fs::path(dir_) / "LATEST").string(), step_name(state.step) + "\n");
  } catch (const std::exception& e) {
    std::string previous;
    try {
      util::remove_tree(tmp.string());
      if (auto at = latest()) previous = "; the previous checkpoint " + *at + " is intact";
    } catch (const std::exception&) {  // the folder itself unusable: the first error says why
    }
    throw Error(step_error(state.step, e.what() + previous));
  }
  rotate(state.step);
  last_write_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  char done[96];
  std::snprintf(done, sizeof done, " (%.2f GB in %.1f s", static_cast<double>(bytes) / 1e9, last_write_s_.load());
  log::info("saved checkpoint step " + std::to_string(state.step) + done + shares + ")");
}

void Checkpointer::write_share(int64_t step, const TensorFiles& files) const {
  const auto writes = [&](const io::ShardedTensors& f) { return std::count(f.writer.begin(), f.writer.end(), group_.rank) > 0; };
  if (!writes(files[0]) && !writes(files[1])) return;
  const auto start = std::chrono::steady_clock::now();
  const fs::path tmp = fs::path(dir_) / (step_name(step) + ".tmp");
  const std::string key = note_key(step, group_.rank);
  try {
    fs::create_directories(tmp);
    json ranges = json::object(), optim_entries = json::array();
    for (size_t f = 0; f < 2; ++f) {
      const io::WrittenShare share = io::write_safetensors_share((tmp / kFiles[f]).string(), files[f], group_.rank);
      ranges[kFiles[f]] = json::array();
      for (const util::CrcRange& r : share.ranges) ranges[kFiles[f]].push_back({r.begin, r.end, r.crc});
      if (f == 1)
        for (const auto& [i, crc] : share.entry_crcs) optim_entries.push_back({i, crc});
    }
    last_write_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    group_.post(key, json{{"ranges", ranges}, {"optim_entries", optim_entries}, {"seconds", last_write_s_.load()}}.dump());
  } catch (const std::exception& e) {
    try {
      group_.post(key, json{{"error", e.what()}}.dump());
    } catch (const std::exception&) {  // rank 0 then stops waiting at its timeout
    }
    throw Error(step_error(step, e.what()));
  }
}

Checkpointer::Joined Checkpointer::join_shares(int64_t step, const TensorFiles& files,
                                               const std::array<io::WrittenShare, 2>& own) const {
  Joined joined;
  joined.optim_entries = own[1].entry_crcs;
  std::array<std::vector<util::CrcRange>, 2> ranges = {own[0].ranges, own[1].ranges};
  std::set<int> others;
  for (const io::ShardedTensors& f : files) others.insert(f.writer.begin(), f.writer.end());
  others.erase(0);
  const auto deadline = std::chrono::steady_clock::now() + group_.timeout;
  double slowest_s = -1;
  int slowest = 0;
  for (int rank : others) {
    const std::string who = "rank " + std::to_string(rank);
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    const std::optional<std::string> note = group_.take(note_key(step, rank), std::max(left, std::chrono::milliseconds(1)));
    if (!note)
      throw Error(who + "'s share of the checkpoint did not come within " + std::to_string(group_.timeout.count()) + " s");
    try {
      const json j = json::parse(*note);
      if (j.contains("error")) throw Error(who + ": " + j.at("error").get<std::string>());
      for (size_t f = 0; f < 2; ++f)
        for (const auto& r : j.at("ranges").at(kFiles[f]))
          ranges[f].push_back({r.at(0).get<uint64_t>(), r.at(1).get<uint64_t>(), r.at(2).get<uint32_t>()});
      for (const auto& e : j.at("optim_entries")) {
        const auto i = e.at(0).get<size_t>();
        if (i >= files[1].entries.size()) throw Error(who + "'s note names optimizer entry " + std::to_string(i) + ", past the file's");
        joined.optim_entries.emplace_back(i, e.at(1).get<uint32_t>());
      }
      if (j.at("seconds").get<double>() > slowest_s) slowest_s = j.at("seconds").get<double>(), slowest = rank;
    } catch (const json::exception& e) {
      throw Error(who + "'s note is malformed: " + e.what());
    }
  }
  if (!others.empty()) {
    char line[96];
    std::snprintf(line, sizeof line, "; the other ranks' shares: slowest %.1f s (rank %d)", slowest_s, slowest);
    joined.summary = line;
  }
  if (joined.optim_entries.size() != files[1].entries.size())
    throw Error(std::string(kFiles[1]) + ": " + std::to_string(joined.optim_entries.size()) + " entries' checksums for " +
                std::to_string(files[1].entries.size()) + " entries");
  for (size_t f = 0; f < 2; ++f) {
    try {
      joined.crcs[f] = util::crc32_join(std::move(ranges[f]), own[f].file_size);
    } catch (const Error& e) {
      throw Error(kFiles[f] + std::string(": ") + e.what());
    }
  }
  return joined;
}

std::optional<std::string> Checkpointer::latest() const {
  if (!fs::exists(fs::path(dir_) / "LATEST")) return std::nullopt;
  return resolve(dir_);
}

void Checkpointer::rotate(int64_t newest) const {
  std::vector<int64_t> steps;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const std::string name = entry.path().filename().string();
    if (name.size() == 11 && name.rfind("step", 0) == 0 && name.find_first_not_of("0123456789", 4) == std::string::npos)
      steps.push_back(std::stoll(name.substr(4)));
  }
  std::sort(steps.rbegin(), steps.rend());
  int64_t kept = 0;
  for (int64_t s : steps) {
    if (s > newest) continue;  // from a run this one branched off; not ours to delete
    const bool permanent = cfg_.permanent_interval > 0 && s % cfg_.permanent_interval == 0;
    if (kept++ < cfg_.keep_last || permanent) continue;
    util::remove_tree((fs::path(dir_) / step_name(s)).string());
  }
}

LoadedCheckpoint load_checkpoint(const std::string& path, bool with_optimizer, const std::function<bool(const std::string&)>& reads) {
  LoadedCheckpoint out;
  out.dir = resolve(path);
  const fs::path dir(out.dir);
  const fs::path manifest_path = dir / "MANIFEST.json";
  if (!fs::exists(manifest_path)) throw Error(out.dir + ": incomplete checkpoint (no MANIFEST.json)");
  json manifest;
  json entry_crcs;  // of the optimizer file's entries, where only those this process reads are checked
  try {
    manifest = json::parse(util::read_text_file(manifest_path));
    for (const char* f : kFiles) {
      if (!with_optimizer && f == kFiles[1]) continue;
      const auto& entry = manifest.at("files").at(f);
      const std::string file = (dir / f).string();
      if (!fs::exists(file)) throw Error(file + ": missing from the checkpoint");
      io::MappedFile mapped(file);
      if (mapped.size() != entry.at("bytes").get<uint64_t>())
        throw Error(file + ": " + std::to_string(mapped.size()) + " bytes, the MANIFEST says " +
                    std::to_string(entry.at("bytes").get<uint64_t>()) + " (truncated or replaced)");
      if (f == kFiles[1] && reads && entry.contains("entry_crc32")) {
        // The header here; each entry read below as it is loaded (mapped: only its pages are read).
        const uint64_t header = entry.at("header_bytes").get<uint64_t>();
        if (header > mapped.size() ||
            util::crc32_of(reinterpret_cast<const unsigned char*>(mapped.data()), header) != entry.at("header_crc32").get<uint32_t>())
          throw Error(file + ": header's checksum does not match the MANIFEST (corrupted)");
        entry_crcs = entry.at("entry_crc32");
        continue;
      }
      if (crc_of(mapped) != entry.at("crc32").get<uint32_t>()) throw Error(file + ": checksum does not match the MANIFEST (corrupted)");
    }
  } catch (const json::exception& e) {
    throw Error(manifest_path.string() + ": malformed: " + e.what());
  }
  out.model = io::read_safetensors((dir / kFiles[0]).string());
  if (with_optimizer) out.optim = io::read_safetensors((dir / kFiles[1]).string());
  if (!entry_crcs.is_null()) {
    for (const auto& [name, t] : out.optim.tensors) {
      if (!reads(name)) continue;
      const auto crc = entry_crcs.find(name);
      if (crc == entry_crcs.end() || !crc->is_number_unsigned())
        throw Error(manifest_path.string() + ": malformed: no checksum for optimizer state '" + name + "'");
      if (util::crc32_of(static_cast<const unsigned char*>(t.data_ptr()), t.nbytes()) != crc->get<uint32_t>())
        throw Error((dir / kFiles[1]).string() + ": optimizer state '" + name + "' does not match the MANIFEST (corrupted)");
    }
  }
  out.state = state_from_json(util::read_text_file(dir / kFiles[2]), (dir / kFiles[2]).string());
  out.config_yaml = util::read_text_file(dir / kFiles[3]);
  return out;
}

}  // namespace hybrid::train
