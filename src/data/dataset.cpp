#include "hybrid/data/dataset.h"

#include <glob.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "hybrid/error.h"

namespace hybrid::data {
namespace {

uint64_t mix(uint64_t h, uint64_t v) {  // FNV-1a style, stable across platforms and versions
  for (int i = 0; i < 8; ++i) h = (h ^ ((v >> (8 * i)) & 0xff)) * 0x100000001b3ULL;
  return h;
}
uint64_t mix(uint64_t h, const std::string& s) {
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return mix(h, s.size());
}

}  // namespace

std::vector<std::string> expand_glob(const std::string& pattern) {
  glob_t g{};
  int rc = ::glob(pattern.c_str(), GLOB_ERR, nullptr, &g);
  std::vector<std::string> out;
  if (rc == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
  ::globfree(&g);
  if (out.empty()) throw Error(pattern + ": no files match");
  std::sort(out.begin(), out.end());
  // A Megatron pair matches a glob twice (.bin and .idx): keep the .bin. The lookup uses a
  // snapshot, since erase_if may move the vector's elements while the predicate runs.
  const std::set<std::string> matched(out.begin(), out.end());
  std::erase_if(out, [&](const std::string& p) {
    return p.size() > 4 && p.compare(p.size() - 4, 4, ".idx") == 0 && matched.count(p.substr(0, p.size() - 4) + ".bin");
  });
  return out;
}

Source::Source(const DataSourceConfig& cfg, int64_t seq_len, int64_t vocab_size, const std::string& key)
    : seq_len_(seq_len), weight_(cfg.weight), fingerprint_(mix(0xcbf29ce484222325ULL, uint64_t(seq_len))) {
  if (cfg.paths.empty()) throw Error(key + ".paths: no files given");
  starts_.push_back(0);
  for (const auto& pattern : cfg.paths) {
    for (const auto& path : expand_glob(pattern)) {
      files_.push_back(TokenFile::open(path, cfg.format, cfg.dtype, vocab_size));
      const uint64_t n = files_.back()->num_tokens();
      starts_.push_back(starts_.back() + n / seq_len);
      fingerprint_ = mix(mix(fingerprint_, std::filesystem::path(path).filename().string()), n);
    }
  }
  if (num_instances() == 0)
    throw Error(key + ": its files hold no complete instance of " + std::to_string(seq_len) + " tokens (empty source)");
}

void Source::read_instance(uint64_t index, int64_t* out) const {
  const size_t f = std::upper_bound(starts_.begin(), starts_.end(), index) - starts_.begin() - 1;
  files_[f]->read((index - starts_[f]) * seq_len_, seq_len_, out);
}

TokenDataset::TokenDataset(const std::vector<DataSourceConfig>& sources, int64_t seq_len, int64_t vocab_size)
    : seq_len_(seq_len) {
  if (sources.empty()) throw Error("data.sources: no training data configured");
  for (size_t i = 0; i < sources.size(); ++i)
    sources_.emplace_back(sources[i], seq_len, vocab_size, "data.sources[" + std::to_string(i) + "]");
}

uint64_t TokenDataset::fingerprint() const {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (const auto& s : sources_) h = mix(mix(h, s.fingerprint()), static_cast<uint64_t>(s.weight() * 1e9));
  return h;
}

}  // namespace hybrid::data
